"""The compact backend's static plan: the model traced once with torch.fx, every node classified by how it treats
a channel-compact input, and the graph split into a shared part (independent of the state: computed once per
call) and a per-member part.

Decisions taken here, once per (model, units, scoring mode), so that the per-member loop only executes:
- which channel map (bits per channel) each mask point applies, deduplicated so equal maps share ``Channels``;
- which producers (Conv/Linear) compute only their kept rows: their own mask point's, or, when their only consumer
  is a masked BatchNorm (the "redundant producer" of ``units``), that BatchNorm's;
- in eval-mode scoring, which BatchNorms fold into the producer before them (exact: a per-channel affine map);
- which nodes are shared: a node that no mask point reaches is the same for every member (e.g. the stem conv),
  and a mask point fed only by shared nodes is computed densely once, with the activations and pooling that
  follow it, and then only sliced per member.
Anything the plan cannot represent exactly raises ``CompactUnsupported`` and the caller falls back.
"""
from __future__ import annotations

import builtins
import contextlib
import itertools
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..modes import all_modules_in
from ..units import _CONV, _NORM, PrunableUnits, stock_forward


class CompactUnsupported(Exception):
    """The model cannot be scored exactly by the compact interpreter; the reason is the message."""


class Ref:
    """An argument that is the value of another node (its slot in the environment)."""

    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot


class Step:
    """One node to execute: ``kind`` picks the handler; ``target`` is a module name, callable or method name."""

    __slots__ = ("kind", "target", "args", "kwargs", "slot", "rows", "mask", "mask_dim", "fold", "passthrough",
                 "spatial", "mutates", "inplace", "free", "name")

    def __init__(self, kind, target, args, kwargs, slot, name):
        self.kind, self.target, self.args, self.kwargs, self.slot, self.name = kind, target, args, kwargs, slot, name
        self.rows = self.mask = self.fold = None
        self.mask_dim = 1
        self.passthrough = False
        self.spatial = 0
        self.mutates = False
        self.inplace = None  # an in-place version of this op, set where the plan proves it safe
        self.free = ()


class Plan:
    """Shared steps (once per call), member steps (once per member), the channel maps, and the output slot."""

    def __init__(self, shared, member, maps, slots, output, units, layer_macs):
        self.shared, self.member, self.maps, self.slots, self.output = shared, member, maps, slots, output
        self.units = units
        self.modules = sorted({s.target for s in shared + member if s.kind in _MODULE_KINDS})
        self.layer_macs = layer_macs  # Conv/Linear module name -> multiply-adds per input sample (dense model)


# ----- what each op does to a channel-compact tensor --------------------------------------------------------------
# Dropout modules: the identity in eval mode (scoring); a training plan runs them for real (``_compact_exec``).
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Modules that act elementwise and map 0 to 0, as out-of-place functions of (module, x) in eval mode.
ZERO_MODULES = {
    nn.ReLU: lambda m, x: F.relu(x), nn.ReLU6: lambda m, x: F.relu6(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope), nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.CELU: lambda m, x: F.celu(x, m.alpha), nn.SELU: lambda m, x: F.selu(x),
    nn.GELU: lambda m, x: F.gelu(x, approximate=m.approximate), nn.SiLU: lambda m, x: F.silu(x),
    nn.Mish: lambda m, x: F.mish(x), nn.Hardswish: lambda m, x: F.hardswish(x), nn.Tanh: lambda m, x: torch.tanh(x),
    nn.Softsign: lambda m, x: F.softsign(x), nn.Tanhshrink: lambda m, x: F.tanhshrink(x),
    nn.Hardshrink: lambda m, x: F.hardshrink(x, m.lambd), nn.Softshrink: lambda m, x: F.softshrink(x, m.lambd),
    nn.Identity: lambda m, x: x, **{dropout: lambda m, x: x for dropout in DROPOUT_MODULES},
}
# Pooling modules act per channel on (N, C, *spatial) and map an all-zero channel to zeros.
POOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
                nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
ZERO_FUNCTIONS = {torch.relu, F.relu, torch.relu_, F.relu_, torch.tanh, F.tanh, F.relu6, F.leaky_relu, F.elu,
                  F.gelu, F.silu, F.mish, F.hardswish, F.softsign}
_OUT_OF_PLACE = {torch.relu_: torch.relu, F.relu_: F.relu}
# pooling functions -> (spatial dims, number of positional args allowed: beyond it, return_indices may be set)
POOL_FUNCTIONS = {F.max_pool1d: (1, 6), F.max_pool2d: (2, 6), F.max_pool3d: (3, 6), F.avg_pool1d: (1, 7),
                  F.avg_pool2d: (2, 7), F.avg_pool3d: (3, 7), F.adaptive_avg_pool1d: (1, 2),
                  F.adaptive_avg_pool2d: (2, 2), F.adaptive_avg_pool3d: (3, 2), F.adaptive_max_pool1d: (1, 2),
                  F.adaptive_max_pool2d: (2, 2), F.adaptive_max_pool3d: (3, 2)}
ZERO_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach"}
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
BINARY_FUNCTIONS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub",
                    operator.isub: "sub", torch.sub: "sub", operator.mul: "mul", operator.imul: "mul",
                    torch.mul: "mul", operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
                    torch.true_divide: "div"}
BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                  "div": "div", "div_": "div", "true_divide": "div"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
SHAPE_METHODS = {"size", "dim", "numel"}
_MODULE_KINDS = {"conv", "linear", "bn", "norm_module", "zero_module", "pool_module", "flatten_module", "module"}


def _method_caller(name):
    def call(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)

    return call


class _Tracer(fx.Tracer):
    """fx's tracer, with every Conv/Linear/BatchNorm (subclasses included) kept as one call: mask points must be
    module calls, and a subclass's extra work (an activation inside a BatchNorm) then runs as its own forward."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _CONV + (nn.Linear,) + _NORM) or super().is_leaf_module(m, module_qualified_name)


def classify(node: fx.Node, modules: dict):
    """(kind, target) of a node: how the interpreter runs it."""
    op, target = node.op, node.target
    if op in ("placeholder", "get_attr", "output"):
        return op, target
    if op == "call_module":
        mod = modules[target]
        if isinstance(mod, _NORM):
            return ("bn" if stock_forward(mod) else "norm_module"), target
        if isinstance(mod, _CONV) and mod.groups == 1 and stock_forward(mod):
            return "conv", target
        if isinstance(mod, nn.Linear) and stock_forward(mod):
            return "linear", target
        if type(mod) in ZERO_MODULES:
            return "zero_module", target
        if type(mod) in POOL_MODULES and not getattr(mod, "return_indices", False):
            return "pool_module", target
        if type(mod) is nn.Flatten:
            return "flatten_module", target
        return "module", target
    if op == "call_function":
        if target in ZERO_FUNCTIONS:
            return "zero", _OUT_OF_PLACE.get(target, target)
        if target in POOL_FUNCTIONS:
            spatial, positional = POOL_FUNCTIONS[target]
            if len(node.args) <= positional and not node.kwargs.get("return_indices", False):
                return "pool", target
            return "function", target
        if target is torch.flatten:
            return "flatten", target
        if target is torch.reshape:
            return "view", target
        if target in REDUCE_FUNCTIONS:
            return "reduce", REDUCE_FUNCTIONS[target]
        if target in BINARY_FUNCTIONS:
            return "binary", BINARY_FUNCTIONS[target]
        if target in CAT_FUNCTIONS:
            return "cat", target
        if target is builtins.getattr:
            return "getattr", target
        return "function", target
    # call_method
    if target in ZERO_METHODS:
        return "zero", _method_caller(target.rstrip("_") if target.endswith("_") else target)
    if target == "flatten":
        return "flatten", target
    if target in ("view", "reshape"):
        return "view", target
    if target in REDUCE_METHODS:
        return "reduce", target
    if target in BINARY_METHODS:
        return "binary", BINARY_METHODS[target]
    if target in SHAPE_METHODS:
        return "shape", target
    return "method", target


@contextlib.contextmanager
def _untouched(model: nn.Module):
    """Within the block the model's buffers and the random state may move; on exit both are as they were."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers()) if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def trace(model: nn.Module, training: bool = False) -> fx.Graph:
    """The model's fx graph, traced in eval mode for scoring, or in each module's own mode for a training plan:
    training flags read while tracing (``F.dropout(x, p, self.training)``, torchvision's fx-wrapped
    ``stochastic_depth(x, p, mode, self.training)``) are baked into the graph, so a training plan holds only for
    the modes it was traced in (``compact.plan_for`` keys it by them). A model that draws random numbers while
    being traced would have them baked in as constants: refused."""
    state = torch.get_rng_state()
    with contextlib.ExitStack() as stack:
        if not training:
            stack.enter_context(all_modules_in(model, False))
        stack.enter_context(_untouched(model))
        graph = _Tracer().trace(model)
        if not torch.equal(torch.get_rng_state(), state):
            raise CompactUnsupported("the model draws random numbers while torch.fx traces it (they would become "
                                     "constants of the graph)")
    return graph


def _mutates(node: fx.Node, modules: dict) -> bool:
    """Whether the op writes into its first argument in eager mode."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return node.kwargs.get("inplace", False) is True or getattr(node.target, "__name__", "").endswith("_") \
            or node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    return False


def _shapes(model: nn.Module, graph: fx.Graph, example: torch.Tensor) -> dict:
    """Shape of each node's tensor value on ``example`` (eval mode, no gradients); {} if that fails."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:  # a training graph may hold baked train-mode ops (dropout): they must not move the RNG or statistics
        with torch.no_grad(), all_modules_in(model, False), _untouched(model):
            ShapeProp(fx.GraphModule(model, graph)).propagate(example)
        return {n: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes
                if hasattr(n.meta.get("tensor_meta"), "shape")}
    except Exception:  # shapes only enable Linear->BatchNorm1d fusion and the cost estimate of ``auto``
        return {}


def build_plan(model: nn.Module, units: PrunableUnits, example: torch.Tensor, batch_statistics: bool,
               training: bool = False) -> Plan:
    """Trace and classify ``model`` for ``units``; ``example`` is a small input batch (for tensor ranks only).

    ``training=True`` plans one member's training forward under autograd: every step in graph order (so ops that
    draw random numbers draw them as the eager forward does), every producer computing only kept rows, no
    in-place ops and no folded BatchNorm."""
    try:
        graph = trace(model, training)
    except CompactUnsupported:
        raise
    except Exception as exc:
        raise CompactUnsupported(f"torch.fx could not trace the model ({type(exc).__name__}: {exc})") from exc
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    slot = {n: i for i, n in enumerate(nodes)}
    kinds = {n: classify(n, modules) for n in nodes}
    points = {p.module_name: p for p in units.mask_points}
    called = {n.target for n in nodes if n.op == "call_module"}
    missing = sorted(set(points) - called)
    if missing:
        raise CompactUnsupported(f"mask points {missing} are not called as modules in the traced graph")
    for n in nodes:
        if _mutates(n, modules) and n.args and isinstance(n.args[0], fx.Node) and len(n.args[0].users) > 1:
            raise CompactUnsupported(f"{n.name} writes in place into a value that other ops read")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if any(n.args == () for n in placeholders[1:]):
        raise CompactUnsupported("the model's forward takes more than one required input")
    maps, map_ids = [], {}
    for name, p in points.items():
        pad = p.channel_dim == 1  # conv channels get padded for oneDNN; Linear features do not
        for i, (index, padding) in enumerate(maps):
            if padding == pad and index.shape == p.index.shape and torch.equal(index, p.index):
                map_ids[name] = i
                break
        else:
            map_ids[name] = len(maps)
            maps.append((p.index.clone(), pad))
    shapes = _shapes(model, graph, example)
    ndims = {n: len(shape) for n, shape in shapes.items()}

    def is_mask(n):
        return n.op == "call_module" and n.target in points

    dependent = {}
    for n in nodes:
        dependent[n] = is_mask(n) or any(dependent[i] for i in n.all_input_nodes)
    use_running = {name for name, m in modules.items() if isinstance(m, _NORM) and not batch_statistics
                   and m.running_mean is not None and not training}

    shared, member, order, extra = [], [], [], len(nodes)
    steps = {}
    dense_slot = dict(slot)  # where each node's full-width value lives
    pending = {}  # node -> (map id, channel dim): computed once at full width, each member only slices it
    for n in nodes:
        kind, target = kinds[n]
        defer = not training and _defers(n, kind, pending, dependent)
        if not defer:
            for i in n.all_input_nodes:
                if i in pending and slot[i] == dense_slot[i]:  # the first per-member reader: slice it here
                    select = Step("select", None, (Ref(dense_slot[i]),), {}, extra, i.name + "[kept]")
                    select.mask, select.mask_dim = pending[i]
                    member.append(select)
                    order.append(select)
                    slot[i] = extra
                    extra += 1
        reads = dense_slot if defer else slot
        step = Step(kind, target, _refs(n.args, reads), _refs(n.kwargs, reads), dense_slot[n], n.name)
        steps[n] = step
        step.mutates = _mutates(n, modules)
        if n.op == "placeholder":
            step.args = (n.args[0],) if n.args else ()
            step.kind = "input" if n is placeholders[0] else "constant"
        if kind == "pool":
            step.spatial = POOL_FUNCTIONS[target][0]
        if kind == "pool_module":
            step.spatial = POOL_MODULES[type(modules[target])]
        inputs_shared = not any(dependent[i] for i in n.all_input_nodes)
        order.append(step)
        if is_mask(n) and inputs_shared and not training:
            shared.append(step)
            pending[n] = (map_ids[n.target], points[n.target].channel_dim)
            continue
        if defer:
            # a per-channel op of a sliced value commutes with the slice: run it once at full width
            shared.append(step)
            pending[n] = pending[n.args[0]]
            continue
        if is_mask(n):
            step.mask, step.mask_dim = map_ids[n.target], points[n.target].channel_dim
            if kind in ("conv", "linear"):
                step.rows = step.mask
        (member if dependent[n] else shared).append(step)
    for n in nodes:
        _fuse_with_norm(n, steps, modules, points, map_ids, dependent, use_running, ndims, training)
    if training:
        shared, member = [], order  # one member: nothing to share, and graph order keeps random draws in place
    else:
        _set_inplace(nodes, steps, modules, {s.slot for s in member})
    _set_frees(member)
    output = next(steps[n].slot for n in nodes if n.op == "output")
    return Plan(shared, member, maps, extra, output, units, _layer_macs(nodes, modules, shapes, example.shape[0]))


_PER_CHANNEL = {"zero", "zero_module", "pool", "pool_module"}


def _defers(n, kind, pending, dependent) -> bool:
    """Whether ``n`` is a per-channel op (activation, pooling) of a value that members only slice, with nothing
    else per-member among its inputs: then it runs once at full width and the slice moves after it."""
    if kind not in _PER_CHANNEL or not n.args or n.args[0] not in pending:
        return False
    if kind in ("pool", "pool_module") and pending[n.args[0]][1] != 1:
        return False  # pooling reduces the dims after the channel dim 1 only
    return not any(dependent[i] for i in n.all_input_nodes if i is not n.args[0])


def _layer_macs(nodes, modules, shapes, batch):
    """Dense multiply-adds per sample of every Conv/Linear call, from the traced output shapes."""
    macs = {}
    for n in nodes:
        mod = modules.get(n.target) if n.op == "call_module" else None
        if n not in shapes or not isinstance(mod, _CONV + (nn.Linear,)):
            continue
        per_output = mod.in_features if isinstance(mod, nn.Linear) else \
            mod.in_channels // mod.groups * int(torch.tensor(mod.kernel_size).prod())
        outputs = int(torch.tensor(shapes[n]).prod()) // max(batch, 1)
        macs[n.target] = macs.get(n.target, 0) + outputs * per_output
    return macs


def _fuse_with_norm(n, steps, modules, points, map_ids, dependent, use_running, ndims, training):
    """A per-member Conv/Linear (not itself masked) whose only consumer is a BatchNorm computes only the rows that
    BatchNorm keeps, and in eval-mode scoring carries the BatchNorm folded into its weights. A training plan has
    one member, so there a shared producer (the stem) computes only kept rows too."""
    step = steps[n]
    if step.kind not in ("conv", "linear") or not (dependent[n] or training) or step.mask is not None \
            or len(n.users) != 1:
        return
    user = next(iter(n.users))
    if steps[user].kind != "bn" or user.args != (n,) or user.kwargs:
        return
    if step.kind == "linear" and ndims.get(n) != 2:
        return  # BatchNorm1d normalises dim 1, which is the Linear's feature dim only for 2-D inputs
    if user.target in points:
        step.rows = map_ids[user.target]
    if user.target in use_running:
        step.fold = user.target
        steps[user].passthrough = True


def _refs(value, slot):
    """Node arguments with every fx.Node replaced by a Ref to its slot."""
    if isinstance(value, fx.Node):
        return Ref(slot[value])
    if isinstance(value, list):  # fx's immutable lists become plain lists
        return [_refs(v, slot) for v in value]
    if isinstance(value, tuple):
        return tuple(_refs(v, slot) for v in value)
    if isinstance(value, dict):
        return {k: _refs(v, slot) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_refs(value.start, slot), _refs(value.stop, slot), _refs(value.step, slot))
    return value


# ops whose result is a new tensor that nothing else holds
_FRESH_KINDS = {"conv", "linear", "bn", "binary", "cat", "pool", "pool_module"}
_RELU = {torch.relu, F.relu, torch.relu_, F.relu_}


def _set_inplace(nodes, steps, modules, member_slots):
    """ReLU (module, function or method) and add/sub/mul may overwrite their first input when that input is a
    fresh per-member tensor read by nothing else: one allocation (and its page faults) less per op."""
    def fresh(node):
        step = steps[node]
        if step.slot not in member_slots or len(node.users) != 1:
            return False
        if step.kind == "zero_module":
            return type(modules[node.target]) is nn.ReLU
        return step.kind in _FRESH_KINDS or (step.kind == "zero" and node.target in _RELU)

    for n in nodes:
        step = steps[n]
        if step.slot not in member_slots or not n.args or not isinstance(n.args[0], fx.Node) or not fresh(n.args[0]):
            continue
        relu = (n.op == "call_module" and type(modules[n.target]) is nn.ReLU) or \
            (n.op == "call_function" and n.target in _RELU) or (n.op == "call_method" and n.target in ("relu", "relu_"))
        if relu and len(n.args) == 1 and set(n.kwargs) <= {"inplace"}:
            step.inplace = torch.relu_
        elif step.kind == "binary" and step.target in ("add", "sub", "mul") and set(n.kwargs) <= {"alpha"}:
            step.inplace = step.target + "_"


def _set_frees(member):
    """Release each per-member slot after its last per-member reader, so activations do not pile up."""
    last = {}
    for i, step in enumerate(member):
        for s in _slots(step.args) + _slots(step.kwargs):
            last[s] = i
    frees = {}
    for s, i in last.items():
        frees.setdefault(i, []).append(s)
    for i, step in enumerate(member):
        step.free = tuple(frees.get(i, ()))


def _slots(value):
    if type(value) is Ref:
        return [value.slot]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _slots(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _slots(v)]
    if isinstance(value, slice):
        return _slots(value.start) + _slots(value.stop) + _slots(value.step)
    return []
