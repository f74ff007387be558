"""Triton GPU kernels for EDropout's accelerated path, with thin launch wrappers.

This package knows tensors, not models: ``edropout`` calls it through the ``"triton"`` backend.
Every kernel also runs on CPU in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests it.
"""
