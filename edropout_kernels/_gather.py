"""Gather each member's kept input channels into compact, contiguous operand buffers for the population GEMM.

Reading a member's kept channels straight from ``x`` and the weight gives gathered loads (one element per lane,
no vectors, 2-byte loads that cp.async cannot take), so the GEMM main loop could not be pipelined for 16-bit
types and its loads were not coalesced. One launch per operand writes it once in the order the GEMM reads it:

* activations ``x [S*B, C, (H, W)]`` (any strides) -> ``[S*B, H, W, C_PAD]`` (channels last): element ``j`` of a
  pixel is member ``s``'s ``j``-th kept input channel;
* weights ``w [O, C, (kh, kw)]`` -> ``[S, O, kh*kw, C_PAD]``: row ``r`` is member ``s``'s ``r``-th kept output
  channel, element ``j`` of a tap its ``j``-th kept input channel.

Only the kept part is written (``j < count`` followed by zeros up to the end of the gather block, and for weights
only rows ``r < kept outputs``); the GEMM masks rows it must not read and needs no mask along K, so its loads
along K are whole 16-byte vectors. ``C_PAD`` is ``C`` rounded up to 16 (to 64 from 64 channels on), so every row
starts 16-byte aligned and a GEMM K block (at most 64, a power of two dividing ``C_PAD``) never crosses a row.
The cost is one extra read and write of the kept activations per layer.

A program takes a tile of ``GATHER_BLOCK_M`` (row, tap) pairs: a power-of-two block of taps (so taps stay
contiguous runs along the source's tap stride) times as many rows as fill the tile. A 1x1 convolution's or linear
layer's weight thus takes one program per 32 output channels, not one per channel: fewer, fuller programs (and in
Triton's CPU interpreter, where every program instance runs in Python, time follows the number of programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import pow2_between
from ._kept_first import KeptFirstOrder

__all__ = ["gather_kept_activations", "gather_kept_weights", "padded_channels"]


@triton.jit
def _gather_kept_kernel(
    src_ptr, dst_ptr, idx_ptr, idx_stride, n_ptr, n_stride, row_idx_ptr, row_idx_stride, n_rows_ptr, n_rows_stride,
    R, T, C_PAD, s_row, s_chan, s_t,
    ROW_GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # one program: BLOCK_M // BLOCK_T destination rows x BLOCK_T taps (element m is row m // BLOCK_T, tap
    # m % BLOCK_T: a power of two, so taps stay contiguous runs), all of a member's kept channels in BLOCK_J chunks
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(n_ptr + s * n_stride)
    m = tl.arange(0, BLOCK_M)
    r0 = pid_r * (BLOCK_M // BLOCK_T)
    r = r0 + m // BLOCK_T
    t = pid_t * BLOCK_T + m % BLOCK_T
    row_ok = r < R
    if ROW_GATHER:  # weights: destination row r is the member's r-th kept output channel; only kept rows written
        n_rows = tl.load(n_rows_ptr + s * n_rows_stride)
        row_ok = row_ok & (r < n_rows)
        src_row = tl.load(row_idx_ptr + s * row_idx_stride + r, mask=row_ok, other=0).to(tl.int64)
        j_end = tl.where(r0 < n_rows, n, 0)
    else:  # activations: destination row r is the member's image r
        src_row = s.to(tl.int64) * R + r
        j_end = n
    ok = row_ok & (t < T)
    src = src_ptr + src_row[:, None] * s_row + t[:, None] * s_t
    dst = dst_ptr + ((s.to(tl.int64) * R + r[:, None]) * T + t[:, None]) * C_PAD
    for j0 in range(0, j_end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < n
        chan = tl.load(idx_ptr + s * idx_stride + j, mask=j_ok, other=0)
        v = tl.load(src + chan[None, :] * s_chan, mask=ok[:, None] & j_ok[None, :], other=0.0)
        # zeros after the kept channels, up to the end of this block: the GEMM reads whole BLOCK_K chunks
        tl.store(dst + j[None, :], v, mask=ok[:, None] & (j < C_PAD)[None, :])


#: Zeros written after a row's kept channels reach the end of a block of this many channels (a multiple of every
#: GEMM K block), so the GEMM never reads an unwritten element of a row.
GATHER_BLOCK_J = 64
#: (row, tap) pairs per program: with few taps (1x1 convolutions, linear layers, small maps) a program takes
#: several rows, so the grid is not one tiny program per output channel or image.
GATHER_BLOCK_M = 32


def padded_channels(channels: int) -> int:
    """Row length of a compact buffer: ``channels`` rounded up to 16, or to 64 from 64 channels on (16-byte aligned
    rows in every dtype, divisible by the GEMM's K block)."""
    step = 64 if channels >= 64 else 16
    return (channels + step - 1) // step * step


def _launch(src3, dst, kept_in: KeptFirstOrder, rows_per_member: int, rows: KeptFirstOrder | None):
    """Gather ``src3 [rows, C, T]`` (strided view) into ``dst [S, R, T, C_PAD]``."""
    members, channels = kept_in.index.shape
    taps = src3.shape[2]
    c_pad = dst.shape[-1]
    block_t = pow2_between(taps, 1, GATHER_BLOCK_M)
    block_j = GATHER_BLOCK_J
    row_index = rows.index if rows is not None else kept_in.index
    row_count = rows.count if rows is not None else kept_in.count
    grid = (triton.cdiv(taps, block_t), triton.cdiv(rows_per_member, GATHER_BLOCK_M // block_t), members)
    _gather_kept_kernel[grid](
        src3, dst, kept_in.index, kept_in.index.stride(0), kept_in.count, kept_in.count.stride(0),
        row_index, row_index.stride(0), row_count, row_count.stride(0),
        rows_per_member, taps, c_pad, src3.stride(0), src3.stride(1), src3.stride(2),
        ROW_GATHER=rows is not None, BLOCK_M=GATHER_BLOCK_M, BLOCK_T=block_t, BLOCK_J=block_j, num_warps=4,
    )
    return dst


def _flat_spatial(t: torch.Tensor) -> torch.Tensor:
    """``t [N, C, *spatial]`` as a strided ``[N, C, prod(spatial)]`` view (a copy only if the spatial dims do not
    flatten)."""
    flat = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t.unsqueeze(-1)
    return flat


def gather_kept_activations(x: torch.Tensor, kept_in: KeptFirstOrder, members: int) -> torch.Tensor:
    """``x [S*B, C, *spatial]`` -> compact channels-last ``[S*B, *spatial, C_PAD]`` of member-wise kept channels."""
    batch = x.shape[0] // members
    spatial = tuple(x.shape[2:])
    dst = torch.empty((x.shape[0], *spatial, padded_channels(x.shape[1])), device=x.device, dtype=x.dtype)
    if dst.numel():
        _launch(_flat_spatial(x), dst, kept_in, batch, None)
    return dst


def gather_kept_weights(w: torch.Tensor, kept_in: KeptFirstOrder, kept_out: KeptFirstOrder) -> torch.Tensor:
    """``w [O, C, *taps]`` -> ``[S, O, prod(taps), C_PAD]``: kept output rows first, kept input channels first."""
    members = kept_in.members
    taps = 1
    for k in w.shape[2:]:
        taps *= k
    dst = torch.empty((members, w.shape[0], taps, padded_channels(w.shape[1])), device=w.device, dtype=w.dtype)
    if dst.numel():
        _launch(_flat_spatial(w), dst, kept_in, w.shape[0], kept_out)
    return dst
