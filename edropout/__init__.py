"""edropout: energy-based pruning (EDropout) for PyTorch models, with a reference path and fast paths."""
from .pruner import EDropout, StepInfo
from .units import PrunableUnits, discover_units
from . import _moved

_moved.install()

__all__ = ["EDropout", "StepInfo", "PrunableUnits", "discover_units"]
__version__ = "0.1.0"
