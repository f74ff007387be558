"""Per-member training-mode BatchNorm: each member normalised by its own batch statistics.

Scoring a population must not mix members' statistics (METHOD.md section 2), so member ``s``
(rows ``[s*B, (s+1)*B)``) gets mean and biased variance over its own rows and spatial positions,
then affine, exact zeros in its pruned channels and an optional ReLU. Running statistics are never
read or updated. One program per (channel block, member); statistics use a chunked, numerically
stable merge (Chan et al.), so the data is read twice (statistics, then output) and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_device, check_float, check_keep, check_vector, pow2_between, prepare_out, split_rows

__all__ = ["population_batchnorm"]


@triton.jit
def _population_batchnorm_kernel(
    y_ptr, out_ptr, gamma_ptr, beta_ptr, keep_ptr,
    B, C, HW, W, eps,
    sy_n, sy_c, sy_h, sy_w, so_n, so_c, so_h, so_w,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_KEEP: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if HAS_KEEP:
        kept = tl.load(keep_ptr + s * C + c, mask=c_ok, other=0) != 0
    else:
        kept = c_ok
    kept = kept & c_ok
    L = B * HW
    # A block whose channels are all pruned skips the statistics entirely.
    l_end = tl.where(tl.max(kept.to(tl.int32), axis=0) > 0, L, 0)
    row0 = s.to(tl.int64) * B

    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for l0 in range(0, l_end, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        b = l // HW
        hw = l % HW
        off = (row0 + b)[None, :] * sy_n + c[:, None] * sy_c + (hw // W)[None, :] * sy_h + (hw % W)[None, :] * sy_w
        m = kept[:, None] & l_ok[None, :]
        v = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
        n_prev = l0 * 1.0
        n_blk = tl.minimum(L - l0, BLOCK_L) * 1.0
        mean_blk = tl.sum(v, axis=1) / n_blk
        d = tl.where(m, v - mean_blk[:, None], 0.0)
        m2_blk = tl.sum(d * d, axis=1)
        delta = mean_blk - mean
        n_tot = n_prev + n_blk
        mean += delta * (n_blk / n_tot)
        m2 += m2_blk + delta * delta * (n_prev * n_blk / n_tot)
    rstd = 1.0 / tl.sqrt(m2 / L + eps)
    mul = rstd
    if HAS_GAMMA:
        mul = mul * tl.load(gamma_ptr + c, mask=kept, other=0.0)
    add = -mean * mul
    if HAS_BETA:
        add += tl.load(beta_ptr + c, mask=kept, other=0.0)

    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        b = l // HW
        hw = l % HW
        h = (hw // W)[None, :]
        w = (hw % W)[None, :]
        m = kept[:, None] & l_ok[None, :]
        v = tl.load(y_ptr + (row0 + b)[None, :] * sy_n + c[:, None] * sy_c + h * sy_h + w * sy_w,
                    mask=m, other=0.0).to(tl.float32)
        r = v * mul[:, None] + add[:, None]
        if RELU:
            r = tl.maximum(r, 0.0)
        r = tl.where(m, r, 0.0)
        tl.store(out_ptr + (row0 + b)[None, :] * so_n + c[:, None] * so_c + h * so_h + w * so_w,
                 r.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & l_ok[None, :])


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
        out_keep = check_keep("out_keep", out_keep, members, channels).contiguous().view(torch.uint8)
    if out is None:
        out = torch.empty_like(y)
    else:
        out = prepare_out(out, tuple(y.shape), y)
    if y.numel() == 0:
        return out
    if y.dim() == 4:
        height, width = y.shape[2], y.shape[3]
        sy, so = y.stride(), out.stride()
    else:
        height, width = 1, 1
        sy, so = (*y.stride(), 0, 0), (*out.stride(), 0, 0)
    hw = height * width
    block_l = pow2_between(batch * hw, 16, 64 if hw == 1 else 512)
    block_c = pow2_between(channels, 2, max(2, 4096 // block_l))
    grid = (triton.cdiv(channels, block_c), members)
    dummy = out
    _population_batchnorm_kernel[grid](
        y, out, weight if weight is not None else dummy, bias if bias is not None else dummy,
        out_keep if out_keep is not None else dummy,
        batch, channels, hw, width, float(eps),
        *sy, *so,
        HAS_GAMMA=weight is not None, HAS_BETA=bias is not None, HAS_KEEP=out_keep is not None,
        RELU=bool(relu), BLOCK_C=block_c, BLOCK_L=block_l, num_warps=4,
    )
    return out
