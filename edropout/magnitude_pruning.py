"""Magnitude filter pruning (METHOD.md §8): after training, remove the fraction f of filters with the
smallest norm in every layer, without fine-tuning.

Ranking (which filters go) is kept apart from removal (how they are cut out). Per-layer ranking ignores
channel coupling; `group_filter_masks` and `prune_filters_by_magnitude` honour it: layers whose output
channels must go together (e.g. both sides of a residual add) are ranked by the joint norm of their
coupled filters (L2: sqrt of the summed squares; L1: summed absolute values), so every decision can be
removed physically. Removal uses torch-pruning's DependencyGraph.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["filter_norms", "l2_filter_ranking", "magnitude_filter_masks", "keep_mask_from_norms",
           "group_filter_masks", "prune_filters_by_magnitude", "default_prunable_layers"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LayerSpec = Optional[Iterable[Union[str, nn.Module]]]


def default_prunable_layers(model: nn.Module, include_linear: bool = False) -> List[str]:
    """Names of every Conv layer (plus hidden Linear layers if asked), minus the classifier, taken as the
    last Conv/Linear layer in registration order."""
    kinds = _CONV + (nn.Linear,)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    named = named[:-1]
    return [n for n, m in named if isinstance(m, _CONV) or (include_linear and isinstance(m, nn.Linear))]


def _resolve(model: nn.Module, layers: LayerSpec, include_linear: bool) -> List[str]:
    if layers is None:
        return default_prunable_layers(model, include_linear)
    by_name = dict(model.named_modules())
    by_id = {id(m): n for n, m in by_name.items()}
    names = []
    for item in layers:
        name = item if isinstance(item, str) else by_id.get(id(item))
        if name not in by_name or not isinstance(by_name[name], _CONV + (nn.Linear,)):
            raise KeyError(f"{item!r} is not a Conv/Linear submodule; pass names from model.named_modules().")
        names.append(name)
    return names


def _norm_per_filter(weight: torch.Tensor, norm: str) -> torch.Tensor:
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    if norm == "l2":
        return rows.norm(p=2, dim=1)
    if norm == "l1":
        return rows.abs().sum(dim=1)
    raise ValueError(f"norm={norm!r} is not supported; use 'l2' or 'l1'.")


def filter_norms(model: nn.Module, norm: str = "l2", layers: LayerSpec = None,
                 include_linear: bool = False) -> Dict[str, torch.Tensor]:
    """{layer name: norm of each output filter's weights} (bias excluded)."""
    mods = dict(model.named_modules())
    return {n: _norm_per_filter(mods[n].weight, norm) for n in _resolve(model, layers, include_linear)}


def l2_filter_ranking(model: nn.Module, layers: LayerSpec = None,
                      include_linear: bool = False) -> Dict[str, torch.Tensor]:
    """{layer name: filter indices sorted by L2 norm, weakest first (ties by index)}."""
    return {n: v.argsort(stable=True) for n, v in filter_norms(model, "l2", layers, include_linear).items()}


def keep_mask_from_norms(norms: torch.Tensor, fraction: float) -> torch.BoolTensor:
    """Keep all but the round(f·n) smallest-norm filters, always keeping at least one (ties by index)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is the share of filters to remove; use 0 <= fraction <= 1.")
    n = norms.numel()
    n_remove = min(n - 1, int(math.floor(fraction * n + 0.5)))
    keep = torch.ones(n, dtype=torch.bool)
    if n_remove > 0:
        keep[norms.argsort(stable=True)[:n_remove]] = False
    return keep


def magnitude_filter_masks(model: nn.Module, fraction: float, norm: str = "l2", layers: LayerSpec = None,
                           include_linear: bool = False) -> Dict[str, torch.BoolTensor]:
    """{layer name: bool keep mask over its filters}, ranked within each layer (channel coupling ignored)."""
    return {n: keep_mask_from_norms(v, fraction)
            for n, v in filter_norms(model, norm, layers, include_linear).items()}


def _build_graph(model: nn.Module, example_inputs):
    """Trace `model` with torch-pruning, restoring each module's train/eval flag afterwards."""
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _plan(model: nn.Module, dg, fraction: float, norm: str, names: List[str]
          ) -> List[Tuple[str, List[int], Dict[str, torch.Tensor]]]:
    """One entry per prunable channel group whose root is a chosen layer: (root name, root channel
    indices to remove, {coupled layer name: its keep mask})."""
    import torch_pruning as tp

    mod2name = {m: n for n, m in model.named_modules()}
    chosen = {m for n, m in model.named_modules() if n in set(names)}
    ignored = [m for m in model.modules() if isinstance(m, _CONV + (nn.Linear,)) and m not in chosen]
    plan = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_CONV + (nn.Linear,)):
        root = group[0].dep.target.module
        n_root = dg.get_out_channels(root)
        score = torch.zeros(n_root)
        members = []
        for item in group:
            mod = item.dep.target.module
            if not (isinstance(mod, _CONV + (nn.Linear,)) and dg.is_out_channel_pruning_fn(item.dep.handler)):
                continue
            per = _norm_per_filter(mod.weight, norm)[list(item.idxs)]
            per = per.pow(2) if norm == "l2" else per
            score.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), per)
            members.append((mod, list(item.idxs), list(item.root_idxs)))
        score = score.sqrt() if norm == "l2" else score
        keep_root = keep_mask_from_norms(score, fraction)
        remove = [int(i) for i in torch.nonzero(~keep_root).flatten()]
        if not remove:
            continue
        check = dg.get_pruning_group(root, group[0].dep.handler, remove)
        if not dg.check_pruning_group(check):
            warnings.warn(f"skipping channel group rooted at {mod2name[root]!r}: removing "
                          f"{len(remove)} channels would empty a coupled layer.")
            continue
        masks = {}
        for mod, idxs, root_idxs in members:
            keep = torch.ones(dg.get_out_channels(mod), dtype=torch.bool)
            keep[[i for i, r in zip(idxs, root_idxs) if not keep_root[r]]] = False
            masks[mod2name[mod]] = keep
        plan.append((mod2name[root], remove, masks))
    return plan


def group_filter_masks(model: nn.Module, example_inputs, fraction: float, norm: str = "l2",
                       ignored_layers: Optional[Sequence[Union[str, nn.Module]]] = None,
                       include_linear: bool = False) -> Dict[str, torch.BoolTensor]:
    """{layer name: keep mask} exactly as `prune_filters_by_magnitude` removes it: coupled layers share
    one decision ranked by their joint norm. Traces a deep copy; `model` is not touched."""
    work = copy.deepcopy(model)
    names = _chosen_names(work, ignored_layers, include_linear)
    dg = _build_graph(work, example_inputs)
    masks: Dict[str, torch.BoolTensor] = {}
    for _, _, group_masks in _plan(work, dg, fraction, norm, names):
        masks.update(group_masks)
    return masks


def _chosen_names(model: nn.Module, ignored_layers, include_linear: bool) -> List[str]:
    names = default_prunable_layers(model, include_linear)
    if ignored_layers:
        skip = set(_resolve(model, ignored_layers, include_linear))
        names = [n for n in names if n not in skip]
    return names


def prune_filters_by_magnitude(model: nn.Module, example_inputs, fraction: float, norm: str = "l2",
                               ignored_layers: Optional[Sequence[Union[str, nn.Module]]] = None,
                               include_linear: bool = False) -> nn.Module:
    """Deep-copy `model` and physically remove the fraction f of weakest filters of every Conv layer
    (and hidden Linear layers if asked), never the classifier; returns the smaller copy.

    A group that torch-pruning cannot shrink safely is skipped with a warning.
    """
    work = copy.deepcopy(model)
    names = _chosen_names(work, ignored_layers, include_linear)
    dg = _build_graph(work, example_inputs)
    modules = dict(work.named_modules())
    for root_name, remove, _ in _plan(work, dg, fraction, norm, names):
        root = modules[root_name]
        fn = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, fn, remove).prune()
    return work
