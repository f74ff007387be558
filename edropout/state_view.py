"""One pruning state seen the ways a training step needs it, derived once per state.

The pruner keeps a ``StateView`` of its best state and builds a new one only when the state changes: the masked
optimizer step reads its per-parameter keep-masks, the fused optimizer kernel its row/column keeps, the training
forward its BatchNorm statistics keeps, training on the exported network its kept positions, and ``StepInfo``
its pruning rate. Each is computed on first use, on a host copy of the state, so a step pays only for what its
backend reads and never waits on the device for it.
"""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn as nn

from .host import upload
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
    def point_keeps(self) -> dict:
        """{mask point's module name: keep-mask [C]} for every mask point, on the state's device."""
        return {name: upload(keep, self.state.device) for name, keep in self._host_point_keeps.items()}

    @cached_property
    def _host_point_keeps(self) -> dict:
        ext = self.extended
        return {p.module_name: ext[p.index] for p in self.units.mask_points}

    @cached_property
    def parameter_keeps(self) -> dict:
        """Boolean keep-mask (broadcastable to the parameter) for every parameter of which the state prunes
        something, so that the masked step does no work for untouched parameters."""
        params = dict(self.model.named_parameters())
        ext = self.extended
        keeps = {}
        for pa in self.units.param_axes:
            param = params[pa.name]
            keep = torch.ones((1,) * param.dim(), dtype=torch.bool)
            for dim, index in pa.axes.items():
                shape = [1] * param.dim()
                shape[dim] = -1
                keep = keep & ext[index].view(shape)
            if not keep.all().tolist():
                keeps[param] = upload(keep, param.device)
        return keeps

    @cached_property
    def row_col_keeps(self) -> dict:
        """The same keeps as (row_keep [dim 0] or None, col_keep [dim 1] or None) per parameter a bit can remove:
        the fused optimizer kernel's form."""
        params = dict(self.model.named_parameters())
        ext = self.extended
        return {params[pa.name]: tuple(upload(ext[pa.axes[d]], params[pa.name].device) if d in pa.axes else None
                                       for d in (0, 1))
                for pa in self.units.param_axes}

    @cached_property
    def statistics_keeps(self) -> dict:
        """{BatchNorm module: keep-mask [C]} for every masked BatchNorm that tracks running statistics and has a
        pruned channel."""
        modules = dict(self.model.named_modules())
        return {modules[name]: upload(keep, self.state.device) for name, keep in self._host_point_keeps.items()
                if isinstance(modules[name], _NORM) and modules[name].running_mean is not None
                and not keep.all().tolist()}

    @cached_property
    def statistics_weights(self) -> dict:
        """``statistics_keeps`` as float 1/0 weights in each BatchNorm's statistics dtype (``frozen_statistics``)."""
        modules = dict(self.model.named_modules())
        return {modules[name]: upload(keep.to(modules[name].running_mean.dtype), self.state.device)
                for name, keep in self._host_point_keeps.items()
                if isinstance(modules[name], _NORM) and modules[name].running_mean is not None
                and not keep.all().tolist()}

    @cached_property
    def kept_positions(self) -> dict:
        """For each parameter a bit can remove: {dim: kept positions (CPU)} along its mapped axes."""
        ext = self.extended
        return {pa.name: {dim: ext[index].nonzero().flatten() for dim, index in pa.axes.items()}
                for pa in self.units.param_axes}

    @cached_property
    def pruning_rate(self) -> float:
        """Share of trainable parameters that the state removes when exported."""
        return self.units.pruning_rate(self.host_state.unsqueeze(0))[0].tolist()
