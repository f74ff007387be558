"""Per-member training-mode BatchNorm: each member normalised by its own batch statistics.

Scoring a population must not mix members' statistics (METHOD.md section 2), so member ``s``
(rows ``[s*B, (s+1)*B)``) gets mean and biased variance over its own rows and spatial positions,
then affine, exact zeros in its pruned channels and an optional ReLU. Running statistics are never
read or updated. One program per (channel block, member) walks tiles of [channels, images, pixels] whose
offsets are plain sums of strides (H and W flattened; no per-element division), with the lanes along the
contiguous dimension; statistics use a chunked, numerically stable merge (Chan et al.), so the data is read
twice (statistics, then output) and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_device, check_float, check_keep, check_vector, pow2_between, prepare_out, split_rows

__all__ = ["population_batchnorm"]


@triton.jit
def _population_batchnorm_kernel(
    y_ptr, out_ptr, gamma_ptr, beta_ptr, keep_ptr, keep_stride,
    B, C, HW, eps,
    sy_n, sy_c, sy_hw, so_n, so_c, so_hw,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_KEEP: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if HAS_KEEP:
        kept = tl.load(keep_ptr + s * keep_stride + c, mask=c_ok, other=0) != 0
    else:
        kept = c_ok
    kept = kept & c_ok
    # A block whose channels are all pruned skips the statistics entirely.
    b_end = tl.where(tl.max(kept.to(tl.int32), axis=0) > 0, B, 0)
    row0 = s.to(tl.int64) * B
    bi = tl.arange(0, BLOCK_B)
    hi = tl.arange(0, BLOCK_HW)
    y_chan = y_ptr + (c * sy_c)[:, None, None]
    o_chan = out_ptr + (c * so_c)[:, None, None]

    # tiles of [channels, images, contiguous pixels]: offsets are sums of strides, no per-element div/mod
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    n_prev = 0.0
    for b0 in range(0, b_end, BLOCK_B):
        b_ok = (b0 + bi) < B
        y_img = y_chan + ((row0 + b0 + bi) * sy_n)[None, :, None]
        for hw0 in range(0, HW, BLOCK_HW):
            hw_ok = (hw0 + hi) < HW
            m = kept[:, None, None] & b_ok[None, :, None] & hw_ok[None, None, :]
            v = tl.load(y_img + ((hw0 + hi) * sy_hw)[None, None, :], mask=m, other=0.0).to(tl.float32)
            n_blk = (tl.minimum(B - b0, BLOCK_B) * tl.minimum(HW - hw0, BLOCK_HW)) * 1.0
            mean_blk = tl.sum(tl.sum(v, axis=2), axis=1) / n_blk
            d = tl.where(m, v - mean_blk[:, None, None], 0.0)
            m2_blk = tl.sum(tl.sum(d * d, axis=2), axis=1)
            # Chan et al.'s merge of (mean, M2) of the tiles seen so far with this tile's
            delta = mean_blk - mean
            n_tot = n_prev + n_blk
            mean += delta * (n_blk / n_tot)
            m2 += m2_blk + delta * delta * (n_prev * n_blk / n_tot)
            n_prev = n_tot
    rstd = 1.0 / tl.sqrt(m2 / (B * HW) + eps)
    mul = rstd
    if HAS_GAMMA:
        mul = mul * tl.load(gamma_ptr + c, mask=kept, other=0.0)
    add = -mean * mul
    if HAS_BETA:
        add += tl.load(beta_ptr + c, mask=kept, other=0.0)

    for b0 in range(0, B, BLOCK_B):
        b_ok = (b0 + bi) < B
        y_img = y_chan + ((row0 + b0 + bi) * sy_n)[None, :, None]
        o_img = o_chan + ((row0 + b0 + bi) * so_n)[None, :, None]
        for hw0 in range(0, HW, BLOCK_HW):
            hw_ok = (hw0 + hi) < HW
            inb = c_ok[:, None, None] & b_ok[None, :, None] & hw_ok[None, None, :]
            m = inb & kept[:, None, None]
            v = tl.load(y_img + ((hw0 + hi) * sy_hw)[None, None, :], mask=m, other=0.0).to(tl.float32)
            r = v * mul[:, None, None] + add[:, None, None]
            if RELU:
                r = tl.maximum(r, 0.0)
            r = tl.where(m, r, 0.0)
            tl.store(o_img + ((hw0 + hi) * so_hw)[None, None, :], r.to(out_ptr.dtype.element_ty), mask=inb)


def _pixel_stride(t):
    """Stride of the flattened H*W dimension of ``t`` [N, C, H, W], or None if H and W do not flatten."""
    if t.shape[2] == 1:
        return t.stride(3)
    if t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3):
        return t.stride(3) if t.shape[3] > 1 else t.stride(2)
    return None


def _blocks(batch, channels, pixels, channels_contiguous):
    """(BLOCK_C, BLOCK_B, BLOCK_HW): tiles of 1024 elements with the lanes along the contiguous dimension."""
    if channels_contiguous:
        block_c = pow2_between(channels, 1, 32)
        block_hw = pow2_between(pixels, 1, max(1, 1024 // block_c))
    else:
        block_hw = pow2_between(pixels, 1, 1024)
        block_c = 1
    block_b = pow2_between(batch, 1, max(1, 1024 // (block_c * block_hw)))
    return block_c, block_b, block_hw


def population_batchnorm(y, members, weight=None, bias=None, eps=1e-5, out_keep=None, relu=False, *,
                         out=None):
    """Normalise each member's rows of ``y`` with that member's own batch mean and biased variance.

    Args:
        y: ``[S*B, C]`` or ``[S*B, C, H, W]`` (any strides), float32/float16/bfloat16, member-major.
        members: S. weight/bias: optional affine ``[C]``. eps: added to the variance.
        out_keep: optional bool ``[S, C]``; pruned channels of a member come out exactly 0.
        relu: apply ReLU after the affine. out: optional preallocated output like ``y``.
    Returns:
        Tensor shaped like ``y`` (same strides when ``out`` is None); statistics in float32.
        Matches ``F.batch_norm(training=True)`` per member, without touching running statistics
        (and, unlike it, accepts a single value per channel: the variance is then 0).
    """
    if y.dim() not in (2, 4):
        raise ValueError(f"y must be [S*B, C] or [S*B, C, H, W], got shape {tuple(y.shape)}")
    check_float("y", y)
    rows, channels = y.shape[0], y.shape[1]
    batch = split_rows(rows, members)
    check_device(y, weight, bias, out_keep, out)
    weight = check_vector("weight", weight, channels)
    bias = check_vector("bias", bias, channels)
    if out_keep is not None:
        out_keep = check_keep("out_keep", out_keep, members, channels)
        if out_keep.stride(1) != 1:
            out_keep = out_keep.contiguous()
        out_keep = out_keep.view(torch.uint8)  # rows may be a strided view of a wider table
    if out is None:
        out = torch.empty_like(y)
    else:
        out = prepare_out(out, tuple(y.shape), y)
    if y.numel() == 0:
        return out
    if y.dim() == 2:
        y4, out4 = y[:, :, None, None], out[:, :, None, None]
    else:
        y4, out4 = y, out
    if _pixel_stride(y4) is None or _pixel_stride(out4) is None:
        # H and W do not flatten (an unusual view): normalise a contiguous copy, then write into ``out``
        return out.copy_(population_batchnorm(y.contiguous(), members, weight, bias, eps,
                                              None if out_keep is None else out_keep.bool(), relu))
    pixels = y4.shape[2] * y4.shape[3]
    block_c, block_b, block_hw = _blocks(batch, channels, pixels, y4.stride(1) == 1 and channels > 1)
    grid = (triton.cdiv(channels, block_c), members)
    dummy = out
    _population_batchnorm_kernel[grid](
        y4, out4, weight if weight is not None else dummy, bias if bias is not None else dummy,
        out_keep if out_keep is not None else dummy, out_keep.stride(0) if out_keep is not None else 0,
        batch, channels, pixels, float(eps),
        y4.stride(0), y4.stride(1), _pixel_stride(y4), out4.stride(0), out4.stride(1), _pixel_stride(out4),
        HAS_GAMMA=weight is not None, HAS_BETA=bias is not None, HAS_KEEP=out_keep is not None,
        RELU=bool(relu), BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_HW=block_hw, num_warps=4,
    )
    return out
