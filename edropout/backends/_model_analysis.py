"""Facts about a model and its prunable units that the plan engines share: the compact backend's fx plan, the
triton backend's hook probe and the auto backend's cost rule each read them here instead of re-deriving them.

- which bits prune each axis of a layer's weight (``weight_axes``);
- which producers ``units`` leaves unmasked because the BatchNorm after them masks their channels
  (``redundant_producer``: masking after that BatchNorm suffices, ``edropout.units`` decides it);
- an eval-mode BatchNorm as a per-channel scale and shift, for folding it into the producer before it
  (``running_scale_shift``);
- whether user hooks could see or change a module's output, so an engine must run that module as PyTorch does
  (``has_forward_hooks``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..units import PrunableUnits


def weight_axes(units: PrunableUnits, name: str) -> dict:
    """{dim: LongTensor of bit indices} of the weight of module ``name`` ("" for the root module): dim 0 pruned by
    its output channels' bits, dim 1 by its input channels' bits; index ``units.num_units`` means never pruned.
    Empty when no bit prunes that weight."""
    full = f"{name}.weight" if name else "weight"
    for pa in units.param_axes:
        if pa.name == full:
            return pa.axes
    return {}


def redundant_producer(units: PrunableUnits, name: str) -> bool:
    """Whether ``units`` gives the output channels of layer ``name`` bits but masks them only after the
    BatchNorms of its group, which the traced dependency graph shows to be its only consumers (the layer's own
    output stays unmasked, which keeps their running statistics true for revived channels). Untraced units (the
    per-layer fallback) give no such guarantee: False there."""
    return (units.traced and weight_axes(units, name).get(0) is not None
            and all(point.module_name != name for point in units.mask_points))


def running_scale_shift(bn: nn.Module, dtype: torch.dtype):
    """Eval-mode ``bn`` as a per-channel (scale, shift) in ``dtype``: bn(x) = x·scale + shift with its running
    statistics, affine weight and bias."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def has_forward_hooks(modules) -> bool:
    """Whether a forward (pre-)hook is registered on any of ``modules`` or globally: it could look at or change an
    output that an engine computes another way (folded, gathered, fused), so such modules run as PyTorch does."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
