"""The regularizer layers' ``backend`` option: "torch" (default) or "triton" (the edropout_kernels kernels).

With "triton" the noise comes from Philox counters keyed by a seed drawn per forward call, and the backward
regenerates it instead of storing a mask or the noise tensor. Triton is imported lazily, only when a layer is
configured with "triton", so the torch path never needs it; errors name the fix.
"""
from __future__ import annotations

from typing import Optional

import torch

BACKENDS = ("torch", "triton")
_SEED_RANGE = 2 ** 31 - 1  # Philox seeds are passed to the kernels as 32-bit integers


def check_backend(backend: str, who: str) -> str:
    """Validate ``backend``; for "triton" also check that Triton imports and can run somewhere here."""
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend={backend!r}; use 'torch' (default) or 'triton'.")
    if backend == "triton":
        kernels()
        if not torch.cuda.is_available() and not _interpreting():
            raise RuntimeError(f"{who}: backend='triton' needs a CUDA GPU or Triton's CPU interpreter; no GPU is "
                               "visible, so set TRITON_INTERPRET=1 before importing edropout_kernels (slow; "
                               "meant for tests) or use backend='torch'.")
    return backend


def _interpreting() -> bool:
    """True if the kernels run in Triton's interpreter, i.e. TRITON_INTERPRET=1 was set when edropout_kernels
    was first imported (Triton reads it when the kernels are decorated; setting it later has no effect)."""
    return kernels().INTERPRET


def kernels():
    """``edropout_kernels`` (its public names: the Sparseout and Bridgeout kernels, ``INTERPRET``), or a
    RuntimeError saying how to get it."""
    try:
        import edropout_kernels
    except ImportError as exc:
        raise RuntimeError(f"backend='triton' needs the triton package ({exc}); install triton or use "
                           "backend='torch'.") from exc
    return edropout_kernels


def check_device(device: torch.device, who: str) -> None:
    """Raise a RuntimeError before a launch that Triton cannot run: CPU tensors without the interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    hint = ("set TRITON_INTERPRET=1 before importing edropout_kernels (Triton's CPU interpreter)"
            if device.type == "cpu" else "move the model to a CUDA device")
    raise RuntimeError(f"{who}: backend='triton' cannot run on {device} tensors; {hint}, or use backend='torch'.")


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """A fresh Philox seed from ``generator`` (its device) or, without one, from torch's global CPU RNG."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(_SEED_RANGE, (), generator=generator, device=device))
