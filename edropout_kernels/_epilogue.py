"""The per-output-channel epilogue shared by the population GEMM kernels (linear and conv2d): bias, a folded
BatchNorm's scale and shift, ReLU, and exact zeros in the member's pruned output channels."""

import triton
import triton.language as tl


@triton.jit
def channel_epilogue(acc, cols, kept_n, b_ptr, scale_ptr, shift_ptr,
                     HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     RELU: tl.constexpr):
    """``relu?((acc + b) * scale + shift)`` per column ``cols``; columns past the member's kept ones are 0."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=kept_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=kept_n, other=0.0)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + cols, mask=kept_n, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    return tl.where(kept_n[None, :], acc, 0.0)
