"""Apply one pruning state, or a whole population, to an unmodified model through forward hooks.

A 0 bit makes the unit's activation exactly zero downstream, after its BatchNorm and bias: each mask point's
output is multiplied by its keep-mask. For a population, the input holds S member-major groups of rows and
member s's rows get member s's mask. While scoring, BatchNorm normalises each member with its own batch
statistics and never touches running statistics; everything else runs in eval mode (dropout off), so an
energy is a deterministic function of the state and the batch. Hooks and patches are removed on exit.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modes import all_modules_in
from .units import PrunableUnits, _NORM


def channel_masks(units: PrunableUnits, states: torch.Tensor) -> dict:
    """Keep-masks [S, C] (bool) for every mask point, from states [S, D]."""
    ext = units.extended(states)
    return {p.module_name: ext[:, p.index.to(states.device)] for p in units.mask_points}


def _mask_hook(mask: torch.Tensor, channel_dim: int):
    members, channels = mask.shape

    def hook(module, inputs, output):
        grouped = output.unflatten(0, (members, -1))
        if channel_dim == 1:
            shape = (members, 1, channels) + (1,) * (grouped.dim() - 3)
        else:
            shape = (members,) + (1,) * (grouped.dim() - 2) + (channels,)
        return (grouped * mask.view(shape).to(output.dtype)).flatten(0, 1)

    return hook


@contextlib.contextmanager
def masked(model: nn.Module, units: PrunableUnits, states: torch.Tensor):
    """Within the block, ``model`` computes with ``states`` [S, D] (or one state [D]) applied; input rows are
    member-major. Modules keep their own mode, so BatchNorm behaves as usual (used for training)."""
    states = states.reshape(-1, units.num_units)
    modules = dict(model.named_modules())
    masks = channel_masks(units, states)
    handles = [modules[p.module_name].register_forward_hook(_mask_hook(masks[p.module_name], p.channel_dim))
               for p in units.mask_points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _member_batch_norm(module, members: int):
    """Forward for a BatchNorm that normalises each member's rows with that member's own statistics."""

    def forward(x):
        if members == 1:
            return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
        grouped = x.unflatten(0, (members, -1))
        dims = (1,) + tuple(range(3, grouped.dim()))
        var, mean = torch.var_mean(grouped, dim=dims, correction=0, keepdim=True)
        out = (grouped - mean) * torch.rsqrt(var + module.eps)
        if module.weight is not None:
            shape = (1, 1, -1) + (1,) * (grouped.dim() - 3)
            out = out * module.weight.view(shape) + module.bias.view(shape)
        return out.flatten(0, 1)

    return forward


@contextlib.contextmanager
def scoring(model: nn.Module, units: PrunableUnits, states: torch.Tensor, batch_statistics: bool = True):
    """Score ``states`` [S, D] in one forward of S member-major groups of rows, without changing the model.

    ``batch_statistics=True``: BatchNorm uses each member's own batch statistics (train-mode scoring);
    False: running statistics (eval-mode scoring). No running statistic is updated either way.
    """
    members = states.reshape(-1, units.num_units).shape[0]
    patched = []
    with all_modules_in(model, False):
        try:
            if batch_statistics:
                for m in model.modules():
                    if isinstance(m, _NORM):
                        m.forward = _member_batch_norm(m, members)
                        patched.append(m)
            with masked(model, units, states), torch.no_grad():
                yield
        finally:
            for m in patched:
                del m.forward
