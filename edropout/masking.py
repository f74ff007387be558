"""Apply one pruning state, or a whole population, to an unmodified model through forward hooks.

A 0 bit makes the unit's activation exactly zero downstream, after its BatchNorm and bias: each mask point's
output is multiplied by its keep-mask. For a population, the input holds S member-major groups of rows and
member s's rows get member s's mask. While scoring, BatchNorm normalises each member with its own batch
statistics and never touches running statistics (its own forward runs, so an activation inside a BatchNorm subclass
is kept); everything else runs in eval mode (dropout off), so an energy is a deterministic function of the state
and the batch. Hooks are removed on exit.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torch.utils.weak import WeakIdKeyDictionary

from .modes import all_modules_in
from .units import PrunableUnits, _NORM


_POINT_INDEX: OrderedDict = OrderedDict()


def _point_index(units: PrunableUnits, device) -> torch.Tensor:
    """Every mask point's bit indices, concatenated, on ``device``: copied there once per units and device (a
    copy from the host would wait for the device on CUDA at every training forward)."""
    key = (id(units), str(device))
    hit = _POINT_INDEX.get(key)
    if hit is None or hit[0] is not units:
        hit = _POINT_INDEX[key] = (units, units.point_bits.to(device))
        while len(_POINT_INDEX) > 8:
            _POINT_INDEX.popitem(last=False)
    return hit[1]


def _point_table(units: PrunableUnits, states: torch.Tensor) -> torch.Tensor:
    """Every mask point's keep-mask side by side, [S, sum C] (bool), from states [S, D], in one gather."""
    return units.extended(states)[:, _point_index(units, states.device)]


def _by_point(units: PrunableUnits, table: torch.Tensor) -> dict:
    """{mask point's module name: its columns of ``table``} (views)."""
    masks, first = {}, 0
    for p in units.mask_points:
        masks[p.module_name] = table[:, first:first + p.index.numel()]
        first += p.index.numel()
    return masks


def channel_masks(units: PrunableUnits, states: torch.Tensor) -> dict:
    """Keep-masks [S, C] (bool) for every mask point, from states [S, D], in one gather."""
    return _by_point(units, _point_table(units, states))


def _mask_hook(mask: torch.Tensor, channel_dim: int, converted=None):
    """Forward hook multiplying member s's rows by its keep-mask; ``converted`` (optional) maps a dtype to
    ``mask`` in that dtype, made once (``masked``), instead of a conversion at every call."""
    members, channels = mask.shape

    def hook(module, inputs, output):
        grouped = output.unflatten(0, (members, -1))
        if channel_dim == 1:
            shape = (members, 1, channels) + (1,) * (grouped.dim() - 3)
        else:
            shape = (members,) + (1,) * (grouped.dim() - 2) + (channels,)
        weights = mask.to(output.dtype) if converted is None else converted(output.dtype)
        return (grouped * weights.view(shape)).flatten(0, 1)

    return hook


class _StateMasks:
    """The keep-masks of one states tensor at every mask point, and their conversions to the activations' dtype,
    each made once: ``masked`` reuses them for as long as the same, unmodified states tensor is applied (the
    pruner's best state, every training step). A conversion converts every point's mask in one operation."""

    def __init__(self, units: PrunableUnits, states: torch.Tensor, table: torch.Tensor | None = None):
        self.units, self.version = units, states._version
        states = states.reshape(-1, units.num_units)
        self.table = _point_table(units, states) if table is None else table.reshape(states.shape[0], -1)
        self.masks = _by_point(units, self.table)
        self._converted = {}

    def converted(self, name: str):
        """``dtype -> mask of point name`` in that dtype, cached."""
        def to(dtype):
            if dtype not in self._converted:
                self._converted[dtype] = _by_point(self.units, self.table.to(dtype))
            return self._converted[dtype][name]
        return to


_STATE_MASKS = WeakIdKeyDictionary()  # states tensor -> _StateMasks


def _state_masks(units: PrunableUnits, states: torch.Tensor) -> _StateMasks:
    """The cached ``_StateMasks`` of ``states`` (rebuilt when ``units`` differ or the tensor was modified)."""
    hit = _STATE_MASKS.get(states)
    if hit is None or hit.units is not units or hit.version != states._version:
        hit = _STATE_MASKS[states] = _StateMasks(units, states)
    return hit


def share_masks(units: PrunableUnits, states: torch.Tensor, table: torch.Tensor) -> None:
    """Record ``table`` as the keep-masks of ``states`` (``_point_table``'s layout, made elsewhere: the pruner's best
    state has them from ``StateView.point_table``, derived on the host copy), so that ``masked`` does not derive
    them again on the device."""
    _STATE_MASKS[states] = _StateMasks(units, states, table)


@contextlib.contextmanager
def masked(model: nn.Module, units: PrunableUnits, states: torch.Tensor):
    """Within the block, ``model`` computes with ``states`` [S, D] (or one state [D]) applied; input rows are
    member-major. Modules keep their own mode, so BatchNorm behaves as usual (used for training). The masks are
    built once per states tensor (``_StateMasks``)."""
    modules = dict(model.named_modules())
    cached = _state_masks(units, states)
    handles = [modules[p.module_name].register_forward_hook(
        _mask_hook(cached.masks[p.module_name], p.channel_dim, cached.converted(p.module_name)))
        for p in units.mask_points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def member_batch_norm(x: torch.Tensor, members: int, weight, bias, eps: float) -> torch.Tensor:
    """BatchNorm of ``members`` member-major groups of rows, each normalised by its own batch statistics (biased
    variance, as F.batch_norm in training); no running statistic is read or written."""
    if members == 1:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    grouped = x.unflatten(0, (members, -1))
    dims = (1,) + tuple(range(3, grouped.dim()))
    var, mean = torch.var_mean(grouped, dim=dims, correction=0, keepdim=True)
    out = (grouped - mean) * torch.rsqrt(var + eps)
    shape = (1, 1, -1) + (1,) * (grouped.dim() - 3)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out.flatten(0, 1)


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class MemberStatistics(TorchFunctionMode):
    """While a normalisation module runs (``active`` > 0), its ``F.batch_norm`` calls normalise each member's rows
    with that member's own batch statistics and update no running statistic: every call with ``batch_statistics``,
    else only those that ask for batch statistics (training, or no running statistics). The module's own forward
    runs otherwise unchanged and in eval mode, so what a subclass does besides normalising (timm's
    ``BatchNormAct2d``: a drop and an activation) is kept. ``calls`` counts the calls it normalised."""

    def __init__(self, members: int, batch_statistics: bool, active: int = 0):
        super().__init__()
        self.members, self.batch_statistics, self.active, self.calls = members, batch_statistics, active, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and self.active:
            bound = dict(zip(_BATCH_NORM_ARGS, args), **kwargs)
            if self.batch_statistics or bound.get("training", False) or bound["running_mean"] is None:
                self.calls += 1
                return member_batch_norm(bound["input"], self.members, bound.get("weight"), bound.get("bias"),
                                         bound.get("eps", 1e-5))
        return func(*args, **kwargs)


_WARNED = set()


def warn_if_not_normalised(module: nn.Module, normalised: bool) -> None:
    """One warning per class whose forward computed without F.batch_norm: its own (running) statistics were used,
    since per-member batch statistics can only be fed through F.batch_norm."""
    kind = type(module)
    if normalised or kind in _WARNED:
        return
    _WARNED.add(kind)
    warnings.warn(f"{kind.__name__} is a BatchNorm whose forward does not call torch.nn.functional.batch_norm; "
                  f"it is scored with its own statistics (running statistics in eval mode), not each candidate's "
                  f"batch statistics", RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def member_statistics(norms, members: int, batch_statistics: bool):
    """Within the block, the BatchNorm modules ``norms`` compute with ``MemberStatistics`` (see there), through
    their own forward; hooks are removed on exit."""
    mode = MemberStatistics(members, batch_statistics)
    seen = {}

    def enter(module, inputs):
        mode.active += 1
        seen[module] = mode.calls

    def leave(module, inputs, output):
        mode.active -= 1
        if batch_statistics:
            warn_if_not_normalised(module, mode.calls > seen.pop(module))

    handles = [h for m in norms for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with mode if handles else contextlib.nullcontext():  # no Python hop per op for a model without BatchNorm
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def scoring(model: nn.Module, units: PrunableUnits, states: torch.Tensor, batch_statistics: bool = True):
    """Score ``states`` [S, D] in one forward of S member-major groups of rows, without changing the model.

    ``batch_statistics=True``: BatchNorm uses each member's own batch statistics (train-mode scoring);
    False: running statistics (eval-mode scoring). No running statistic is updated either way. Every module runs
    its own forward in eval mode; BatchNorm modules (subclasses included) get their statistics through
    ``member_statistics``.
    """
    members = states.reshape(-1, units.num_units).shape[0]
    norms = [m for m in model.modules() if isinstance(m, _NORM)]
    with all_modules_in(model, False), member_statistics(norms, members, batch_statistics), \
            masked(model, units, states), torch.no_grad():
        yield
