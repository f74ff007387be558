"""Population linear layer: every member's kept-channel GEMM in one grouped launch.

All S members share ``weight`` and differ only in keep-masks, so member ``s`` needs only
``x_s[:, kept_in] @ W[kept_out, kept_in]^T``: work scales with ``k_in * k_out`` instead of the dense layer.
Each member's kept inputs are first gathered into compact contiguous operands (``_gather``), then one implicit-GEMM
launch (``_population_gemm``, a linear layer being a 1x1 convolution) computes the kept outputs and writes exact
zeros in the pruned ones, without a zero-fill pass and without a host sync.
"""

from __future__ import annotations

from ._checks import check_float, check_population_args, epilogue_launch_flags, prepare_out, split_rows, tf32_allowed
from ._gather import gather_kept_activations, gather_kept_weights
from ._population_gemm import launch_population_gemm

__all__ = ["population_linear"]


def population_linear(x, weight, bias, in_keep, out_keep, *, members, scale=None, shift=None,
                      relu=False, allow_tf32=None, out=None, block_m=None, block_n=None, block_k=None):
    """Per-member masked ``relu?((x_s W^T + b) * scale + shift)`` on kept channels, exact 0 elsewhere.

    Args:
        x: ``[S*B, I]`` float32/float16/bfloat16, member-major (rows ``[s*B, (s+1)*B)`` are member s).
        weight: ``[O, I]`` (cast to ``x.dtype`` if it differs); bias: ``[O]`` or None.
        in_keep: bool ``[S, I]`` or its ``KeptFirstOrder``; out_keep: bool ``[S, O]`` or its ``KeptFirstOrder``.
        members: S. scale/shift: optional ``[O]`` (a folded eval-mode BatchNorm). relu: apply ReLU.
        allow_tf32: let fp32 ``tl.dot`` use tf32 tensor cores; None (default) follows PyTorch's switch for
            matmuls (``_checks.tf32_allowed("linear")``).
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
    weight, bias, kept_in, kept_out, scale, shift = check_population_args(
        x, weight, bias, in_keep, out_keep, scale, shift, out, members, n_inputs, n_outputs)
    y = prepare_out(out, (rows, n_outputs), x)
    if rows == 0 or n_outputs == 0:
        return y
    if allow_tf32 is None:
        allow_tf32 = tf32_allowed("linear")
    a = gather_kept_activations(x, kept_in, members)
    w = gather_kept_weights(weight, kept_in, kept_out)
    return launch_population_gemm(
        a, w, bias, scale, shift, y, kept_in, kept_out, batch=batch, height=1, width=1, out_h=1, out_w=1,
        kernel=(1, 1), stride=(1, 1), padding=(0, 0), y_strides=(y.stride(0), y.stride(1), 0, 0),
        flags=epilogue_launch_flags(x, bias, scale, shift, relu, allow_tf32),
        block_m=block_m, block_n=block_n, block_k=block_k)
