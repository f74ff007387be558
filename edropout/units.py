"""Prunable unit groups of any ``nn.Module``: which channels share a bit, where masks apply, what each bit owns.

A *unit* is one output channel of a Conv or one output feature of a Linear layer (the classifier's
outputs excluded). Channels that must be removed together (joined by a residual add, a concat, a following
BatchNorm, the next layer's inputs) share one bit, found with torch-pruning's dependency graph, so that
every state can be removed physically. If tracing fails, or its grouping runs past a time and memory budget
(``budget``: torch-pruning can blow up on window-attention reshapes), the failed trace is released and we fall
back to one bit per channel of every layer the forward calls, with a warning that names the part.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from .budget import BudgetExceeded, budget
from .modes import all_modules_in

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = _CONV + (nn.Linear,)
# torch-pruning graph nodes that only route channels (no parameters, zero stays zero through them).
_ROUTING_OPS = {"_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp"}


def stock_forward(module: nn.Module) -> bool:
    """Whether a Conv/Linear/BatchNorm computes exactly what its torch.nn class computes (no subclass forward such
    as timm's ``BatchNormAct2d`` or ``Conv2dSame``, no replaced forward): only then may a backend compute it
    functionally instead of calling it."""
    base = next((b for b in _PRODUCERS + _NORM if isinstance(module, b)), None)
    return base is not None and "forward" not in vars(module) and type(module).forward is base.forward


@dataclass
class MaskPoint:
    """A module whose output is multiplied by the keep-mask: ``index[c]`` is channel c's bit (D = never pruned)."""

    module_name: str
    channel_dim: int
    index: torch.Tensor


@dataclass
class ParamAxes:
    """How a trainable parameter's axes map to bits: ``axes[dim][position]`` is a bit index (D = never pruned)."""

    name: str
    shape: tuple
    axes: dict = field(default_factory=dict)


@dataclass
class GroupRoot:
    """One dependency group: the module whose output channels define it and the bits it owns, in order."""

    module_name: str
    first_bit: int
    size: int
    members: list


@dataclass
class PrunableUnits:
    """Everything the engine needs to know about a model's prunable units, derived once from the model."""

    num_units: int
    mask_points: list
    param_axes: list
    groups: list
    total_parameters: int
    traced: bool
    classifier: str

    def extended(self, states: torch.Tensor) -> torch.Tensor:
        """States [S, D] with a trailing always-kept column, so index D means 'never pruned'."""
        return F.pad(states.bool(), (0, 1), value=True)

    @cached_property
    def point_bits(self) -> torch.Tensor:
        """Every mask point's bit indices, concatenated in ``mask_points`` order (on the host): one gather from an
        extended state gives every point's keep-mask."""
        if not self.mask_points:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([p.index.to(torch.long) for p in self.mask_points])

    @cached_property
    def axis_bits(self) -> tuple:
        """((``ParamAxes``, dim) for every mapped axis, in ``param_axes`` order; their bit indices concatenated, on
        the host): one gather gives every parameter axis's keep-mask."""
        axes = [(pa, dim) for pa in self.param_axes for dim in sorted(pa.axes)]
        bits = torch.cat([pa.axes[dim] for pa, dim in axes]) if axes else torch.zeros(0, dtype=torch.long)
        return axes, bits

    def kept_parameters(self, states: torch.Tensor) -> torch.Tensor:
        """Exact number of trainable parameters left when each state [S, D] is removed physically."""
        states = states.reshape(-1, self.num_units)
        ext = self.extended(states).to(torch.float64)
        kept = torch.full((states.shape[0],), float(self.untouched_parameters), dtype=torch.float64,
                          device=states.device)
        for pa in self.param_axes:
            count = torch.ones_like(kept)
            rest = 1
            for dim, size in enumerate(pa.shape):
                if dim in pa.axes:
                    count = count * ext[:, pa.axes[dim].to(states.device)].sum(dim=1)
                else:
                    rest *= size
            kept = kept + count * rest
        return kept.round().long()

    @property
    def untouched_parameters(self) -> int:
        """Trainable parameters that no bit can remove."""
        return self.total_parameters - sum(_numel(pa.shape) for pa in self.param_axes)

    def pruning_rate(self, states: torch.Tensor) -> torch.Tensor:
        """Share of trainable parameters removed by each state (0 = nothing removed)."""
        return 1.0 - self.kept_parameters(states).double() / float(self.total_parameters)

    @property
    def unit_parameters(self) -> torch.Tensor:
        """Parameters removed when only that unit is pruned (LongTensor[D]); interactions are not additive."""
        full = torch.ones(1, self.num_units, dtype=torch.bool)
        base = self.kept_parameters(full)[0]
        singles = ~torch.eye(self.num_units, dtype=torch.bool)
        return base - self.kept_parameters(singles)

    @property
    def group_of_unit(self) -> torch.Tensor:
        """Index of the group each bit belongs to (LongTensor[D])."""
        return torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(self.groups)])

    def describe(self) -> str:
        """One line per group: root module and number of bits, for logs and reports."""
        return "\n".join(f"{g.module_name}: {g.size} units ({len(g.members)} coupled modules)" for g in self.groups)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def find_classifier(model: nn.Module, example_inputs) -> str:
    """Name of the last Conv/Linear module run in a forward pass: its outputs are the logits, never pruned."""
    order = []
    _run_hooked(model, example_inputs, [m.register_forward_hook(lambda mod, i, o, n=name: order.append(n))
                                        for name, m in model.named_modules() if isinstance(m, _PRODUCERS)])
    if not order:
        raise ValueError("the model has no Conv or Linear layer, so it has no prunable units; EDropout prunes "
                         "output channels of Conv1d/2d/3d and output features of Linear layers")
    return order[-1]


def _run_hooked(model, example_inputs, hooks) -> None:
    """One eval-mode forward without gradients that feeds ``hooks``, which are removed afterwards."""
    try:
        model_outputs(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()


def model_outputs(model, example_inputs):
    """The model's eval-mode output on ``example_inputs``, without gradients or state changes."""
    with torch.no_grad():
        return _forward(model, example_inputs)


def _forward(model, example_inputs):
    with all_modules_in(model, False):
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)


def discover_units(model: nn.Module, example_inputs, ignored_layers=None) -> PrunableUnits:
    """Find the prunable unit groups of ``model`` by tracing it on ``example_inputs``.

    ``ignored_layers`` (modules or names) keep their outputs; the classifier (last Conv/Linear run) always does.
    """
    names = {m: n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    classifier = find_classifier(model, example_inputs)
    ignored = {classifier}
    for layer in ignored_layers or []:
        name = layer if isinstance(layer, str) else names.get(layer)
        if name not in by_name:
            raise ValueError(f"ignored layer {layer!r} is not a module of this model; pass modules of the model "
                             f"or names from model.named_modules()")
        ignored.add(name)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups, failure = _guarded(lambda where: _traced_groups(model, example_inputs, ignored, names, where))
    traced = failure is None
    if not traced:
        gc.collect()  # the failed trace (graph, index lists) is unreachable now: free it before the fallback
        warnings.warn(f"dependency tracing failed ({failure}); falling back to one bit per layer channel. Coupled "
                      f"channels (residual adds, concats) are then not removed together and export() is "
                      f"unavailable.", RuntimeWarning, stacklevel=3)
        groups = _per_layer_groups(model, example_inputs, ignored, names)
    if traced and groups:
        groups = _removable(model, example_inputs, groups, _assemble(model, groups, total, traced, classifier))
    if not groups:
        raise ValueError("the model has no prunable units: every Conv/Linear output is the classifier, ignored, or "
                         "coupled to an ignored layer; pass fewer ignored_layers or a model with hidden layers")
    return _assemble(model, groups, total, traced, classifier)


def _consumers(model, units):
    """Layers whose input channels a bit removes: name -> (input channel dim, bit of each input channel)."""
    modules = dict(model.named_modules())
    found = {}
    for pa in units.param_axes:
        name, _, pname = pa.name.rpartition(".")
        module = modules.get(name)
        if pname != "weight" or module is None:
            continue
        if isinstance(module, nn.Linear) and 1 in pa.axes:
            found[name] = (-1, pa.axes[1])
        elif isinstance(module, _CONV) and 1 in pa.axes:
            found[name] = (1, pa.axes[1])
        elif isinstance(module, _CONV) and module.groups == module.in_channels > 1 and 0 in pa.axes:
            found[name] = (1, pa.axes[0])  # depthwise: input channel c is output channel c
    return found


def _removable(model, example_inputs, groups, units):
    """The traced groups whose pruned channels reach every layer that export() would cut as exact zeros.

    torch-pruning maps channels through reshapes as if they kept their order; a channel shuffle (view, transpose,
    view) moves them, and an op that maps 0 to a non-zero value (a sigmoid between a mask and the next layer)
    revives them. Either way removing the channel would change the network, so the masked model and the export
    would differ. Masked forwards of two complementary random states find such bits; their groups are left
    unpruned, with a warning."""
    if not torch.is_tensor(example_inputs) or example_inputs.shape[0] == 0:
        return groups
    from .masking import masked  # masking builds on this module

    half = torch.rand(units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    revived = set()
    modules = dict(model.named_modules())
    for state in (half, ~half):  # one forward per state: a model may mix the rows of its batch
        pruned = ~units.extended(state[None].to(example_inputs.device))[0]

        def check(dim, index):
            def hook(module, inputs):
                x = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
                if x is None or x.dim() < 2:
                    return
                live = (x.movedim(dim, -1).reshape(-1, x.shape[dim]).abs().amax(dim=0) > 0) & pruned[index]
                revived.update(index[live].tolist())
            return hook

        hooks = [modules[name].register_forward_pre_hook(check(dim, index.to(pruned.device)))
                 for name, (dim, index) in _consumers(model, units).items()]
        try:
            with masked(model, units, state.to(example_inputs.device)):
                model_outputs(model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
    kept = []
    for group, root in zip(groups, units.groups):
        if any(root.first_bit <= bit < root.first_bit + root.size for bit in revived):
            warnings.warn(f"group rooted at {root.module_name} is not prunable: its removed channels reach a later "
                          f"layer as non-zero values (moved by a channel shuffle or revived by an op that maps 0 to "
                          f"something else), so removing them would change the network", RuntimeWarning,
                          stacklevel=4)
            continue
        kept.append(group)
    return kept


# Budget of torch-pruning's grouping (``budget``): seconds, and resident memory beyond that at its start, in bytes.
# The torchvision and timm models of benchmarks/model_zoo.py group in seconds and far below it.
GROUPING_SECONDS = 300.0
GROUPING_EXTRA_BYTES = 2 * 2 ** 30


class _Grouping:
    """Where torch-pruning's grouping is: the graph being built (None once built), then the root being grouped."""

    def __init__(self):
        self.part = "while building the dependency graph"


def _guarded(make_groups):
    """(groups, None) from ``make_groups(where)`` run under the grouping budget, or (None, one line saying why and
    where it failed). No frame of a failed trace outlives this call (the exception and its traceback die here)."""
    where = _Grouping()
    guard = None
    try:
        with budget(GROUPING_SECONDS, GROUPING_EXTRA_BYTES) as guard, warnings.catch_warnings():
            # torch-pruning warns once per node where its shape inference gives up; the budget bounds what follows
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            return make_groups(where), None
    except BudgetExceeded:
        return None, (f"torch-pruning's grouping stopped {where.part}: {guard.reason}. Passing that part's "
                      f"layers in ignored_layers, or a smaller example input, may let the rest be traced")
    except MemoryError:
        return None, (f"torch-pruning's grouping ran out of memory {where.part}. Passing that part's "
                      f"layers in ignored_layers, or a smaller example input, may let the rest be traced")
    except Exception as exc:  # tracing user models can fail in many ways; the fallback is documented
        return None, f"{type(exc).__name__}: {exc}"


def _traced_groups(model, example_inputs, ignored, names, where=None):
    """Groups from torch-pruning's dependency graph, as lists of (module_name, handler, positions, root_idxs).
    ``where`` (a ``_Grouping``) is kept up to date with the part being grouped, for error messages."""
    import torch_pruning as tp

    where = where or _Grouping()
    with all_modules_in(model, False):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    ignored_modules = [m for m, n in names.items() if n in ignored]
    group_of = graph.get_pruning_group

    def tracked(module, *args, **kwargs):
        where.part = f"at the group rooted at {names.get(module, type(module).__name__)}"
        return group_of(module, *args, **kwargs)

    graph.get_pruning_group = tracked
    result = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=list(_PRODUCERS)):
        members, reason = [], None
        for item in group.items:
            module = item.dep.target.module
            handler = item.dep.handler.__name__
            kind = type(module).__name__
            if kind in _ROUTING_OPS:
                continue
            if not isinstance(module, _PRODUCERS + _NORM):
                reason = f"it couples a {kind}"
                break
            if isinstance(module, _CONV) and module.groups not in (1, module.in_channels):
                reason = f"it couples grouped convolution {names[module]}"
                break
            role = "out" if "out" in handler else "in"
            members.append((names[module], role, list(map(int, item.idxs)), list(map(int, item.root_idxs))))
        if reason is not None:
            warnings.warn(f"group rooted at {names[group.items[0].dep.target.module]} is not prunable: {reason}, "
                          f"which EDropout cannot mask exactly", RuntimeWarning, stacklevel=4)
            continue
        result.append((members, _redundant_masks(graph, group, names)))
    return result


def _redundant_masks(graph, group, names):
    """Producers whose every consumer is a BatchNorm of the same group: masking after that BatchNorm suffices,
    and leaving the producer unmasked keeps the BatchNorm's running statistics true for revived channels."""
    norms = {item.dep.target.module for item in group.items if isinstance(item.dep.target.module, _NORM)}
    redundant = set()
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, _PRODUCERS) and module in graph.module2node:
            outputs = graph.module2node[module].outputs
            if outputs and all(o.module in norms for o in outputs):
                redundant.add(names[module])
    return redundant


def _per_layer_groups(model, example_inputs, ignored, names):
    """Fallback: one bit per output channel of each Conv/Linear the forward calls; a BatchNorm fed directly by it is
    masked instead."""
    produced, follows, called = {}, {}, set()

    def remember(mod, inp, out):
        produced[id(out)] = names[mod]
        called.add(mod)

    def pair(mod, inp):
        src = produced.get(id(inp[0]))
        if src is not None:
            follows[src] = names[mod]

    hooks = [m.register_forward_hook(remember) for m in names if isinstance(m, _PRODUCERS)]
    _run_hooked(model, example_inputs, hooks + [m.register_forward_pre_hook(pair) for m in names
                                                 if isinstance(m, _NORM)])
    result = []
    for module, name in names.items():
        if not isinstance(module, _PRODUCERS) or name in ignored or module not in called:
            continue  # a layer whose forward never runs (its weights used functionally) has no output to mask
        if isinstance(module, _CONV) and module.groups != 1:
            continue
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        members = [(name, "out", list(range(width)), list(range(width)))]
        redundant = set()
        if name in follows:
            members.append((follows[name], "out", list(range(width)), list(range(width))))
            redundant.add(name)
        result.append((members, redundant))
    return result


def _assemble(model, groups, total, traced, classifier) -> PrunableUnits:
    """Turn per-group channel maps into bit indices for mask points and parameter axes."""
    modules = dict(model.named_modules())
    sizes = [1 + max(r for _, _, _, roots in members for r in roots) for members, _ in groups]
    num_units = sum(sizes)
    masks, axes, roots = {}, {}, []
    first = 0
    for (members, redundant), size in zip(groups, sizes):
        roots.append(GroupRoot(members[0][0], first, size, sorted({m[0] for m in members})))
        for name, role, positions, root_idxs in members:
            module = modules[name]
            bits = [first + r for r in root_idxs]
            if role == "out" and name not in redundant:
                width = _width(module, "out")
                point = masks.setdefault(name, MaskPoint(name, _channel_dim(module),
                                                         torch.full((width,), num_units, dtype=torch.long)))
                point.index[positions] = torch.tensor(bits)
            for pname, dim in _param_dims(module, role):
                param = getattr(module, pname)
                if param is None or not param.requires_grad:
                    continue
                full = f"{name}.{pname}" if name else pname
                pa = axes.setdefault(full, ParamAxes(full, tuple(param.shape)))
                index = pa.axes.setdefault(dim, torch.full((param.shape[dim],), num_units, dtype=torch.long))
                index[positions] = torch.tensor(bits)
        first += size
    return PrunableUnits(num_units, list(masks.values()), list(axes.values()), roots, total, traced, classifier)


def _width(module, role):
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, _NORM):
        return module.num_features
    return module.out_channels if role == "out" else module.in_channels


def _param_dims(module, role):
    """(parameter name, axis) pairs that a channel of this module's output ("out") or input ("in") owns."""
    if isinstance(module, _NORM):
        return [("weight", 0), ("bias", 0)]
    depthwise = isinstance(module, _CONV) and module.groups > 1
    if role == "out" or depthwise:
        return [("weight", 0), ("bias", 0)]
    return [("weight", 1)]
