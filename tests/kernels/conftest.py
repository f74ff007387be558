"""Kernel tests run on CUDA when present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``edropout_kernels`` is imported, so it is set here, at conftest import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in PyTorch's reference convolutions and matmuls, so that on a GPU the kernels (exact fp32 unless a
    test asks for tf32) are compared with exact references."""
    cudnn, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.set_float32_matmul_precision(precision)
