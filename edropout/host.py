"""The engine's reads of device values on the host, and its uploads of host-made tensors, in one place.

On CUDA any read of a device value (``.item()``, ``float()``, ``bool()``, ``.cpu()``, ``torch.equal``, indexing with
a 0-d tensor) waits for every queued kernel, and so does a plain copy from pageable host memory to the device.
An evolving ``EDropout.step`` reads the device once: ``read`` brings the best state, its energy,
the batch's value checks and the previous step's training loss to the host in one transfer, which decides
convergence; what derives from the best state is computed on that host copy and sent back with ``upload``, which
does not wait.
"""
from __future__ import annotations

import torch

#: Number of ``read`` calls so far (each is one host synchronisation on CUDA); tests count them.
reads = 0


def read(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of ``tensors`` (any dtypes) in one device-to-host transfer: their bytes laid side by side,
    widest elements first so that every copy is an aligned view of the one host buffer (two device operations in
    all: the concatenation and the copy)."""
    global reads
    reads += 1
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    flat = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in order]).cpu()
    out, first = [None] * len(tensors), 0
    for i in order:
        t = tensors[i]
        size = t.numel() * t.element_size()
        out[i] = flat[first:first + size].view(t.dtype).reshape(t.shape)
        first += size
    return out


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (host) on ``device`` without blocking the host: from pinned memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
