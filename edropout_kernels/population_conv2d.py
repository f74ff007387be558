"""Population 2-D convolution: one implicit-GEMM launch over all members' kept channels.

Member ``s`` computes only its kept output channels, and its reduction runs only over its kept input channels
times the kh x kw taps, so its work scales with ``k_in * k_out`` of the dense conv. Each member's kept input
channels are first gathered into a compact channels-last buffer and its kept weights into a compact
[kept out, taps, kept in] block (``_gather``; no im2col buffer), then one implicit-GEMM launch
(``_population_gemm``) computes rows = (image, oh, ow) by kept output channels with one pipelined K loop over
taps x kept input channels. Pruned output channels come out exactly 0 with no extra zero-fill pass.
"""

from __future__ import annotations

import torch
from ._checks import check_float, check_population_args, epilogue_launch_flags, prepare_out, split_rows, tf32_allowed
from ._gather import gather_kept_activations, gather_kept_weights
from ._population_gemm import launch_population_gemm

__all__ = ["population_conv2d"]


def _pair(name, v):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _is_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def population_conv2d(x, weight, bias, in_keep, out_keep, *, members, stride=1, padding=0,
                      dilation=1, groups=1, scale=None, shift=None, relu=False, allow_tf32=None,
                      out=None, block_m=None, block_n=None, block_k=None):
    """Per-member masked ``relu?((conv2d(x_s, W) + b) * scale + shift)``, exact 0 in pruned channels.

    Args:
        x: ``[S*B, C, H, W]`` float32/float16/bfloat16, member-major, any strides.
        weight: ``[O, C, kh, kw]`` (cast to ``x.dtype`` if it differs); bias: ``[O]`` or None.
        in_keep: bool ``[S, C]`` or its ``KeptFirstOrder``; out_keep: bool ``[S, O]`` or its ``KeptFirstOrder``;
        members: S.
        stride, padding: int or pair (zero padding). dilation and groups must be 1 (ValueError
        otherwise, so that the caller can fall back to PyTorch).
        scale/shift: optional ``[O]`` (folded eval-mode BatchNorm); relu: apply ReLU.
        allow_tf32: let fp32 ``tl.dot`` use tf32; None (default) follows PyTorch's switch for convolutions
            (``_checks.tf32_allowed("conv2d")``). out: optional preallocated output.
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
    weight, bias, kept_in, kept_out, scale, shift = check_population_args(
        x, weight, bias, in_keep, out_keep, scale, shift, out, members, channels, n_outputs)
    shape = (rows, n_outputs, out_h, out_w)
    if out is None:
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    y = prepare_out(out, shape, x)
    if y.numel() == 0:
        return y
    if allow_tf32 is None:
        allow_tf32 = tf32_allowed("conv2d")
    a = gather_kept_activations(x, kept_in, members)
    w = gather_kept_weights(weight, kept_in, kept_out)
    return launch_population_gemm(
        a, w, bias, scale, shift, y, kept_in, kept_out, batch=batch, height=height, width=width, out_h=out_h,
        out_w=out_w, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), y_strides=y.stride(),
        flags=epilogue_launch_flags(x, bias, scale, shift, relu, allow_tf32),
        block_m=block_m, block_n=block_n, block_k=block_k)
