"""Magnitude filter pruning over the same unit groups as EDropout: the baseline it is compared against.

Each bit's importance is the norm of the filters it owns (every coupled producer's output rows: L1 = summed
absolute values, L2 = root of summed squares). In every group the share ``fraction`` of lowest-importance
units is removed (at least one unit is kept), and the result is a state that ``export_pruned`` removes
physically, exactly as for EDropout. ``conv_filter_units`` restricts the groups to convolution filters, for
the classic "remove the fraction f of filters of every conv layer" protocol (Linear hidden layers unpruned).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .size_target import SizeMeasure
from .units import _CONV, _PRODUCERS, PrunableUnits, discover_units


def unit_norms(model: nn.Module, units: PrunableUnits, norm: str = "l1") -> torch.Tensor:
    """Importance of every unit [D]: the norm of the Conv/Linear output filters it owns."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    total = torch.zeros(units.num_units + 1, dtype=torch.float64)
    for pa in units.param_axes:
        module_name, _, pname = pa.name.rpartition(".")
        if pname != "weight" or 0 not in pa.axes or not isinstance(modules[module_name], _PRODUCERS):
            continue
        rows = params[pa.name].detach().double().cpu().reshape(pa.shape[0], -1)
        per_row = rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1)
        total.index_add_(0, pa.axes[0], per_row)
    total = total[:-1]
    return total if norm == "l1" else total.sqrt()


def magnitude_state(model: nn.Module, units: PrunableUnits, fraction: float, norm: str = "l1") -> torch.Tensor:
    """Keep-state that removes the ``fraction`` of lowest-norm units in every group (at least one kept)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction is the share of units to remove from each group; it must lie in [0, 1], "
                         f"got {fraction}")
    importance = unit_norms(model, units, norm)
    state = torch.ones(units.num_units, dtype=torch.bool)
    for group in units.groups:
        remove = min(group.size - 1, int(fraction * group.size + 0.5))
        if remove:
            weakest = importance[group.first_bit:group.first_bit + group.size].argsort(stable=True)[:remove]
            state[group.first_bit + weakest] = False
    return state


def magnitude_state_for_rate(model: nn.Module, units: PrunableUnits, rate: float, norm: str = "l1",
                             steps: int = 40, metric: str = "params", example_inputs=None) -> torch.Tensor:
    """The per-group magnitude state whose share of ``metric`` removed ("params": trainable parameters, or
    "flops", which needs ``example_inputs``) is closest to ``rate`` (bisection), counted as EDropout's target."""
    measure = SizeMeasure(units, metric, model, example_inputs)
    share = lambda s: float(measure.share_removed(s[None])[0])  # noqa: E731
    low, high = 0.0, 1.0
    best = magnitude_state(model, units, 0.0, norm)
    for _ in range(steps):
        mid = (low + high) / 2
        state = magnitude_state(model, units, mid, norm)
        achieved = share(state)
        if abs(achieved - rate) < abs(share(best) - rate):
            best = state
        low, high = (mid, high) if achieved < rate else (low, mid)
    return best


def conv_filter_units(model: nn.Module, example_inputs) -> PrunableUnits:
    """The unit groups of ``model`` with every non-convolution producer (Linear layers) left unpruned, so a
    magnitude state over them removes conv filters only (with whatever they are coupled to, e.g. the inputs
    of the next layer)."""
    others = [name for name, m in model.named_modules() if isinstance(m, _PRODUCERS) and not isinstance(m, _CONV)]
    return discover_units(model, example_inputs, ignored_layers=others)


def conv_filter_count(model: nn.Module) -> int:
    """Number of convolution output filters in ``model`` (to measure the share an exported copy lost)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, _CONV))
