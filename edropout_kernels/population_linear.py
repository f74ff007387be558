"""Population linear layer: every member's kept-channel GEMM in one grouped launch.

All S members share ``weight`` and differ only in keep-masks, so member ``s`` needs only
``x_s[:, kept_in] @ W[kept_out, kept_in]^T``: work scales with ``k_in * k_out`` instead of the dense
layer. The grid is (kept-output tile, row tile, member); the K loop runs only over the member's
kept inputs and tiles past its kept outputs skip the loop and store zeros, so pruned output
columns come out exactly 0 without a separate zero-fill pass and without a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._checks import check_float, check_population_args, epilogue_launch_flags, pow2_between, prepare_out, split_rows
from ._kept_first import kept_first_order
from ._epilogue import channel_epilogue

__all__ = ["population_linear"]


@triton.jit
def _population_linear_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
    in_idx_ptr, n_in_ptr, out_idx_ptr, n_out_ptr,
    B, I, O,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    s = tl.program_id(2)
    n_in = tl.load(n_in_ptr + s)
    n_out = tl.load(n_out_ptr + s)

    local_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local_m < B
    rows = s.to(tl.int64) * B + local_m                     # member-major rows
    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)         # positions in the member's permutation
    col_ok = pos_n < O
    kept_n = pos_n < n_out
    cols = tl.load(out_idx_ptr + s * O + pos_n, mask=col_ok, other=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Tiles holding only pruned outputs do no K work at all.
    k_end = tl.where(pid_n * BLOCK_N < n_out, n_in, 0)
    for k0 in range(0, k_end, BLOCK_K):
        pos_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = pos_k < n_in
        ks = tl.load(in_idx_ptr + s * I + pos_k, mask=k_ok, other=0)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & kept_n[None, :], other=0.0)
        if DOT_FP32:  # Triton's CPU interpreter miscomputes bfloat16 dots; exact upcast instead
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    acc = channel_epilogue(acc, cols, kept_n, b_ptr, scale_ptr, shift_ptr, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def population_linear(x, weight, bias, in_keep, out_keep, *, members, scale=None, shift=None,
                      relu=False, allow_tf32=False, out=None, block_m=None, block_n=None,
                      block_k=None):
    """Per-member masked ``relu?((x_s W^T + b) * scale + shift)`` on kept channels, exact 0 elsewhere.

    Args:
        x: ``[S*B, I]`` float32/float16/bfloat16, member-major (rows ``[s*B, (s+1)*B)`` are member s).
        weight: ``[O, I]`` (cast to ``x.dtype`` if it differs); bias: ``[O]`` or None.
        in_keep: bool ``[S, I]``; out_keep: bool ``[S, O]``.
        members: S. scale/shift: optional ``[O]`` (a folded eval-mode BatchNorm). relu: apply ReLU.
        allow_tf32: let fp32 ``tl.dot`` use tf32 tensor cores (default exact fp32 "ieee").
        out: optional preallocated ``[S*B, O]`` output of ``x.dtype`` (every element is written).
    Returns:
        ``[S*B, O]`` of ``x.dtype``; accumulation and epilogue in float32. No autograd.
    """
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [S*B, I] and weight [O, I], got {tuple(x.shape)}, {tuple(weight.shape)}")
    check_float("x", x)
    rows, n_inputs = x.shape
    n_outputs = weight.shape[0]
    if weight.shape[1] != n_inputs:
        raise ValueError(f"weight has {weight.shape[1]} inputs but x has {n_inputs}")
    batch = split_rows(rows, members)
    weight, bias, in_keep, out_keep, scale, shift = check_population_args(
        x, weight, bias, in_keep, out_keep, scale, shift, out, members, n_inputs, n_outputs)
    y = prepare_out(out, (rows, n_outputs), x)
    if rows == 0 or n_outputs == 0:
        return y

    in_idx, n_in = kept_first_order(in_keep)
    out_idx, n_out = kept_first_order(out_keep)
    bm = block_m or pow2_between(batch, 16, 64)
    bn = block_n or pow2_between(n_outputs, 16, 64)
    bk = block_k or pow2_between(n_inputs, 16, 32)
    grid = (triton.cdiv(n_outputs, bn), triton.cdiv(batch, bm), members)
    dummy = y  # never read: its HAS_* flag is False
    _population_linear_kernel[grid](
        x, weight, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, y,
        in_idx, n_in, out_idx, n_out,
        batch, n_inputs, n_outputs,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
        **epilogue_launch_flags(x, bias, scale, shift, relu, allow_tf32),
    )
    return y
