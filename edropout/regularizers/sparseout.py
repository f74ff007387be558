"""Sparseout (METHOD.md §7): dropout-style activation noise whose size scales as |x|^{q/2}.

Train: y = x + sign(x)·|x|^{q/2}·η with η = m/(1−p) − 1, m ~ Bernoulli(1−p) per element; eval: identity.
q = 2 is inverted dropout (bit for bit); q < 2 acts as an L_q penalty on the activations. The backward
pass multiplies the incoming gradient by the noise factor f = 1 + |x|^{(q−2)/2}·η held constant.

The layer's ``backend="triton"`` runs the same maths in the Triton kernel of edropout_kernels.sparseout, whose
noise is regenerated from a seed in the backward (no stored mask): same distribution, different draws.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import _backend

__all__ = ["Sparseout", "sparseout", "draw_keep_mask", "check_p_q", "sparseout_grad_factor"]


def check_p_q(p: float, q: float, who: str) -> None:
    """Raise a ValueError naming the fix when p is outside [0, 1) or q is not a positive finite number."""
    if not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{who}: p={p!r} is the drop probability and must lie in [0, 1); "
                         "use 0 <= p < 1 (p=0 disables the noise; p=1 would drop everything).")
    if not isinstance(q, (int, float)) or not (math.isfinite(float(q)) and float(q) > 0.0):
        raise ValueError(f"{who}: q={q!r} must be a finite number > 0; "
                         "use q=2 for inverted dropout or 0 < q < 2 for a sparsifying L_q penalty.")


def draw_keep_mask(shape: Sequence[int], p: float, device=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool tensor of keep draws m ~ Bernoulli(1 − p), drawn exactly the way F.dropout draws on CPU."""
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    return mask.bernoulli_(1.0 - p, generator=generator)


def _eta(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """η = m/(1−p) − 1: zero-mean multiplicative noise with variance p/(1−p)."""
    return keep.to(dtype).div(1.0 - p).sub_(1.0)


def sparseout_grad_factor(x: torch.Tensor, keep: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """The constant gradient multiplier f = 1 + c(x)·η with c(x) = |x|^{(q−2)/2}.

    Safe at x = 0: c(0) := 1 for q <= 2 (the inverted-dropout factor m/(1−p); the exact limit is infinite
    for q < 2) and 0 for q > 2 (the exact limit). For 0 < |x| below the smallest normal float, |x| is
    raised to it so the factor stays finite for every q > 0.
    """
    if q == 2.0:
        return keep.to(x.dtype).div(1.0 - p)
    ax = x.abs()
    tiny = torch.finfo(x.dtype).tiny
    c = ax.clamp_min(tiny).pow((q - 2.0) / 2.0)
    c = torch.where(ax > 0, c, torch.full_like(c, 1.0 if q < 2.0 else 0.0))
    return c.mul_(_eta(keep, p, x.dtype)).add_(1.0)


def _sparseout_forward(x: torch.Tensor, keep: torch.Tensor, p: float, q: float) -> torch.Tensor:
    if q == 2.0:  # literally x * (m / (1 − p)), as F.dropout computes it
        return x * keep.to(x.dtype).div(1.0 - p)
    return x + torch.sign(x) * x.abs().pow(q / 2.0) * _eta(keep, p, x.dtype)


class _SparseoutFn(torch.autograd.Function):
    """Forward: the Sparseout formula; backward: dx = dy · f with f held constant (METHOD.md §7)."""

    @staticmethod
    def forward(ctx, x, keep, p, q):
        ctx.save_for_backward(x, keep)  # keep is bool: 1 byte per element, the factor is rebuilt later
        ctx.p, ctx.q = p, q
        return _sparseout_forward(x, keep, p, q)

    @staticmethod
    def backward(ctx, dy):
        x, keep = ctx.saved_tensors
        return dy * sparseout_grad_factor(x, keep, ctx.p, ctx.q), None, None, None


def sparseout(x: torch.Tensor, p: float = 0.5, q: float = 2.0, training: bool = True,
              mask: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Functional Sparseout. `mask` gives explicit keep draws m (bool or 0/1, x's shape); else they are
    drawn from `generator` or torch's global RNG. Identity when not training or p == 0."""
    check_p_q(p, q, "sparseout")
    if not training or p == 0.0:
        return x
    if mask is None:
        mask = draw_keep_mask(x.shape, p, x.device, generator)
    elif mask.shape != x.shape:
        raise ValueError(f"sparseout: mask shape {tuple(mask.shape)} must equal input shape {tuple(x.shape)}.")
    return _SparseoutFn.apply(x, mask.to(device=x.device, dtype=torch.bool), float(p), float(q))


class Sparseout(nn.Module):
    """Drop-in replacement for nn.Dropout applying Sparseout noise in training mode, identity in eval.

    `generator` (optional) makes the draws reproducible; default: global RNG. With backend="torch" it draws
    the keep masks (so it must live on the input's device); with backend="triton" it draws one Philox seed
    per forward call, kept in `last_seed` so that `edropout_kernels.sparseout.sparseout_mask` can read the
    draws out. "triton" needs a CUDA input, or a CPU input under TRITON_INTERPRET=1 (tests).
    """

    def __init__(self, p: float = 0.5, q: float = 2.0, generator: Optional[torch.Generator] = None,
                 backend: str = "torch"):
        super().__init__()
        check_p_q(p, q, "Sparseout")
        self.p, self.q, self.generator = float(p), float(q), generator
        self.backend = _backend.check_backend(backend, "Sparseout")
        self.last_seed: Optional[int] = None

    def draw_keep(self, shape: Sequence[int], device) -> torch.Tensor:
        """The torch backend's keep draws m for an input of `shape` (override to feed fixed draws)."""
        return draw_keep_mask(shape, self.p, device, self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.backend == "triton":
            _backend.check_device(x.device, "Sparseout")
            self.last_seed = _backend.draw_seed(self.generator)
            return _backend.kernels().sparseout_triton(x, self.p, self.q, self.last_seed)
        return sparseout(x, self.p, self.q, True, mask=self.draw_keep(x.shape, x.device))

    def extra_repr(self) -> str:
        backend = ", backend='triton'" if self.backend == "triton" else ""
        return f"p={self.p}, q={self.q}{backend}"
