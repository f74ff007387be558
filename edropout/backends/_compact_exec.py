"""Executing a compact plan: the shared steps once, then every member's steps on channel-compact tensors.

Conv/Linear layers run on gathered weights ``W[kept_out][:, kept_in]`` (cached per call by the identity of the
deduplicated ``Channels``, so members that share a group's bits share the gather), BatchNorm on gathered
parameters with the member's own batch statistics (or running statistics, folded into the producer), routing ops
(residual adds, concats, flatten/view, pooling, zero-preserving activations, reductions over non-channel dims)
carry the kept channel lists along, and any other op sees the tensor scattered back to full width.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..masking import MemberStatistics, warn_if_not_normalised
from ._compact_plan import DROPOUT_MODULES, POOL_MODULES, ZERO_MODULES, Plan, Ref
from ._compact_values import ChannelTable, Packed, _as_rows, _channels_last, align, dense, dense_tree, select
from ._model_analysis import running_scale_shift

# Convolutions run in channels-last layout, oneDNN's fast path on CPU. Measured (batch 128, min of 12, 2 threads):
# 3×3 conv 16→16 at 28×28 NCHW 25.6 ms vs channels-last 2.7 ms; 2×2 max-pool of 128×8×28×28 (1 thread)
# 4.8 ms vs 0.8 ms; train-mode BatchNorm of 128×16×28×28 (1 thread) 3.6 ms vs 1.6 ms.
CHANNELS_LAST = True
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}


class Context:
    """What the handlers read during one call: modules, the current member's channels, per-call caches."""

    def __init__(self, model, table: ChannelTable, batch_statistics: bool, x: torch.Tensor, train: bool):
        self.model = model
        self.modules = dict(model.named_modules())
        self.table = table
        self.batch_statistics = batch_statistics
        self.x = x
        self.train = train  # a training forward: modules' own modes, running statistics updated
        self.chans = None
        self.cache = {}


def _load(value, env):
    kind = type(value)
    if kind is Ref:
        return env[value.slot]
    if kind is tuple or kind is list:
        return kind(_load(v, env) for v in value)
    if kind is dict:
        return {k: _load(v, env) for k, v in value.items()}
    if kind is slice:
        return slice(_load(value.start, env), _load(value.stop, env), _load(value.step, env))
    return value


def _cached(ctx, key, make):
    found = ctx.cache.get(key)
    if found is None:
        found = ctx.cache[key] = make()
    return found[0]


# ----- layers with parameters ------------------------------------------------------------------------------------
def _producer_params(step, ctx, mod):
    """The layer's (weight, bias), with the following eval-mode BatchNorm folded in when the plan says so."""
    weight, bias = mod.weight, mod.bias
    if step.fold is None:
        return weight, bias
    bn = ctx.modules[step.fold]
    scale, shift = running_scale_shift(bn, bn.running_var.dtype)
    weight = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    return weight, shift if bias is None else bias * scale + shift


def _gathered(step, ctx, mod, cin, rows):
    """Weight rows ``rows`` and input columns ``cin`` (None = all) of a Conv/Linear; cached per call."""
    def make():
        weight, bias = _cached(ctx, ("params", step.slot), lambda: (_producer_params(step, ctx, mod),))
        if rows is not None:  # padded rows get zero weights and bias: their outputs are exactly zero
            weight = rows.zero_pads(weight.index_select(0, rows.index), 0)
            bias = None if bias is None else rows.zero_pads(bias.index_select(0, rows.index), 0)
        if cin is not None:
            weight = weight.index_select(1, cin.index)
        return (weight, bias), cin, rows  # holding cin/rows keeps their ids valid for the call

    return _cached(ctx, ("w", step.slot, id(cin), id(rows)), make)


def _run_producer(step, ctx, x, channel_dim, compute, width):
    rows = None if step.rows is None else ctx.chans[step.rows]
    cin = None
    if type(x) is Packed:
        if x.dim == channel_dim(x.data):
            cin, x = x.channels, x.data
        else:
            x = x.dense()
    weight, bias = _gathered(step, ctx, ctx.modules[step.target], cin, rows)
    out = compute(x, weight, bias)
    return out if rows is None else Packed(out, channel_dim(out), rows, width)


def conv(step, ctx, args, kwargs):
    mod = ctx.modules[step.target]
    x = args[0]

    def compute(x, weight, bias):
        if x.dim() == 4 and _unsafe_nhwc_backward(mod, x):
            out = mod._conv_forward(x.contiguous(), weight, bias)
            return out.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else out
        if CHANNELS_LAST and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            # a one-channel input cannot tell the layouts apart and yields NCHW: convert, pooling needs NHWC
            return mod._conv_forward(x, weight, bias).contiguous(memory_format=torch.channels_last)
        return mod._conv_forward(x, weight, bias)

    return _run_producer(step, ctx, x, lambda t: 1, compute, mod.out_channels)


def _unsafe_nhwc_backward(mod, x) -> bool:
    """oneDNN computes wrong weight gradients (or hangs) for channels-last 1x1 convolutions with stride > 1 and
    fewer input channels than its channel block (uxlfoundation/oneDNN#6035; measured here with torch 2.13: 1x1
    stride 2 with 2-7 input channels, relative errors up to 1.5). Those run NCHW when gradients are needed."""
    return torch.is_grad_enabled() and x.shape[1] < 16 and all(k == 1 for k in mod.kernel_size) \
        and any(s > 1 for s in mod.stride)


def linear(step, ctx, args, kwargs):
    mod = ctx.modules[step.target]
    return _run_producer(step, ctx, args[0], lambda t: t.dim() - 1, F.linear, mod.out_features)


def batch_norm(step, ctx, args, kwargs):
    x = args[0]
    if step.passthrough:  # folded into the producer
        return x
    mod = ctx.modules[step.target]
    chans = None if step.mask is None else ctx.chans[step.mask]
    if chans is None:
        return _norm(ctx, mod, dense(x), mod.weight, mod.bias, mod.running_mean, mod.running_var, None)
    data = align(x, 1, chans)

    def make():
        def pick(t):
            return None if t is None else t.index_select(0, chans.index)
        # zero scale and shift in padded channels keep them exactly zero, with batch or running statistics
        n = chans.index.shape[0]
        weight = chans.zero_pads(pick(mod.weight) if mod.weight is not None else data.new_ones(n), 0)
        bias = chans.zero_pads(pick(mod.bias) if mod.bias is not None else data.new_zeros(n), 0)
        return (weight, bias, pick(mod.running_mean), pick(mod.running_var)), chans

    params = _cached(ctx, ("bn", step.slot, id(chans)), make)
    return Packed(_norm(ctx, mod, data, *params, chans), 1, chans, mod.num_features)


def _norm(ctx, mod, x, weight, bias, mean, var, chans):
    """BatchNorm of the stored channels ``chans`` (None: all) with gathered parameters and running statistics."""
    if ctx.train:
        return _train_norm(ctx, mod, x, weight, bias, mean, var, chans)
    if ctx.batch_statistics or mean is None:  # each member's own batch statistics, nothing updated
        return _batch_norm(x, weight, bias, mod.eps)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, mod.eps)


def _batch_norm(x, weight, bias, eps, running=None, factor=0.0):
    """Batch-statistics BatchNorm; ``running`` (mean, var), if given, is updated in place with ``factor``."""
    if x.dim() == 4 and x.shape[1] % 16 and _channels_last(x):
        return _batch_norm_rows(x, weight, bias, eps, running, factor)
    mean, var = running if running is not None else (None, None)
    return F.batch_norm(x, mean, var, weight, bias, True, factor, eps)


def _train_norm(ctx, mod, x, weight, bias, mean, var, chans):
    """What the BatchNorm module computes in its own mode; with batch statistics, the running statistics of the
    kept channels move exactly as the dense module moves them (pruned channels' statistics stay as they are)."""
    if mean is None or not mod.training:
        return F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, mod.eps)
    factor = mod.momentum
    if mod.num_batches_tracked is not None:
        mod.num_batches_tracked.add_(1)
        if factor is None:  # cumulative average, as nn.BatchNorm
            factor = 1.0 / float(mod.num_batches_tracked)
    out = _batch_norm(x, weight, bias, mod.eps, (mean, var), factor)
    if chans is not None:  # ``mean`` and ``var`` are gathered copies: write the kept channels back
        positions, kept = ctx.table.unpadded(chans)
        with torch.no_grad():
            mod.running_mean.index_copy_(0, kept.index, mean.index_select(0, positions))
            mod.running_var.index_copy_(0, kept.index, var.index_select(0, positions))
    return out


def _batch_norm_rows(x, weight, bias, eps, running=None, factor=0.0):
    """Train-mode BatchNorm of a channels-last tensor on its (N·H·W, C) matrix view, two-pass (mean, then mean
    squared deviation, as F.batch_norm). PyTorch's channels-last kernel is fast only for C a multiple of 16; for
    other widths this is 1.4-3.4× faster (batch 128, 2 threads: C=8 at 28×28 0.84 vs 2.82 ms, C=24 at 14×14 0.43
    vs 0.88 ms, C=40 at 7×7 0.19 vs 0.26 ms). Under autograd it runs out of place."""
    n, c, h, w = x.shape
    rows = _as_rows(x)
    count = rows.shape[0]
    mean = rows.sum(0) / count
    centered = rows - mean
    var = (centered * centered).sum(0) / count
    if running is not None:  # as F.batch_norm: the running variance takes the unbiased estimate
        with torch.no_grad():
            running[0].mul_(1 - factor).add_(mean, alpha=factor)
            running[1].mul_(1 - factor).add_(var, alpha=factor * count / max(count - 1, 1))
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if torch.is_grad_enabled():
        out = centered * scale if bias is None else torch.addcmul(bias, centered, scale)
    else:
        out = centered.mul_(scale) if bias is None else centered.mul_(scale).add_(bias)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def select_kept(step, ctx, args, kwargs):
    value = args[0]
    return select(value, step.mask_dim % value.dim(), ctx.chans[step.mask])


# ----- ops that carry kept channels along ------------------------------------------------------------------------
def _same_packed(x, out):
    return Packed(out, x.dim, x.channels, x.width)


def _without_inplace(kwargs):
    return {k: v for k, v in kwargs.items() if k != "inplace"} if "inplace" in kwargs else kwargs


def zero(step, ctx, args, kwargs):
    if step.inplace is not None:  # the plan proved the input is a fresh tensor nobody else reads
        x = args[0]
        return _same_packed(x, step.inplace(x.data)) if type(x) is Packed else step.inplace(x)
    x, rest, kwargs = args[0], dense_tree(args[1:]), _without_inplace(dense_tree(kwargs))
    if type(x) is Packed:
        return _same_packed(x, step.target(x.data, *rest, **kwargs))
    return step.target(x, *rest, **kwargs)


def zero_module(step, ctx, args, kwargs):
    if step.inplace is not None:
        return zero(step, ctx, args, kwargs)
    mod = ctx.modules[step.target]
    x = args[0]
    if ctx.train and mod.training and isinstance(mod, DROPOUT_MODULES):
        # full width and the layout of the eager forward (that of the input): the same random draws land on the
        # same elements as in the masked dense forward
        full = dense(x)
        if not _channels_last(ctx.x):
            full = full.contiguous()
        return mod(full)
    fn = ZERO_MODULES[type(mod)]
    return _same_packed(x, fn(mod, x.data)) if type(x) is Packed else fn(mod, x)


def _pools(x, spatial):
    return type(x) is Packed and x.dim == 1 and x.data.dim() == spatial + 2


def pool(step, ctx, args, kwargs):
    x, rest = args[0], args[1:]
    if _pools(x, step.spatial):
        return _same_packed(x, step.target(x.data, *rest, **kwargs))
    return step.target(dense(x), *rest, **kwargs)


def pool_module(step, ctx, args, kwargs):
    mod = ctx.modules[step.target]
    x = args[0]
    return _same_packed(x, mod(x.data)) if _pools(x, POOL_MODULES[type(mod)]) else mod(dense(x))


def _flatten(ctx, x, start, end):
    if type(x) is not Packed:
        return torch.flatten(x, start, end)
    nd = x.data.dim()
    start, end = start % nd, end % nd
    if start >= end:
        return x
    if x.dim < start:
        return Packed(x.data.flatten(start, end), x.dim, x.channels, x.width)
    if x.dim > end:
        return Packed(x.data.flatten(start, end), x.dim - (end - start), x.channels, x.width)
    channels, data = x.channels, x.data
    if channels.pads is not None:  # features feed a Linear next: padding would only add GEMM work
        positions, channels = ctx.table.unpadded(channels)
        data = data.index_select(x.dim, positions)
    sizes = tuple(x.shape[start:end + 1])
    return Packed(data.flatten(start, end), start, ctx.table.flattened(channels, sizes, x.dim - start),
                  math.prod(sizes))


def flatten(step, ctx, args, kwargs):
    params = dict(zip(("start_dim", "end_dim"), args[1:]), **kwargs)
    return _flatten(ctx, args[0], params.get("start_dim", 0), params.get("end_dim", -1))


def flatten_module(step, ctx, args, kwargs):
    mod = ctx.modules[step.target]
    return _flatten(ctx, args[0], mod.start_dim, mod.end_dim)


def _flatten_range(full, target):
    """(start, end) such that flattening dims start..end of ``full`` gives ``target``; None if no such range."""
    if len(target) == 0 or len(target) > len(full):
        return None
    p = 0
    while p < len(target) - 1 and full[p] == target[p]:
        p += 1
    q = len(target) - p - 1
    end = len(full) - q - 1
    if end < p or list(full[end + 1:]) != list(target[p + 1:]) or math.prod(full[p:end + 1]) != target[p]:
        return None
    return p, end


def view(step, ctx, args, kwargs):
    x = args[0]
    shape = args[1:] if len(args) > 1 else tuple(kwargs.get("shape", kwargs.get("size", ())))
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if type(x) is Packed and all(isinstance(s, int) for s in shape):
        full = x.shape
        known = math.prod(s for s in shape if s != -1)
        target = [full.numel() // known if s == -1 else s for s in shape]
        if list(target) == list(full):
            return x
        found = _flatten_range(full, target)
        if found is not None:
            return _flatten(ctx, x, *found)
    return dense(x).reshape(*shape)  # reshape, not view: compact tensors may be channels-last


def reduce(step, ctx, args, kwargs):
    x, fn = args[0], getattr(torch, step.target)
    if type(x) is not Packed:
        return fn(x, *args[1:], **kwargs)
    params = dict(zip(("dim", "keepdim"), args[1:]), **kwargs)
    dims = params.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    nd = x.data.dim()
    dims = [d % nd for d in dims]
    if not dims or x.dim in dims:
        return fn(x.dense(), *args[1:], **kwargs)
    out = fn(x.data, *args[1:], **kwargs)
    new_dim = x.dim if params.get("keepdim", False) else x.dim - sum(d < x.dim for d in dims)
    return Packed(out, new_dim, x.channels, x.width)


def _finite_scalar(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def binary(step, ctx, args, kwargs):
    a, b = args[0], args[1]
    op, fn = step.target, _BINARY[step.target]
    pa, pb = type(a) is Packed, type(b) is Packed
    if not (pa or pb):
        if step.inplace is not None and torch.is_tensor(b) and a.shape == b.shape:
            return getattr(a, step.inplace)(b, **kwargs)
        return fn(a, b, **kwargs)
    if pa and pb:
        if op != "div" and a.dim == b.dim and a.width == b.width and a.data.dim() == b.data.dim():
            if a.channels is b.channels:
                if step.inplace is not None and a.data.shape == b.data.shape:
                    return _same_packed(a, getattr(a.data, step.inplace)(b.data, **kwargs))
                return _same_packed(a, fn(a.data, b.data, **kwargs))
            chans = ctx.table.union(a.channels, b.channels, a.width)
            return Packed(fn(align(a, a.dim, chans), align(b, a.dim, chans), **kwargs), a.dim, chans, a.width)
        return fn(a.dense(), b.dense(), **kwargs)
    p, other = (a, b) if pa else (b, a)
    if op == "mul" or (op == "div" and pa):  # 0 * v = 0 and 0 / v = 0 for finite non-zero v
        if _finite_scalar(other) and (op == "mul" or other != 0):
            return _same_packed(p, fn(a.data, b, **kwargs) if pa else fn(a, b.data, **kwargs))
        if op == "mul" and torch.is_tensor(other) and other.dim() == p.data.dim() \
                and other.shape[p.dim] in (1, p.width):
            if other.shape[p.dim] != 1:
                other = other.index_select(p.dim, p.channels.index)
            return _same_packed(p, fn(p.data, other, **kwargs) if pa else fn(other, p.data, **kwargs))
    return fn(dense(a), dense(b), **kwargs)


def cat(step, ctx, args, kwargs):
    params = dict(zip(("tensors", "dim"), args), **kwargs)
    tensors, dim = params["tensors"], params.get("dim", params.get("axis", 0))
    first = tensors[0]
    nd = (first.data if type(first) is Packed else first).dim()
    d = dim % nd
    if any(type(t) is Packed for t in tensors) and all(type(t) is not Packed or t.dim == d for t in tensors):
        parts = [(t.channels, t.width) if type(t) is Packed else (None, t.shape[d]) for t in tensors]
        data = torch.cat([t.data if type(t) is Packed else t for t in tensors], d)
        return Packed(data, d, ctx.table.concatenated(parts), sum(w for _, w in parts))
    return step.target([dense(t) for t in tensors], d)


_TENSOR_FACTS = {"dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


def get_attribute(step, ctx, args, kwargs):
    x, name = args[0], args[1]
    if type(x) is Packed:
        if name == "shape":
            return x.shape
        return getattr(x.data if name in _TENSOR_FACTS else x.dense(), name)
    return getattr(x, name)


def shape(step, ctx, args, kwargs):
    x = args[0]
    if type(x) is not Packed:
        return getattr(x, step.target)(*args[1:], **kwargs)
    if step.target == "dim":
        return x.data.dim()
    if step.target == "numel":
        return x.shape.numel()
    index = args[1] if len(args) > 1 else kwargs.get("dim")
    return x.shape if index is None else x.shape[index]


# ----- everything else: full width -------------------------------------------------------------------------------
def _fresh(ctx, args, mutates):
    """Dense arguments; an op that writes into its first argument gets a copy (values may be shared by members).
    In a training forward, 4-D tensors also get the eager forward's layout (that of the model's input): an op that
    draws random numbers (a dropout inside a module, a stochastic depth) then lands each draw on the element the
    masked dense forward gives it."""
    args = dense_tree(args)
    if mutates and args and torch.is_tensor(args[0]):
        args = (args[0].clone(),) + tuple(args[1:])
    if ctx.train and not _channels_last(ctx.x):
        args = tuple(a.contiguous() if torch.is_tensor(a) and _channels_last(a) else a for a in args)
    return args


def function(step, ctx, args, kwargs):
    return step.target(*_fresh(ctx, args, step.mutates), **_without_inplace(dense_tree(kwargs)))


def method(step, ctx, args, kwargs):
    name = "reshape" if step.target == "view" else step.target
    args = _fresh(ctx, args, step.mutates)
    return getattr(args[0], name)(*args[1:], **dense_tree(kwargs))


def module(step, ctx, args, kwargs):
    out = ctx.modules[step.target](*_fresh(ctx, args, step.mutates), **dense_tree(kwargs))
    if step.mask is None:
        return out
    return select(out, step.mask_dim % out.dim(), ctx.chans[step.mask])


def norm_module(step, ctx, args, kwargs):
    """A BatchNorm subclass (timm's ``BatchNormAct2d``) runs its own forward at full width. While scoring, its
    F.batch_norm gets the batch statistics of this call's rows, which are one member's (``member_statistics``);
    a training forward runs it in its own mode, as the masked dense forward does."""
    if ctx.train:
        return module(step, ctx, args, kwargs)
    mod = ctx.modules[step.target]
    mode = MemberStatistics(1, ctx.batch_statistics, active=1)
    with mode:
        out = module(step, ctx, args, kwargs)
    if ctx.batch_statistics:
        warn_if_not_normalised(mod, mode.calls > 0)
    return out


def get_attr(step, ctx, args, kwargs):
    return functools.reduce(getattr, step.target.split("."), ctx.model)


HANDLERS = {
    "input": lambda step, ctx, args, kwargs: ctx.x, "constant": lambda step, ctx, args, kwargs: args[0],
    "get_attr": get_attr, "output": lambda step, ctx, args, kwargs: dense_tree(args[0]),
    "conv": conv, "linear": linear, "bn": batch_norm, "norm_module": norm_module, "select": select_kept, "zero": zero,
    "zero_module": zero_module, "pool": pool, "pool_module": pool_module, "flatten": flatten,
    "flatten_module": flatten_module, "view": view, "reduce": reduce, "binary": binary, "cat": cat,
    "getattr": get_attribute, "shape": shape, "function": function, "method": method, "module": module,
}


def _execute(steps, env, ctx):
    for step in steps:
        env[step.slot] = HANDLERS[step.kind](step, ctx, _load(step.args, env), _load(step.kwargs, env))
        for s in step.free:
            env[s] = None


def run(plan: Plan, model, states: torch.Tensor, x, batch_statistics: bool, train: bool = False) -> list:
    """The model's output for each of ``states`` [S, D]: shared steps once, member steps per state. For scoring the
    model must be in eval mode and gradients off (``CompactBackend.score`` arranges both); ``train=True`` runs a
    training plan's one member in the modules' own modes, under autograd, updating running statistics."""
    table = ChannelTable(plan.units, states, plan.maps)
    ctx = Context(model, table, batch_statistics, x, train)
    env = [None] * plan.slots
    _execute(plan.shared, env, ctx)
    out = []
    for row in table.rows:
        ctx.chans = row
        member_env = env.copy()
        _execute(plan.member, member_env, ctx)
        out.append(member_env[plan.output])
    return out
