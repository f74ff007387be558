"""Count the multiply-accumulate work of a model's Conv and Linear layers on one input, to report FLOPs removed."""
from __future__ import annotations

import torch
import torch.nn as nn

from .modes import all_modules_in

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_flops(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """FLOPs (2 × multiply-accumulates) of Conv and Linear layers for one sample shaped like ``example_inputs[0]``."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, _CONV):
            per_output = module.weight[0].numel()  # (in_channels / groups) × kernel
        else:
            per_output = module.in_features
        total += 2 * per_output * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _CONV + (nn.Linear,))]
    try:
        with torch.no_grad(), all_modules_in(model, False):
            model(example_inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``: the size that pruning reports shrink."""
    return sum(p.numel() for p in model.parameters())
