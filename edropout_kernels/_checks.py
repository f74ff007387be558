"""Argument checks and launch helpers shared by the population kernels' wrappers.

Kept apart from the kernels so that each wrapper fails early with a clear message (which the
engine's "triton" backend turns into a PyTorch fallback) instead of inside Triton's compiler.
"""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_compile_only = False  # set by allow_cpu_launches()


def cpu_launches() -> bool:
    """Whether a kernel may be launched with CPU tensors: in Triton's interpreter, or inside
    ``allow_cpu_launches()``, where a stand-in driver compiles for a GPU target and intercepts the launch."""
    return INTERPRET or _compile_only


@contextlib.contextmanager
def allow_cpu_launches():
    """Within the block the wrappers accept CPU tensors without the interpreter. Only for a stand-in Triton
    driver that compiles every launch for a GPU target and never runs it (``benchmarks/gpu_compile_report.py``)."""
    global _compile_only
    previous, _compile_only = _compile_only, True
    try:
        yield
    finally:
        _compile_only = previous


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless all tensors share one device Triton can run on."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cpu" and not cpu_launches():
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "importing edropout_kernels, or pass CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_keep(name: str, keep: torch.Tensor, members: int, channels: int) -> torch.Tensor:
    """Validate a keep-mask of shape [members, channels] and return it as bool."""
    if tuple(keep.shape) != (members, channels):
        raise ValueError(f"{name} must have shape {(members, channels)}, got {tuple(keep.shape)}")
    return keep.to(torch.bool)


def check_vector(name: str, v: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Validate an optional per-channel vector of length n; return it contiguous in float32."""
    if v is None:
        return None
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(v.shape)}")
    return v.contiguous().to(torch.float32)


def check_kept(name: str, keep, members: int, channels: int):
    """A keep-mask ``[members, channels]`` as its kept channel lists (built here), or lists built by the caller
    (``kept_first_orders``, once per population), checked."""
    from ._kept_first import KeptFirstOrder, kept_first_order

    if isinstance(keep, KeptFirstOrder):
        return keep.check(name, members, channels)
    return kept_first_order(check_keep(name, keep, members, channels))


def check_population_args(x, weight, bias, in_keep, out_keep, scale, shift, out, members: int, n_inputs: int,
                          n_outputs: int):
    """The shared checks of a population GEMM wrapper: one device, keep-masks (or kept channel lists) for
    [S, inputs] and [S, outputs], per-output vectors; returns (weight in ``x``'s dtype, bias, kept inputs, kept
    outputs, scale, shift)."""
    from ._kept_first import KeptFirstOrder

    masks = [k.index if isinstance(k, KeptFirstOrder) else k for k in (in_keep, out_keep)]
    check_device(x, weight, bias, *masks, scale, shift, out)
    return (weight.to(x.dtype), check_vector("bias", bias, n_outputs),
            check_kept("in_keep", in_keep, members, n_inputs), check_kept("out_keep", out_keep, members, n_outputs),
            check_vector("scale", scale, n_outputs), check_vector("shift", shift, n_outputs))


def tf32_allowed(kind: str) -> bool:
    """The tf32 policy of the population GEMMs: a float32 GEMM uses tf32 exactly when PyTorch's own op would.
    ``"linear"`` follows ``torch.backends.cuda.matmul.allow_tf32`` (the same switch as
    ``torch.get_float32_matmul_precision() != "highest"``), ``"conv2d"`` follows ``torch.backends.cudnn.allow_tf32``.
    PyTorch's defaults are: linear exact fp32, conv tf32."""
    if kind == "conv2d":
        return bool(torch.backends.cudnn.allow_tf32)
    if kind == "linear":
        return torch.get_float32_matmul_precision() != "highest"
    raise ValueError(f"unknown GEMM kind {kind!r}")


def epilogue_launch_flags(x, bias, scale, shift, relu, allow_tf32) -> dict:
    """The constexpr launch arguments of a population GEMM kernel: its epilogue and its dot precision."""
    return dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                RELU=bool(relu), INPUT_PRECISION=dot_precision(x.dtype, allow_tf32),
                # Triton's CPU interpreter miscomputes bfloat16 dots; the kernels upcast exactly instead
                DOT_FP32=INTERPRET and x.dtype == torch.bfloat16)


def split_rows(rows: int, members: int) -> int:
    """Rows per member of a member-major batch of ``rows`` rows; raise if it does not divide."""
    if members < 1 or rows % members != 0:
        raise ValueError(f"{rows} rows cannot be split into {members} members of equal size")
    return rows // members


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The ``tl.dot`` input precision: exact fp32 ("ieee") unless the caller allows tf32."""
    return "tf32" if (allow_tf32 and dtype == torch.float32 and not INTERPRET) else "ieee"


def pow2_between(n: int, lo: int, hi: int) -> int:
    """Next power of two >= n, clamped to [lo, hi]."""
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def prepare_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Return ``out`` after checking it, or a new uninitialised tensor (every element is written)."""
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {like.dtype} {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out
