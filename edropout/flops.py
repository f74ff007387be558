"""Count the multiply-accumulate work of a model's Conv and Linear layers on one input, to report FLOPs removed."""
from __future__ import annotations

import torch
import torch.nn as nn

from .modes import all_modules_in

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def flops_per_weight(model: nn.Module, example_inputs: torch.Tensor) -> dict:
    """FLOPs each weight element of every Conv/Linear module costs on one sample shaped like ``example_inputs[0]``
    ({module name: 2 × output positions per output channel, summed over calls}): a layer's FLOPs are this factor
    times the number of elements of its weight, which is why pruning a weight's rows or columns removes FLOPs in
    proportion."""
    factors = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        name = names[module]
        factors[name] = factors.get(name, 0) + 2 * (output[0].numel() // module.weight.shape[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _CONV + (nn.Linear,))]
    try:
        with torch.no_grad(), all_modules_in(model, False):
            model(example_inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return factors


def count_flops(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """FLOPs (2 × multiply-accumulates) of Conv and Linear layers for one sample shaped like ``example_inputs[0]``."""
    modules = dict(model.named_modules())
    return sum(factor * modules[name].weight.numel() for name, factor in flops_per_weight(model, example_inputs).items())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``: the size that pruning reports shrink."""
    return sum(p.numel() for p in model.parameters())
