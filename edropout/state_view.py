"""One pruning state seen the ways a training step needs it, derived once per state.

The pruner keeps a ``StateView`` of its best state and builds a new one only when the state changes: the masked
optimizer step reads its per-parameter keep-masks, the fused optimizer kernel its row/column keeps, the training
forward its BatchNorm statistics keeps, training on the exported network its kept positions, and ``StepInfo``
its pruning rate. Each is computed on first use, on a host copy of the state, so a step pays only for what its
backend reads and never waits on the device for it; what a step reads on the device reaches it in one packed
transfer (``host.upload``), so a new best state costs the device one copy, not one per mask.
"""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn as nn

from . import host
from .units import _NORM, PrunableUnits


class StateView:
    """Everything derived from one state [D] of ``units`` on ``model``, each part computed on first use.

    The parts are computed on a host copy of the state (``host_state`` when the caller already has one, as the
    pruner has from its one transfer per iteration; else copied once) and uploaded without blocking, so deriving
    them never waits on the device."""

    def __init__(self, model: nn.Module, units: PrunableUnits, state: torch.Tensor, host_state=None):
        self.model, self.units, self.state = model, units, state
        self._host_state = host_state

    @cached_property
    def host_state(self) -> torch.Tensor:
        """The state [D] on the host."""
        return self._host_state if self._host_state is not None else self.state.cpu()

    @cached_property
    def extended(self) -> torch.Tensor:
        """The host state [D + 1] with the trailing always-kept bit, so bit index D means 'never pruned'."""
        return self.units.extended(self.host_state.reshape(1, -1))[0]

    @cached_property
    def _host_point_table(self) -> torch.Tensor:
        """Every mask point's keep-mask side by side (``units.point_bits`` order) on the host: one gather."""
        return self.extended[self.units.point_bits]

    @cached_property
    def _host_axis_keeps(self) -> dict:
        """{(parameter name, dim): keep-mask along that axis} on the host, views of one gather."""
        axes, bits = self.units.axis_bits
        return dict(zip([(pa.name, dim) for pa, dim in axes],
                        _split(self.extended[bits], [pa.axes[dim].numel() for pa, dim in axes])))

    @cached_property
    def _tracked_norms(self) -> dict:
        """{masked BatchNorm that tracks running statistics and has a pruned channel: its mask point's name}."""
        modules = dict(self.model.named_modules())
        bits = self._host_point_table.tolist()  # one conversion for every point's test
        found, first = {}, 0
        for p in self.units.mask_points:
            module, size = modules[p.module_name], p.index.numel()
            if isinstance(module, _NORM) and module.running_mean is not None and not all(bits[first:first + size]):
                found[module] = p.module_name
            first += size
        return found

    @cached_property
    def _on_device(self) -> dict:
        """What a step reads on the device, sent in one transfer per device (``host.upload``): the point table
        ("points"), every parameter axis's keep-mask ((name, dim)) and the tracked BatchNorms' statistics
        weights (their modules), in each BatchNorm's statistics dtype (converted on the host, once per dtype)."""
        params = dict(self.model.named_parameters())
        parts = {"points": (self._host_point_table, self.state.device)}
        parts.update({key: (keep, params[key[0]].device) for key, keep in self._host_axis_keeps.items()})
        keeps = dict(zip((p.module_name for p in self.units.mask_points),
                         _split(self._host_point_table, [p.index.numel() for p in self.units.mask_points])))
        names = self._tracked_norms
        by_dtype = {}
        for module in self._tracked_norms:
            by_dtype.setdefault(module.running_mean.dtype, []).append(module)
        for dtype, modules in by_dtype.items():
            weights = torch.cat([keeps[names[m]] for m in modules]).to(dtype)
            for m, w in zip(modules, _split(weights, [keeps[names[m]].numel() for m in modules])):
                parts[m] = (w, self.state.device)
        return _on_devices(parts)

    @cached_property
    def point_table(self) -> torch.Tensor:
        """Every mask point's keep-mask side by side [sum C] (``units.point_bits`` order), on the state's device:
        the layout of ``masking``'s training masks."""
        return self._on_device["points"]

    @cached_property
    def point_keeps(self) -> dict:
        """{mask point's module name: keep-mask [C]} for every mask point, on the state's device."""
        return dict(zip((p.module_name for p in self.units.mask_points),
                        _split(self.point_table, [p.index.numel() for p in self.units.mask_points])))

    @cached_property
    def parameter_keeps(self) -> dict:
        """Boolean keep-mask (broadcastable to the parameter) for every parameter of which the state prunes
        something, so that the masked step does no work for untouched parameters."""
        params = dict(self.model.named_parameters())
        axis_keeps = self._host_axis_keeps
        keeps = {}
        for pa in self.units.param_axes:
            param = params[pa.name]
            keep = torch.ones((1,) * param.dim(), dtype=torch.bool)
            for dim in pa.axes:
                shape = [1] * param.dim()
                shape[dim] = -1
                keep = keep & axis_keeps[(pa.name, dim)].view(shape)
            if not keep.all().tolist():
                keeps[param] = (keep, param.device)
        return _on_devices(keeps)

    @cached_property
    def row_col_keeps(self) -> dict:
        """The same keeps as (row_keep [dim 0] or None, col_keep [dim 1] or None) per parameter a bit can remove:
        the fused optimizer kernel's form."""
        params = dict(self.model.named_parameters())
        on_device = self._on_device
        return {params[pa.name]: tuple(on_device.get((pa.name, d)) for d in (0, 1)) for pa in self.units.param_axes}

    @cached_property
    def statistics_keeps(self) -> dict:
        """{BatchNorm module: keep-mask [C]} for every masked BatchNorm that tracks running statistics and has a
        pruned channel."""
        return {m: self.point_keeps[name] for m, name in self._tracked_norms.items()}

    @cached_property
    def statistics_weights(self) -> dict:
        """``statistics_keeps`` as float 1/0 weights in each BatchNorm's statistics dtype (``frozen_statistics``)."""
        return {m: self._on_device[m] for m in self._tracked_norms}

    @cached_property
    def kept_positions(self) -> dict:
        """For each parameter a bit can remove: {dim: kept positions (CPU)} along its mapped axes."""
        axis_keeps = self._host_axis_keeps
        return {pa.name: {dim: axis_keeps[(pa.name, dim)].nonzero().flatten() for dim in pa.axes}
                for pa in self.units.param_axes}

    @cached_property
    def pruning_rate(self) -> float:
        """Share of trainable parameters that the state removes when exported."""
        return self.units.pruning_rate(self.host_state.unsqueeze(0))[0].tolist()


class _AllKept:
    """The view of a network of which nothing is pruned (the exported network that trains after convergence): no
    keep-mask, so a backend's masked update of it is the plain update."""

    parameter_keeps: dict = {}
    row_col_keeps: dict = {}


#: The one ``_AllKept`` view (it holds nothing that changes).
ALL_KEPT = _AllKept()


def _on_devices(parts: dict) -> dict:
    """{key: copy of a host tensor on its device} from {key: (host tensor, device)}: one transfer per device
    (``host.upload``)."""
    by_device = {}
    for key, (tensor, device) in parts.items():
        by_device.setdefault(torch.device(device), []).append((key, tensor))
    out = {}
    for device, items in by_device.items():
        out.update(zip([k for k, _ in items], host.upload([t for _, t in items], device)))
    return {key: out[key] for key in parts}


def _split(table: torch.Tensor, sizes) -> list:
    """Consecutive pieces of ``table`` (1-D) of the given sizes, as views."""
    out, first = [], 0
    for size in sizes:
        out.append(table[first:first + size])
        first += size
    return out
