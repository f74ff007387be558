"""Triton GPU kernels for EDropout's accelerated path, with thin launch wrappers.

This package knows tensors, not models: ``edropout`` calls it through the ``"triton"`` backend and the
regularizers' ``backend="triton"``, both through the names exported here (this module is the one way in).
Every kernel also runs on CPU in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests it;
``INTERPRET`` says whether it does in this process.
"""

from ._checks import INTERPRET, pow2_between, tf32_allowed
from .bridgeout import bridgeout_mask, bridgeout_weight_triton
from .evolution import make_children, select_and_best
from .fused_energy import population_energies
from ._kept_first import KeptFirstOrder, kept_first_order, kept_first_orders
from .masked_optimizer import fused_masked_step
from .population_batchnorm import population_batchnorm
from .population_conv2d import population_conv2d
from .population_linear import population_linear
from .sparseout import sparseout_mask, sparseout_triton

__all__ = [
    "INTERPRET",
    "KeptFirstOrder",
    "bridgeout_mask",
    "bridgeout_weight_triton",
    "fused_masked_step",
    "kept_first_order",
    "kept_first_orders",
    "make_children",
    "population_batchnorm",
    "population_conv2d",
    "population_energies",
    "population_linear",
    "pow2_between",
    "select_and_best",
    "sparseout_mask",
    "sparseout_triton",
    "tf32_allowed",
]


def __getattr__(name):
    """Deprecated names: ``compact_keep`` is now ``kept_first_order``."""
    if name == "compact_keep":
        import warnings

        warnings.warn("edropout_kernels.compact_keep is now kept_first_order", DeprecationWarning, stacklevel=2)
        return kept_first_order
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
