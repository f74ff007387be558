"""Fused masked optimizer step: one Triton launch updates every parameter of a param group.

EDropout trains with a binary keep-mask over channels; pruned units must come out of the optimizer
step bit-identical (weights and every state tensor), kept units must move exactly as ``torch.optim``
moves them. Doing this with the ordinary step needs a restore pass over params and states; the kernel
reads p, grad, states and two tiny keep vectors once and writes only kept elements.

Mask contract (shared with the engine): each parameter ``p`` is viewed as ``[R, C, T]`` with ``R`` =
``p.shape[0]``, ``C`` = ``p.shape[1]`` (1 for 1-D tensors) and ``T`` = the product of the rest. A mask is
``(row_keep, col_keep)``: bool vectors of length ``R`` and ``C`` or ``None`` (= all kept). Element
``[r, c, t]`` is kept iff ``row_keep[r] and col_keep[c]``.

Conventions (all documented differences from a plain ``torch.optim`` step are here):

* Gradients of pruned elements are ignored, weight decay never touches pruned elements, and no state
  element of a pruned unit is written.
* The per-parameter ``step`` counter (Adam, AdamW, Adadelta) is one scalar per parameter, so it advances
  exactly as in torch whenever the parameter has a gradient, even when some (or all) of its elements are
  pruned. A pruned element's moments stay frozen; when it is kept again it resumes with the *current*
  step's bias corrections. (This is what "torch step, then restore pruned elements" gives as well.)
* SGD's momentum buffer is created on the first step as in torch (buffer = gradient) for kept elements;
  pruned elements of a freshly created buffer are 0, the same zero initialisation Adam's moments get.
  Later steps use ``buf = momentum * buf + (1 - dampening) * g`` for kept elements, including elements that
  were pruned on the first step.
* State tensors use torch's keys, dtypes, shapes and devices (``step`` is a 0-d CPU tensor), so
  ``optimizer.state_dict()`` stays valid and the ordinary ``optimizer.step()`` can take over at any time.

* ``only_if_finite`` (a one-element float tensor on the parameters' device, e.g. the training loss): the kernel
  reads it and, when it is NaN or infinite, writes nothing, so the device decides whether the step happens and
  the host never waits to find out. The host-side bookkeeping (step counters, lazily created state) is done
  either way; the returned ``TakenStep.undo()`` puts it back once the caller has read the value and found it
  non-finite.

Supported: ``SGD`` (momentum, dampening, nesterov, weight_decay, maximize), ``Adam`` / ``AdamW`` (betas,
eps, weight_decay, amsgrad, maximize, decoupled weight decay), ``Adadelta`` (rho, eps, weight_decay,
maximize), float32 contiguous dense real parameters and gradients. Anything else makes
:func:`fused_masked_step` return ``False`` without touching anything, so the caller can fall back to the
reference path.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._checks import INTERPRET, cpu_launches

__all__ = ["fused_masked_step", "supports", "TakenStep", "DEFAULT_BLOCK"]

#: Elements per program. Every program handles one block of one tensor (flattened grouped grid).
DEFAULT_BLOCK = 1024

_OPT_SGD, _OPT_ADAM, _OPT_ADADELTA = 0, 1, 2
_NMETA = 16  # int64 slots per tensor in the metadata table
# slot layout: 0 numel, 1 C*T, 2 T, 3 C, 4 first block, 5 p, 6 grad, 7-9 states, 10 row_keep,
# 11 col_keep, 12 flags (1 = has row mask, 2 = has col mask, 4 = fresh momentum buffer), 13-15 unused.
_FLAG_ROW, _FLAG_COL, _FLAG_FIRST = 1, 2, 4
_MAX_NUMEL = 2**31 - 2**20  # int32 element offsets inside one tensor


@triton.jit
def _masked_step_kernel(
    meta_ptr, map_ptr, only_if_finite_ptr,
    lr, wd, momentum, one_minus_dampening, lerp_w, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
    OPT: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr,
    DECOUPLED: tl.constexpr, LERP_FROM_START: tl.constexpr, ONLY_IF_FINITE: tl.constexpr, NMETA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(map_ptr + pid).to(tl.int64)
    row = meta_ptr + t * NMETA
    numel = tl.load(row + 0).to(tl.int32)
    ct = tl.load(row + 1).to(tl.int32)
    tt = tl.load(row + 2).to(tl.int32)
    cc = tl.load(row + 3).to(tl.int32)
    first_block = tl.load(row + 4)
    p_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    s1_ptr = tl.load(row + 7).to(tl.pointer_type(tl.float32))
    s2_ptr = tl.load(row + 8).to(tl.pointer_type(tl.float32))
    s3_ptr = tl.load(row + 9).to(tl.pointer_type(tl.float32))
    rk_ptr = tl.load(row + 10).to(tl.pointer_type(tl.int8))
    ck_ptr = tl.load(row + 11).to(tl.pointer_type(tl.int8))
    # flags broadcast to a block before testing (the interpreter mishandles scalar & vector masks)
    flags = tl.zeros([BLOCK], dtype=tl.int64) + tl.load(row + 12)
    has_row = (flags & 1) != 0
    has_col = (flags & 2) != 0

    offs = ((pid - first_block) * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
    inb = offs < numel
    r = offs // ct
    c = (offs // tt) % cc
    rk = tl.load(rk_ptr + r, mask=inb & has_row, other=1)
    ck = tl.load(ck_ptr + c, mask=inb & has_col, other=1)
    keep = inb & (rk != 0) & (ck != 0)
    if ONLY_IF_FINITE:  # a NaN or infinite value (e.g. the loss) keeps every element as it was (NaN compares false)
        value = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(only_if_finite_ptr).to(tl.float32)
        keep = keep & (tl.abs(value) <= 3.4028234663852886e38)

    p = tl.load(p_ptr + offs, mask=keep, other=0.0)
    g = tl.load(g_ptr + offs, mask=keep, other=0.0)
    if MAXIMIZE:
        g = -g

    if OPT == 0:  # SGD
        if WEIGHT_DECAY:
            g = g + wd * p
        if MOMENTUM:
            first = (flags & 4) != 0
            buf = tl.load(s1_ptr + offs, mask=keep, other=0.0)
            buf = tl.where(first, g, buf * momentum + one_minus_dampening * g)
            tl.store(s1_ptr + offs, buf, mask=keep)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        p = p - lr * g
    elif OPT == 1:  # Adam / AdamW
        if WEIGHT_DECAY:
            if DECOUPLED:
                p = p * decay
            else:
                g = g + wd * p
        m = tl.load(s1_ptr + offs, mask=keep, other=0.0)
        diff = g - m
        # torch's lerp: small weights from the start point, large ones from the end point
        if LERP_FROM_START:
            m = m + lerp_w * diff
        else:
            m = g - diff * (1.0 - lerp_w)
        v = tl.load(s2_ptr + offs, mask=keep, other=0.0)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(s1_ptr + offs, m, mask=keep)
        tl.store(s2_ptr + offs, v, mask=keep)
        if AMSGRAD:
            vmax = tl.maximum(tl.load(s3_ptr + offs, mask=keep, other=0.0), v)
            tl.store(s3_ptr + offs, vmax, mask=keep)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p + (-step_size * m) / denom
    else:  # Adadelta (rho in beta2, 1 - rho in one_minus_beta2)
        if WEIGHT_DECAY:
            g = g + wd * p
        sq = tl.load(s1_ptr + offs, mask=keep, other=0.0)
        sq = sq * beta2 + one_minus_beta2 * g * g
        tl.store(s1_ptr + offs, sq, mask=keep)
        std = tl.sqrt(sq + eps)
        acc = tl.load(s2_ptr + offs, mask=keep, other=0.0)
        delta = tl.sqrt(acc + eps) / std * g
        acc = acc * beta2 + one_minus_beta2 * delta * delta
        tl.store(s2_ptr + offs, acc, mask=keep)
        p = p - lr * delta
    tl.store(p_ptr + offs, p, mask=keep)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

def _kind(optimizer) -> int | None:
    # exact classes only: a subclass may change the update rule
    cls = type(optimizer)
    if cls is torch.optim.SGD:
        return _OPT_SGD
    if cls is torch.optim.Adam or cls is torch.optim.AdamW:
        return _OPT_ADAM
    if cls is torch.optim.Adadelta:
        return _OPT_ADADELTA
    return None


def _host_scalar(x):
    """Python float of a hyper-parameter, or None when reading it would need a device sync."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.device.type != "cpu" or x.requires_grad or x.is_complex():
            return None
        return float(x.item())
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _group_ok(optimizer, kind: int, group: dict) -> bool:
    if group.get("differentiable", False) or group.get("capturable", False):
        return False
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return False
    if kind == _OPT_ADAM and group.get("fused", False):
        return False  # fused Adam keeps `step` on the device: a different state convention
    names = {_OPT_SGD: ("lr", "momentum", "dampening", "weight_decay"),
             _OPT_ADAM: ("lr", "eps", "weight_decay"),
             _OPT_ADADELTA: ("lr", "rho", "eps", "weight_decay")}[kind]
    if any(_host_scalar(group.get(n)) is None for n in names):
        return False
    if kind == _OPT_ADAM:
        betas = group.get("betas")
        if betas is None or len(betas) != 2 or any(_host_scalar(b) is None for b in betas):
            return False
    return True


def supports(optimizer) -> bool:
    """True when :func:`fused_masked_step` can handle this optimizer's class and group options.

    Tensor-level conditions (float32, contiguous, dense, real, device) are checked per call.
    """
    kind = _kind(optimizer)
    if kind is None:
        return False
    if not (torch.cuda.is_available() or cpu_launches()):
        return False
    return all(_group_ok(optimizer, kind, g) for g in optimizer.param_groups)


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _as_rc(p: torch.Tensor):
    r = p.shape[0] if p.dim() >= 1 else 1
    c = p.shape[1] if p.dim() >= 2 else 1
    t = 1
    for s in p.shape[2:]:
        t *= s
    return r, c, t


def _dense_f32(x, p) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not x.is_sparse
            and x.layout == torch.strided and x.shape == p.shape and x.device == p.device
            and x.is_contiguous() and not x.requires_grad)


def _device_ok(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return not INTERPRET
    return dev.type == "cpu" and cpu_launches()


def _prepare_mask(vec, n: int, device):
    """Validated contiguous bool keep vector on ``device`` (or None); raises ValueError if malformed."""
    if vec is None:
        return None
    if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() != n:
        raise ValueError("keep vector has the wrong shape")
    if vec.dtype != torch.bool:
        vec = vec != 0
    return vec.to(device=device).contiguous()


_MAP_CACHE: OrderedDict = OrderedDict()


def _block_map(device, nblocks: tuple[int, ...]) -> torch.Tensor:
    """int32 [sum(nblocks)]: tensor index of every program. Cached: sizes rarely change."""
    key = (str(device), nblocks)
    hit = _MAP_CACHE.get(key)
    if hit is not None:
        _MAP_CACHE.move_to_end(key)
        return hit
    ids = torch.repeat_interleave(torch.arange(len(nblocks), dtype=torch.int32),
                                  torch.tensor(nblocks, dtype=torch.int64))
    out = ids.to(device)
    _MAP_CACHE[key] = out
    while len(_MAP_CACHE) > 16:
        _MAP_CACHE.popitem(last=False)
    return out


def _plan_group(optimizer, kind: int, group: dict, masks: dict):
    """Validate one param group without mutating anything; None when unsupported."""
    amsgrad = bool(group.get("amsgrad", False))
    momentum = _host_scalar(group.get("momentum", 0.0)) if kind == _OPT_SGD else 0.0
    items = []
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if p.dtype != torch.float32 or p.is_complex() or not p.is_contiguous() or p.layout != torch.strided:
            return None
        if not _device_ok(p.device) or g.is_sparse or not _dense_f32(g, p):
            return None
        if p.numel() >= _MAX_NUMEL:
            return None
        state = optimizer.state.get(p, {})
        if kind == _OPT_SGD:
            keys = ("momentum_buffer",) if momentum != 0 else ()
            buf = state.get("momentum_buffer") if momentum != 0 else None
            if buf is not None and not _dense_f32(buf, p):
                return None
        else:
            keys = (("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
                    if kind == _OPT_ADAM else ("square_avg", "acc_delta"))
            if len(state) != 0:
                step = state.get("step")
                if not isinstance(step, torch.Tensor) or step.device.type != "cpu" or step.numel() != 1:
                    return None
                if any(not _dense_f32(state.get(k), p) for k in keys):
                    return None
        rows, cols, _ = _as_rc(p)
        mask = masks.get(p) if masks is not None else None
        if mask is None:
            mask = (None, None)
        try:
            rk = _prepare_mask(mask[0], rows, p.device)
            ck = _prepare_mask(mask[1], cols, p.device)
        except (ValueError, TypeError, IndexError):
            return None
        if items and p.device != items[0][0].device:
            return None  # one pointer table per launch: a group must live on one device
        items.append((p, g, rk, ck, keys))
    return items


def _launch_group(optimizer, kind: int, group: dict, items, block: int, only_if_finite) -> None:
    """The masked step of one param group: its step counters in one operation, then one launch per distinct step."""
    if not items:
        return
    maximize = bool(group.get("maximize", False))
    lr = _host_scalar(group["lr"])
    wd = _host_scalar(group.get("weight_decay", 0.0))
    device = items[0][0].device
    momentum = dampening = beta2 = eps = 0.0
    lerp_w = 0.0
    nesterov = amsgrad = decoupled = False
    if kind == _OPT_SGD:
        momentum = _host_scalar(group.get("momentum", 0.0))
        dampening = _host_scalar(group.get("dampening", 0.0))
        nesterov = bool(group.get("nesterov", False))
    elif kind == _OPT_ADAM:
        beta1, beta2 = (_host_scalar(b) for b in group["betas"])
        eps = _host_scalar(group["eps"])
        amsgrad = bool(group.get("amsgrad", False))
        decoupled = bool(group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW))
        lerp_w = 1.0 - beta1
    else:
        beta2 = _host_scalar(group["rho"])  # rho travels in the beta2 slot
        eps = _host_scalar(group["eps"])

    steps = [None] * len(items)
    if kind != _OPT_SGD:
        for p, g, rk, ck, keys in items:
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                for k in keys:
                    state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        counters = [optimizer.state[p]["step"] for p, *_ in items]
        torch._foreach_add_(counters, 1)  # torch's per-parameter step counters (CPU tensors), in one operation
        if kind == _OPT_ADAM:
            steps = torch.stack(counters).tolist()  # CPU tensors: no device sync
    # Adam's bias corrections depend on the step: one launch per distinct step (one, unless some parameters
    # missed steps), the corrections passed as scalars so that the pointer table stays the same every step
    for step in dict.fromkeys(steps):
        subset = [item for item, st in zip(items, steps) if st == step]
        step_size = lr / (1 - beta1 ** step) if kind == _OPT_ADAM else 1.0
        bc2_sqrt = (1 - beta2 ** step) ** 0.5 if kind == _OPT_ADAM else 1.0
        meta, nblocks = _pointer_table(optimizer, kind, momentum, subset, block)
        if not nblocks:
            continue
        table = _device_table(device, meta)
        _masked_step_kernel[(sum(nblocks),)](
            table, _block_map(device, tuple(nblocks)), table if only_if_finite is None else only_if_finite,
            lr, wd, momentum, 1.0 - dampening, lerp_w, beta2, 1.0 - beta2, eps, 1.0 - lr * wd, step_size, bc2_sqrt,
            OPT=kind, MAXIMIZE=maximize, WEIGHT_DECAY=wd != 0, MOMENTUM=momentum != 0,
            NESTEROV=nesterov, AMSGRAD=amsgrad, DECOUPLED=decoupled,
            LERP_FROM_START=abs(lerp_w) < 0.5, ONLY_IF_FINITE=only_if_finite is not None, NMETA=_NMETA, BLOCK=block,
        )


def _pointer_table(optimizer, kind, momentum, items, block):
    """The int64 table of one launch (``_NMETA`` slots per tensor) and the blocks of each tensor; creates SGD's
    momentum buffers on their first step (flagged, so the kernel initialises them)."""
    meta, nblocks, start = [], [], 0
    for p, g, rk, ck, keys in items:
        state = optimizer.state[p]
        flags = 0
        if kind == _OPT_SGD and momentum != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            flags |= _FLAG_FIRST
        states = [state[k] for k in keys] + [p] * (3 - len(keys))
        rows, cols, tail = _as_rc(p)
        if rk is not None:
            flags |= _FLAG_ROW
        if ck is not None:
            flags |= _FLAG_COL
        nb = triton.cdiv(p.numel(), block)
        meta += [p.numel(), cols * tail, tail, cols, start, p.data_ptr(), g.data_ptr(),
                 states[0].data_ptr(), states[1].data_ptr(), states[2].data_ptr(),
                 rk.data_ptr() if rk is not None else p.data_ptr(),
                 ck.data_ptr() if ck is not None else p.data_ptr(),
                 flags, 0, 0, 0]
        nblocks.append(nb)
        start += nb
    return meta, nblocks


_TABLES: OrderedDict = OrderedDict()


def _device_table(device, meta: list) -> torch.Tensor:
    """The pointer table on the device, cached by its contents: parameters, optimizer states and keep vectors keep
    their addresses from step to step (and PyTorch's caching allocator usually hands gradients the same blocks),
    so a step normally copies nothing. A new table is copied from pinned memory without blocking the host; the
    pinned copy is kept with it until the entry is evicted (which happens only after later launches are queued
    on the same stream)."""
    key = (str(device), tuple(meta))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[0]
    host = torch.tensor(meta, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host
    _TABLES[key] = (table, host)
    while len(_TABLES) > 8:
        _TABLES.popitem(last=False)
    return table


class TakenStep:
    """What :func:`fused_masked_step` did on the host (truthy): ``undo()`` puts back the optimizer's host-side
    bookkeeping of a step whose ``only_if_finite`` value turned out non-finite on the device (the kernel then wrote nothing):
    each parameter's state dict as it was (fresh state removed, lazily created buffers dropped) and its step
    counter one lower, so the optimizer is exactly as before the call."""

    def __init__(self, optimizer, params):
        self._optimizer = optimizer
        # shallow copies: the tensors in them are the ones the kernel would have written (and did not)
        self._before = [(p, p in optimizer.state, dict(optimizer.state.get(p, {}))) for p in params]

    def __bool__(self) -> bool:
        return True

    def undo(self) -> None:
        """Restore the host-side state of the parameters this step saw (call only when the kernel skipped)."""
        state, counters = self._optimizer.state, []
        for p, present, before in self._before:
            if not present:
                state.pop(p, None)
                continue
            state[p].clear()
            state[p].update(before)
            if torch.is_tensor(before.get("step")):
                counters.append(before["step"])
        if counters:
            torch._foreach_sub_(counters, 1)  # the same CPU tensors the step advanced


@torch.no_grad()
def fused_masked_step(optimizer: torch.optim.Optimizer, masks: dict | None,
                      *, block_size: int = DEFAULT_BLOCK, only_if_finite: torch.Tensor | None = None):
    """One masked optimizer step with one Triton launch per param group.

    ``masks`` maps a parameter to ``(row_keep, col_keep)`` (see the module docstring); parameters not in
    it are fully kept. Reads hyper-parameters from ``optimizer.param_groups`` (LR schedulers apply) and
    keeps ``optimizer.state`` in torch's format. ``only_if_finite``: a one-element float tensor on the
    parameters' device; the kernel writes nothing when it is NaN or infinite (no host read). Returns a :class:`TakenStep` (truthy), or ``False``
    and changes nothing when the optimizer, its options or a tensor is unsupported; the caller then uses the
    reference path.
    """
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two")
    if not supports(optimizer):
        return False
    kind = _kind(optimizer)
    plans = []
    for group in optimizer.param_groups:
        items = _plan_group(optimizer, kind, group, masks or {})
        if items is None:
            return False
        plans.append((group, items))
    if only_if_finite is not None and (not torch.is_tensor(only_if_finite) or only_if_finite.numel() != 1
                                       or not only_if_finite.is_floating_point()):
        raise ValueError("only_if_finite must be a one-element float tensor (e.g. the loss)")
    taken = TakenStep(optimizer, [item[0] for _, items in plans for item in items])
    for group, items in plans:
        _launch_group(optimizer, kind, group, items, block_size, only_if_finite)
    optimizer._opt_called = True  # what torch's step wrapper records for LR schedulers (no hooks run)
    return taken
