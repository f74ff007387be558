"""Triton (Batch) Bridgeout weight noise (METHOD.md §8): W̃ = W + t ⊙ |W|^{q/2} ⊙ η from a Philox seed.

The forward writes `copies` noisy weights (one per example for Bridgeout, one for Batch Bridgeout);
copy c, element i uses counter offset c·numel + i (the same scheme as `sparseout_mask`). The backward
regenerates η and sums over copies dW = Σ_c dW̃_c ⊙ (1 + t ⊙ (q/2)|W|^{q/2−1} sign(W) ⊙ η_c), with the
derivative term 0 where |W| < tiny (as in the PyTorch reference `abs_pow`). `t` is the optional Batch
Bridgeout target mask (1 = noisy weight); without it every weight is noisy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_device, check_float
from .sparseout import BLOCK_SIZE, keep_draw, sparseout_mask

__all__ = ["bridgeout_weight_triton", "bridgeout_mask"]


@triton.jit
def _bridgeout_fwd_kernel(w_ptr, t_ptr, out_ptr, numel, total, p, half_q, inv_keep, tiny, seed,
                          HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    widx = offs % numel
    w = tl.load(w_ptr + widx, mask=inb, other=0.0).to(tl.float32)
    aw = tl.abs(w)
    ok = aw >= tiny
    mag = tl.where(ok, tl.exp(half_q * tl.log(tl.where(ok, aw, 1.0))), 0.0)
    if HAS_TARGET:
        t = tl.load(t_ptr + widx, mask=inb, other=0)
        mag = tl.where(t != 0, mag, 0.0)
    eta = tl.where(keep_draw(seed, offs, p), inv_keep, 0.0) - 1.0
    tl.store(out_ptr + offs, (w + mag * eta).to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _bridgeout_bwd_kernel(w_ptr, t_ptr, dwt_ptr, dw_ptr, numel, copies, p, half_q, inv_keep, tiny,
                          seed, HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < numel
    w = tl.load(w_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    aw = tl.abs(w)
    ok = aw >= tiny
    # d|w|^{q/2}/dw = (q/2) |w|^{q/2 - 1} sign(w), taken as 0 where |w| < tiny
    dmag = tl.where(ok, half_q * tl.exp((half_q - 1.0) * tl.log(tl.where(ok, aw, 1.0))), 0.0)
    dmag = tl.where(w < 0.0, -dmag, dmag)
    if HAS_TARGET:
        t = tl.load(t_ptr + idx, mask=inb, other=0)
        dmag = tl.where(t != 0, dmag, 0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    offs = idx  # int64 counter offset of copy c: c * numel + idx, advanced per copy
    for _ in range(0, copies):
        g = tl.load(dwt_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        eta = tl.where(keep_draw(seed, offs, p), inv_keep, 0.0) - 1.0  # regenerated, never stored
        acc += g * (1.0 + dmag * eta)
        offs += numel
    tl.store(dw_ptr + idx, acc.to(dw_ptr.dtype.element_ty), mask=inb)


def bridgeout_mask(shape: Sequence[int], p: float, seed: int, copies: Optional[int] = None,
                   device="cpu") -> torch.Tensor:
    """Bool keep draws m used by `bridgeout_weight_triton` for a weight of `shape`, shaped like the weight
    (copies=None) or (copies, *shape)."""
    full = ((copies,) if copies is not None else ()) + tuple(int(s) for s in shape)
    return sparseout_mask(full, p, seed, device)


def _target_arg(w: torch.Tensor, target: Optional[torch.Tensor]):
    if target is None:
        return w, False  # dummy pointer, never read (HAS_TARGET=False)
    if target.shape != w.shape:
        raise ValueError(f"target mask shape {tuple(target.shape)} must equal weight shape {tuple(w.shape)}.")
    return target.to(device=w.device, dtype=torch.int8).contiguous(), True


class _BridgeoutWeightTriton(torch.autograd.Function):
    """Autograd wrapper: saves W (and the target mask) and the seed; η is regenerated in the backward."""

    @staticmethod
    def forward(ctx, w, target, p, q, seed, copies):
        w = w.contiguous()
        t, has_t = _target_arg(w, target)
        n_copies = 1 if copies is None else copies
        numel = w.numel()
        total = numel * n_copies
        out = torch.empty(((copies,) if copies is not None else ()) + tuple(w.shape),
                          dtype=w.dtype, device=w.device)
        if total:
            _bridgeout_fwd_kernel[(triton.cdiv(total, BLOCK_SIZE),)](
                w, t, out, numel, total, p, q / 2.0, 1.0 / (1.0 - p), torch.finfo(torch.float32).tiny,
                seed, HAS_TARGET=has_t, BLOCK=BLOCK_SIZE)
        ctx.save_for_backward(w, t)
        ctx.has_t, ctx.p, ctx.q, ctx.seed, ctx.n_copies = has_t, p, q, seed, n_copies
        return out

    @staticmethod
    def backward(ctx, dwt):
        w, t = ctx.saved_tensors
        dwt = dwt.contiguous()
        dw = torch.empty_like(w)
        numel = w.numel()
        if numel:
            _bridgeout_bwd_kernel[(triton.cdiv(numel, BLOCK_SIZE),)](
                w, t, dwt, dw, numel, ctx.n_copies, ctx.p, ctx.q / 2.0, 1.0 / (1.0 - ctx.p),
                torch.finfo(torch.float32).tiny, ctx.seed, HAS_TARGET=ctx.has_t, BLOCK=BLOCK_SIZE)
        return dw, None, None, None, None, None


def bridgeout_weight_triton(w: torch.Tensor, p: float, q: float, seed: int,
                            target: Optional[torch.Tensor] = None,
                            copies: Optional[int] = None) -> torch.Tensor:
    """Noisy weight W̃ (shape of w, or (copies, *w.shape) for per-example Bridgeout) from `seed`,
    differentiable in w. `target` (bool, w's shape) is the Batch Bridgeout mask of noisy weights."""
    p, q = float(p), float(q)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"bridgeout_weight_triton: p={p!r} must lie in [0, 1); use 0 <= p < 1.")
    if not q > 0.0:
        raise ValueError(f"bridgeout_weight_triton: q={q!r} must be > 0 (default 1.5).")
    if copies is not None and copies < 1:
        raise ValueError(f"bridgeout_weight_triton: copies={copies!r} must be >= 1 or None.")
    check_device(w, target)
    check_float("w", w)
    return _BridgeoutWeightTriton.apply(w, target, p, q, int(seed), copies)
