"""Population 2-D convolution: one implicit-GEMM launch over all members' kept channels.

Member ``s`` computes only its kept output channels, and its reduction runs only over its kept
input channels times the kh x kw taps, so its work scales with ``k_in * k_out`` of the dense conv.
GEMM view per member: rows = (image, oh, ow), columns = kept output channels, K = kept input
channels x taps, gathered straight from ``x`` (any strides, NCHW or channels-last, no im2col
buffer). Tiles past the member's kept outputs skip the K loop and store zeros, so pruned output
channels are exactly 0 with no extra zero-fill pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_population_args, epilogue_launch_flags, pow2_between, prepare_out, split_rows
from ._kept_first import kept_first_order
from ._epilogue import channel_epilogue

__all__ = ["population_conv2d"]


@triton.jit
def _population_conv2d_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
    in_idx_ptr, n_in_ptr, out_idx_ptr, n_out_ptr,
    B, C, H, W, O, OH, OW, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w, sy_n, sy_c, sy_h, sy_w,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    n_in = tl.load(n_in_ptr + s)
    n_out = tl.load(n_out_ptr + s)

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)             # (image, oh, ow) within the member
    m_ok = m < B * OH * OW
    img = s.to(tl.int64) * B + m // (OH * OW)
    rem = m % (OH * OW)
    ih0 = (rem // OW) * STRIDE_H - PAD_H
    iw0 = (rem % OW) * STRIDE_W - PAD_W

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = pos_n < O
    kept_n = pos_n < n_out
    cols = tl.load(out_idx_ptr + s * O + pos_n, mask=col_ok, other=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(pid_n * BLOCK_N < n_out, n_in, 0)
    for k0 in range(0, k_end, BLOCK_K):
        pos_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = pos_k < n_in
        ks = tl.load(in_idx_ptr + s * C + pos_k, mask=k_ok, other=0)
        x_chan = ks[None, :] * sx_c
        w_chan = ks[:, None] * sw_c + cols[None, :] * sw_o
        w_ok = k_ok[:, None] & kept_n[None, :]
        for tap in range(0, KH * KW):
            kr = tap // KW
            kc = tap % KW
            ih = ih0 + kr
            iw = iw0 + kc
            sp_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + (img * sx_n + ih * sx_h + iw * sx_w)[:, None] + x_chan,
                        mask=sp_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_chan + kr * sw_h + kc * sw_w, mask=w_ok, other=0.0)
            if DOT_FP32:  # Triton's CPU interpreter miscomputes bfloat16 dots; exact upcast instead
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    acc = channel_epilogue(acc, cols, kept_n, b_ptr, scale_ptr, shift_ptr, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU)
    y_off = (img * sy_n + (rem // OW) * sy_h + (rem % OW) * sy_w)[:, None] + cols[None, :] * sy_c
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])


def _pair(name, v):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _is_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def population_conv2d(x, weight, bias, in_keep, out_keep, *, members, stride=1, padding=0,
                      dilation=1, groups=1, scale=None, shift=None, relu=False, allow_tf32=False,
                      out=None, block_m=None, block_n=None, block_k=None):
    """Per-member masked ``relu?((conv2d(x_s, W) + b) * scale + shift)``, exact 0 in pruned channels.

    Args:
        x: ``[S*B, C, H, W]`` float32/float16/bfloat16, member-major, any strides.
        weight: ``[O, C, kh, kw]`` (cast to ``x.dtype`` if it differs); bias: ``[O]`` or None.
        in_keep: bool ``[S, C]``; out_keep: bool ``[S, O]``; members: S.
        stride, padding: int or pair (zero padding). dilation and groups must be 1 (ValueError
        otherwise, so that the caller can fall back to PyTorch).
        scale/shift: optional ``[O]`` (folded eval-mode BatchNorm); relu: apply ReLU.
        allow_tf32: let fp32 ``tl.dot`` use tf32 (default exact fp32). out: optional preallocated output.
    Returns:
        ``[S*B, O, OH, OW]`` of ``x.dtype``, channels-last if ``x`` is, else NCHW. No autograd.
    """
    if groups != 1:
        raise ValueError(f"population_conv2d supports groups=1 only, got groups={groups}")
    if _pair("dilation", dilation) != (1, 1):
        raise ValueError(f"population_conv2d supports dilation=1 only, got dilation={dilation}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x must be [S*B, C, H, W] and weight [O, C, kh, kw], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}")
    check_float("x", x)
    rows, channels, height, width = x.shape
    n_outputs, w_channels, kh, kw = weight.shape
    if w_channels != channels:
        raise ValueError(f"weight expects {w_channels} input channels but x has {channels} "
                         "(grouped convolution is not supported)")
    sh, sw = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"invalid stride {stride} or padding {padding}")
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit input {height}x{width} with padding {padding}")
    batch = split_rows(rows, members)
    weight, bias, in_keep, out_keep, scale, shift = check_population_args(
        x, weight, bias, in_keep, out_keep, scale, shift, out, members, channels, n_outputs)
    shape = (rows, n_outputs, out_h, out_w)
    if out is None:
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    y = prepare_out(out, shape, x)
    if y.numel() == 0:
        return y

    in_idx, n_in = kept_first_order(in_keep)
    out_idx, n_out = kept_first_order(out_keep)
    gemm_rows = batch * out_h * out_w
    bm = block_m or pow2_between(gemm_rows, 16, 64)
    bn = block_n or pow2_between(n_outputs, 16, 64)
    bk = block_k or pow2_between(channels, 16, 32)
    grid = (triton.cdiv(gemm_rows, bm), triton.cdiv(n_outputs, bn), members)
    dummy = y
    _population_conv2d_kernel[grid](
        x, weight, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, y,
        in_idx, n_in, out_idx, n_out,
        batch, channels, height, width, n_outputs, out_h, out_w, kh, kw, sh, sw, ph, pw,
        *x.stride(), *weight.stride(), *y.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
        **epilogue_launch_flags(x, bias, scale, shift, relu, allow_tf32),
    )
    return y
