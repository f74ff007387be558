"""Physical export: a deep copy of the model with the pruned channels removed (torch-pruning does the surgery).

The masked model and the exported one compute the same outputs, because a pruned unit's activation is exactly
zero after its BatchNorm, and a zero input channel contributes nothing to the next layer.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .modes import all_modules_in
from .units import PrunableUnits


def export_pruned(model: nn.Module, units: PrunableUnits, state: torch.Tensor, example_inputs) -> nn.Module:
    """A physically smaller copy of ``model`` with every unit whose bit is 0 in ``state`` removed."""
    import torch_pruning as tp

    if not units.traced:
        raise RuntimeError("export() needs the channel dependency graph, but tracing this model failed (see the "
                           "warning at construction); only the masked model is available")
    state = state.reshape(-1).bool().cpu()
    small = copy.deepcopy(model)
    with all_modules_in(small, False):
        graph = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs)
    modules = dict(small.named_modules())
    for group in units.groups:
        bits = state[group.first_bit:group.first_bit + group.size]
        pruned = (~bits).nonzero().flatten().tolist()
        if len(pruned) == group.size:
            raise ValueError(f"the state removes every unit of the group rooted at {group.module_name}, which would "
                             f"disconnect the network; such a state cannot be exported")
        if pruned:
            root = modules[group.module_name]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, handler, pruned).prune()
    return small
