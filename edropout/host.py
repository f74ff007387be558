"""The engine's reads of device values on the host, and its uploads of host-made tensors, in one place.

On CUDA any read of a device value (``.item()``, ``float()``, ``bool()``, ``.cpu()``, ``torch.equal``, indexing with
a 0-d tensor) waits for every queued kernel, and so does a plain copy from pageable host memory to the device.
An evolving ``EDropout.step`` reads the device once: ``read`` brings the best state, its energy,
the batch's value checks and the previous step's training loss to the host in one transfer, which decides
convergence; what derives from the best state is computed on that host copy and sent back with ``upload``, which
does not wait. Both move several tensors as one buffer of raw bytes (``pack``/``unpack``): one copy each way.
"""
from __future__ import annotations

import torch

#: Number of ``read`` calls so far (each is one host synchronisation on CUDA); tests count them.
reads = 0


def _widest_first(specs) -> list:
    """Positions of ``specs`` ((dtype, shape) pairs) in packing order: widest elements first (stable), so that every
    tensor starts at a multiple of its own element size and is an aligned view of the packed bytes."""
    return sorted(range(len(specs)), key=lambda i: -specs[i][0].itemsize)


def pack(tensors) -> tuple[torch.Tensor, list]:
    """The bytes of ``tensors`` (any dtypes and shapes, on one device) side by side in one uint8 tensor (one
    operation), and their (dtype, shape) specs for ``unpack``."""
    specs = [(t.dtype, t.shape) for t in tensors]
    flat = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in _widest_first(specs)])
    return flat, specs


def unpack(flat: torch.Tensor, specs) -> list:
    """The tensors that ``pack`` laid into ``flat`` (or into a copy of it on another device), as views of it."""
    out, first = [None] * len(specs), 0
    for i in _widest_first(specs):
        dtype, shape = specs[i]
        size = shape.numel() * dtype.itemsize
        out[i] = flat[first:first + size].view(dtype).reshape(shape)
        first += size
    return out


def read(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of ``tensors`` (any dtypes) in one device-to-host transfer: two device operations in all (the
    packing and the copy)."""
    global reads
    reads += 1
    flat, specs = pack(tensors)
    return unpack(flat.cpu(), specs)


def upload(tensors, device) -> list[torch.Tensor]:
    """Copies on ``device`` of ``tensors`` (any dtypes) in one host-to-device transfer that does not block the host:
    the host tensors are packed (``pack``), copied from pinned memory on CUDA and come back as views of the one
    device buffer. Tensors not on the host, and all of them when ``device`` is not a GPU, get a plain ``.to``."""
    out, device = list(tensors), torch.device(device)
    on_host = [i for i, t in enumerate(out) if t.device.type == "cpu"] if device.type == "cuda" else []
    if on_host:
        flat, specs = pack([out[i] for i in on_host])
        for i, copy in zip(on_host, unpack(flat.pin_memory().to(device, non_blocking=True), specs)):
            out[i] = copy
    return [t.to(device) for t in out]
