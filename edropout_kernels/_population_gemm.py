"""The implicit GEMM behind ``population_linear`` and ``population_conv2d``: every member's kept-channel product in
one launch, from the compact operand buffers of ``_gather`` (a linear layer is a 1x1 convolution of a 1x1 image).

Per member ``s``: rows = (image, oh, ow), columns = the member's kept output channels, K = taps x kept input
channels. The K loop is one flat loop over (tap, chunk of ``BLOCK_K`` kept channels) with the taps' geometry as
constexprs, so the whole reduction is one loop that Triton software-pipelines: operand tiles are contiguous
16-byte-aligned rows along K, loaded with cp.async (sm_80) or async copies feeding wgmma (sm_90) while earlier
stages compute. Tiles past the member's kept outputs skip the loop and store exact zeros, so pruned output
channels need no separate zero-fill. ``BLOCK_N`` is chosen per layer so that at about half the channels kept a
tile is mostly kept columns (see ``default_tiles``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import pow2_between
from ._gather import GATHER_BLOCK_J
from ._epilogue import channel_epilogue
from ._kept_first import KeptFirstOrder

__all__ = ["launch_population_gemm", "default_tiles"]


@triton.jit
def _population_gemm_kernel(
    a_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
    n_in_ptr, n_in_stride, out_idx_ptr, out_idx_stride, n_out_ptr, n_out_stride,
    B, H, W, O, OH, OW, C_PAD,
    sy_n, sy_c, sy_h, sy_w,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, TILE_IN_IMAGE: tl.constexpr, WIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    n_in = tl.load(n_in_ptr + s * n_in_stride)
    n_out = tl.load(n_out_ptr + s * n_out_stride)
    pixels = OH * OW

    m0 = pid_m * BLOCK_M
    member = s  # 64-bit offsets only for tensors of 2**31 elements or more
    if WIDE:
        member = s.to(tl.int64)
    first = member * B  # the member's first image
    if TILE_IN_IMAGE:  # the tile lies in one image: positions are contiguous, so stores vectorise along M
        img = first + m0 // pixels
        rem = m0 % pixels + tl.arange(0, BLOCK_M)
        m_ok = rem < pixels
    else:
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < B * pixels
        img = first + m // pixels
        rem = m % pixels
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # positions in the member's kept-first output order
    col_ok = pos_n < O
    kept_n = pos_n < n_out
    cols = tl.load(out_idx_ptr + s * out_idx_stride + pos_n, mask=col_ok, other=0)

    k = tl.arange(0, BLOCK_K)
    # weight rows of this tile: [S, O, KH*KW, C_PAD], row = the member's kept output position
    w_rows = w_ptr + ((member * O + pos_n) * (KH * KW)) * C_PAD
    chunks = tl.cdiv(n_in, BLOCK_K)
    steps = tl.where(pid_n * BLOCK_N < n_out, KH * KW * chunks, 0)  # tiles of pruned columns do no K work
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        tap = step // chunks
        c0 = (step - tap * chunks) * BLOCK_K
        kr = tap // KW
        kc = tap % KW
        ih = ih0 + kr
        iw = iw0 + kc
        a_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # no mask along K: the gather wrote zeros after the kept channels up to a whole K block
        a_row = ((img * H + ih) * W + iw) * C_PAD + c0
        a = tl.load(a_ptr + a_row[:, None] + k[None, :], mask=a_ok[:, None], other=0.0)
        wt = tl.load(w_rows[:, None] + (tap * C_PAD + c0) + k[None, :], mask=kept_n[:, None], other=0.0)
        if DOT_FP32:  # Triton's CPU interpreter miscomputes bfloat16 dots; exact upcast instead
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, tl.trans(wt), acc, input_precision=INPUT_PRECISION)

    acc = channel_epilogue(acc, cols, kept_n, b_ptr, scale_ptr, shift_ptr, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU)
    y_off = (img * sy_n + oh * sy_h + ow * sy_w)[:, None] + cols[None, :] * sy_c
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])


def default_tiles(rows_per_member: int, n_outputs: int, c_pad: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) at which the kernel is compiled and checked (``benchmarks/gpu_compile_report``).

    BLOCK_N is about a quarter of the layer's outputs (16 to 64): at half the channels kept, columns past the kept
    count waste under 20 % of a tile for 64 to 512 outputs (64 columns for 64 outputs wasted half). BLOCK_K holds
    128 bytes of one row (32 fp32 or 64 16-bit values), capped by the padded channel count."""
    bm = pow2_between(rows_per_member, 16, 64)
    quarter = 1
    while quarter * 2 <= max(1, n_outputs // 4):
        quarter *= 2
    bn = max(16, min(64, quarter))
    bk = 32 if dtype == torch.float32 else 64
    while c_pad % bk:
        bk //= 2
    return bm, bn, bk


def launch_population_gemm(a, w, bias, scale, shift, y, kept_in: KeptFirstOrder, kept_out: KeptFirstOrder, *,
                           batch, height, width, out_h, out_w, kernel, stride, padding, y_strides, flags,
                           block_m=None, block_n=None, block_k=None):
    """One launch of the kernel over compact ``a [S*B, H, W, C_PAD]`` and ``w [S, O, KH*KW, C_PAD]`` into ``y``
    (strides ``y_strides`` = (image, channel, row, column))."""
    members = kept_in.members
    n_outputs = w.shape[1]
    c_pad = a.shape[-1]
    rows = batch * out_h * out_w
    bm, bn, bk = default_tiles(rows, n_outputs, c_pad, a.dtype)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    if c_pad % bk or bk > GATHER_BLOCK_J:
        raise ValueError(f"block_k={bk} must divide the padded channel count {c_pad} and be at most {GATHER_BLOCK_J}")
    pixels = out_h * out_w
    tile_in_image = pixels % bm == 0
    grid = (triton.cdiv(rows, bm), triton.cdiv(n_outputs, bn), members)
    # exact fp32 runs on the FMA units: 8 warps keep a 64x64 tile's accumulator and operands under 168 registers;
    # the explicit budget matters: without it triton 3.6's ptxas spilled 4 bytes in two of these at sm_90
    fma_wide = flags["INPUT_PRECISION"] == "ieee" and a.dtype == torch.float32 and bm * bn >= 4096
    warps, registers = (8, {"maxnreg": 168}) if fma_wide else (4, {})
    dummy = y  # never read: its HAS_* flag is False
    _population_gemm_kernel[grid](
        a, w, bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, y,
        kept_in.count, kept_in.count.stride(0), kept_out.index, kept_out.index.stride(0),
        kept_out.count, kept_out.count.stride(0),
        batch, height, width, n_outputs, out_h, out_w, c_pad, *y_strides,
        KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        TILE_IN_IMAGE=tile_in_image, WIDE=max(a.numel(), w.numel(), y.numel()) >= 2 ** 31, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        **registers, **flags,
    )
    return y
