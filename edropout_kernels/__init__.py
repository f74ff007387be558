"""Triton GPU kernels for EDropout's accelerated path, with thin launch wrappers.

This package knows tensors, not models: ``edropout`` calls it through the ``"triton"`` backend.
Every kernel also runs on CPU in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests it.
"""

from ._compaction import compact_keep
from .fused_energy import population_energies
from .population_batchnorm import population_batchnorm
from .population_conv2d import population_conv2d
from .population_linear import population_linear

__all__ = [
    "compact_keep",
    "population_batchnorm",
    "population_conv2d",
    "population_energies",
    "population_linear",
]
