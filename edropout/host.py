"""The engine's reads of device values on the host, and its uploads of host-made tensors, in one place.

On CUDA any read of a device value (``.item()``, ``float()``, ``bool()``, ``.cpu()``, ``torch.equal``, indexing with
a 0-d tensor) waits for every queued kernel, and so does a plain copy from pageable host memory to the device.
An evolving ``EDropout.step`` reads the device once: ``read`` brings the best state, the finiteness of its energy,
the batch's value checks and the previous step's training loss to the host in one transfer, which decides
convergence; what derives from the best state is computed on that host copy and sent back with ``upload``, which
does not wait.
"""
from __future__ import annotations

import torch

#: Number of ``read`` calls so far (each is one host synchronisation on CUDA); tests count them.
reads = 0


def read(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of ``tensors`` in one device-to-host transfer: as int64 when all are integer or boolean, else
    as float64 (integers exact up to 2**53)."""
    global reads
    reads += 1
    wide = torch.float64 if any(t.is_floating_point() for t in tensors) else torch.int64
    flat = torch.cat([t.reshape(-1).to(wide) for t in tensors]).cpu()
    out, first = [], 0
    for t in tensors:
        out.append(flat[first:first + t.numel()].reshape(t.shape).to(t.dtype))
        first += t.numel()
    return out


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (host) on ``device`` without blocking the host: from pinned memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
