"""Noise regularizers from METHOD.md §7–8: Sparseout on activations, (Batch) Bridgeout on weights, and plain
dropout after activations (the baseline they are compared with)."""
from .bridgeout import (BatchBridgeout, BatchBridgeoutConv2d, BatchBridgeoutLinear, Bridgeout,
                        BridgeoutConv2d, BridgeoutLinear, abs_pow, apply_batch_bridgeout,
                        apply_bridgeout, bridgeout_weight, remove_bridgeout,
                        smallest_magnitude_mask)
from .dropout import ActivationDropout, apply_dropout, disable_dropout, remove_dropout
from .sparseout import Sparseout, draw_keep_mask, sparseout, sparseout_grad_factor

__all__ = [
    "Sparseout", "sparseout", "sparseout_grad_factor", "draw_keep_mask",
    "Bridgeout", "BatchBridgeout", "BridgeoutLinear", "BridgeoutConv2d",
    "BatchBridgeoutLinear", "BatchBridgeoutConv2d", "bridgeout_weight", "abs_pow",
    "smallest_magnitude_mask", "apply_bridgeout", "apply_batch_bridgeout", "remove_bridgeout",
    "ActivationDropout", "apply_dropout", "remove_dropout", "disable_dropout",
]
