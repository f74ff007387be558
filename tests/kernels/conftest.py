"""Kernel tests run on CUDA when present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``edropout_kernels`` is imported, so it is set here, at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
