"""Triton Sparseout (METHOD.md §7) in the low-memory dropout pattern: the keep mask is a pure function of
(seed, element offset) via Philox (`tl.rand`), so the backward regenerates it instead of storing it.

`sparseout_mask` returns the same draws as a bool tensor so the PyTorch reference can be fed them.
Element i of the contiguous input uses counter offset i; m_i = [rand(seed, i) >= p] ~ Bernoulli(1 − p).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_device, check_float

__all__ = ["sparseout_triton", "sparseout_mask", "keep_draw", "BLOCK_SIZE"]

BLOCK_SIZE = 1024


@triton.jit
def keep_draw(seed, offs, p):
    """Keep decision for counter offsets `offs`: uniform [0, 1) draw >= p, i.e. Bernoulli(1 − p)."""
    return tl.rand(seed, offs) >= p


@triton.jit
def _keep_mask_kernel(out_ptr, n, p, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    keep = keep_draw(seed, offs, p)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=inb)


@triton.jit
def _sparseout_fwd_kernel(x_ptr, y_ptr, n, p, half_q, inv_keep, seed,
                          IS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    keep = keep_draw(seed, offs, p)
    if IS_DROPOUT:  # q == 2: y = x * m / (1 - p)
        y = x * tl.where(keep, inv_keep, 0.0)
    else:           # y = x + sign(x) |x|^{q/2} eta, |x|^{q/2} = exp(q/2 log|x|), 0 at x = 0
        eta = tl.where(keep, inv_keep, 0.0) - 1.0
        ax = tl.abs(x)
        nz = ax > 0.0
        mag = tl.where(nz, tl.exp(half_q * tl.log(tl.where(nz, ax, 1.0))), 0.0)
        sgn = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
        y = x + sgn * mag * eta
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _sparseout_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, p, c_exp, c_zero, inv_keep, tiny, seed,
                          IS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    keep = keep_draw(seed, offs, p)  # regenerated, never stored
    if IS_DROPOUT:
        factor = tl.where(keep, inv_keep, 0.0)
    else:           # f = 1 + |x|^{(q-2)/2} eta; |x| raised to `tiny`; c(0) = c_zero
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        c = tl.where(ax > 0.0, tl.exp(c_exp * tl.log(tl.maximum(ax, tiny))), c_zero)
        factor = 1.0 + c * (tl.where(keep, inv_keep, 0.0) - 1.0)
    tl.store(dx_ptr + offs, (dy * factor).to(dx_ptr.dtype.element_ty), mask=inb)


def _check(p: float, q: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"sparseout_triton: p={p!r} must lie in [0, 1); use 0 <= p < 1.")
    if not q > 0.0:
        raise ValueError(f"sparseout_triton: q={q!r} must be > 0; q=2 is inverted dropout.")


def _grid(n: int):
    return (triton.cdiv(n, BLOCK_SIZE),)


def sparseout_mask(shape: Sequence[int], p: float, seed: int, device="cpu") -> torch.Tensor:
    """Bool keep mask with exactly the draws the Sparseout kernels use for a tensor of `shape`."""
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.empty(n, dtype=torch.int8, device=device)
    check_device(out)
    if n:
        _keep_mask_kernel[_grid(n)](out, n, float(p), int(seed), BLOCK=BLOCK_SIZE)
    return out.view(tuple(shape)).bool()


class _SparseoutTriton(torch.autograd.Function):
    """Autograd wrapper: saves x and the seed only; the backward regenerates the keep mask."""

    @staticmethod
    def forward(ctx, x, p, q, seed):
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            _sparseout_fwd_kernel[_grid(n)](x, y, n, p, q / 2.0, 1.0 / (1.0 - p), seed,
                                            IS_DROPOUT=(q == 2.0), BLOCK=BLOCK_SIZE)
        ctx.save_for_backward(x)
        ctx.p, ctx.q, ctx.seed = p, q, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n, p, q = x.numel(), ctx.p, ctx.q
        if n:
            _sparseout_bwd_kernel[_grid(n)](x, dy, dx, n, p, (q - 2.0) / 2.0, 1.0 if q < 2.0 else 0.0,
                                            1.0 / (1.0 - p), torch.finfo(torch.float32).tiny, ctx.seed,
                                            IS_DROPOUT=(q == 2.0), BLOCK=BLOCK_SIZE)
        return dx, None, None, None


def sparseout_triton(x: torch.Tensor, p: float, q: float, seed: int) -> torch.Tensor:
    """Sparseout with Philox noise from `seed` (training mode; the caller skips it in eval).

    Same maths as `edropout.regularizers.sparseout` (including the safe gradient at x = 0), computed in
    float32 inside the kernel and stored in x's dtype.
    """
    _check(float(p), float(q))
    check_device(x)
    check_float("x", x)
    return _SparseoutTriton.apply(x, float(p), float(q), int(seed))
