"""The triton backend: the whole population in one S·B forward whose heavy layers compute only kept channels.

Same energies as the reference backend (to float tolerance), but every supported ``nn.Conv2d`` (groups 1,
dilation 1, zero padding) and ``nn.Linear`` runs as one grouped Triton launch over all members
(``edropout_kernels.population_conv2d`` / ``population_linear``) that reads only the member's kept input
channels and writes only its kept output channels, so its work scales with k_in·k_out of the dense layer.
BatchNorm uses per-member statistics (``population_batchnorm``) or, in eval-mode scoring, is folded into the
epilogue of the conv/linear that alone feeds it; margin and cross-entropy energies come from one fused kernel.
Everything else (pooling, activations, Conv1d/3d, grouped or dilated convs, BatchNorm subclasses such as timm's
``BatchNormAct2d``, which run their own forward with per-member statistics) runs as ordinary PyTorch ops on the
S·B batch, with the usual mask hooks.

Two facts cannot be read off ``PrunableUnits`` and are established once per model by a probe (section 2):
which layers really see exact zeros in pruned input channels (not so after e.g. a sigmoid: then the layer
reads all its inputs), and which conv/linear feeds exactly one BatchNorm (fold candidates). The probe then
checks the routed forward against the reference on a few rows and raises if they differ (e.g. a model that
mixes rows of the batch, which no one-batch population can score), instead of answering differently. Both
checks run on the first batch scored; layers with forward hooks are computed in full and never folded.

The evolution step is one kernel launch (counter-based RNG keyed by seed and iteration) and the masked optimizer
update one fused launch where ``edropout_kernels.fused_masked_step`` supports the optimizer (else the reference
step); in ``step`` that launch also reads the loss on the device and skips itself on a non-finite
loss, so the host never waits for it. This module is the engine's only way into ``edropout_kernels``.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .batched import member_chunks
from .reference import ReferenceBackend
from ..energy import cross_entropy_energy, margin_energy, member_energies
from ..masking import _mask_hook, member_batch_norm, member_statistics, scoring
from ..modes import all_modules_in
from ..units import _NORM, PrunableUnits, stock_forward
from ._model_analysis import has_forward_hooks, redundant_producer, running_scale_shift, weight_axes

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_PROBE_ROWS = 4          # rows of the caller's batch used by the probe
_SELF_CHECK_RTOL = 1e-3  # relative L2 error allowed between routed and reference logits (exact-fp32 probe)


# ----- 1. kernels and device --------------------------------------------------------------------------------
def _kernels(device: torch.device):
    """``edropout_kernels``, imported on first use (so ``import edropout`` never needs Triton), after checking
    that its kernels can run on ``device``."""
    try:
        import edropout_kernels as ek
    except ImportError as exc:
        raise RuntimeError(f"backend='triton' needs the triton package ({exc}); install triton or use "
                           f"backend='batched'") from exc
    if device.type == "cpu" and not ek.INTERPRET:
        raise RuntimeError("backend='triton' runs on CUDA tensors; on CPU it needs Triton's interpreter, i.e. "
                           "TRITON_INTERPRET=1 set before edropout_kernels is imported (slow, for tests). "
                           "Use backend='batched' on CPU")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA devices only, got {device}; use backend='batched'")
    return ek


def _interpreter_tiles(ek, rows: int) -> dict:
    """Tile sizes for the conv/linear kernels: their defaults on a GPU; in Triton's CPU interpreter, where every
    program instance costs milliseconds of Python, one row tile per member (numpy does the big dot quickly)."""
    return {"block_m": ek.pow2_between(rows, 16, 1024)} if ek.INTERPRET else {}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's conv/linear would compute in: the autocast dtype when autocast is on."""
    if x.dtype in _FLOAT and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ----- 2. which modules go to kernels, and the probe ---------------------------------------------------------
def _conv_padding(conv: nn.Conv2d):
    """Zero padding as a pair of ints, or None when the kernel cannot express it (even 'same' kernels)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0
        if all(k % 2 for k in conv.kernel_size):
            return tuple((k - 1) // 2 for k in conv.kernel_size)
        return None
    return tuple(conv.padding)


def _kind(module: nn.Module):
    """"conv2d" or "linear" when the module's forward is the stock one and a kernel computes it, else None."""
    if "forward" in vars(module):  # someone replaced this instance's forward: respect it
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward and module.groups == 1
            and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros"
            and _conv_padding(module) is not None):
        return "conv2d"
    return None


def _routes_norm(module: nn.Module) -> bool:
    """Whether this backend computes the BatchNorm: a stock BatchNorm only. A subclass (timm's ``BatchNormAct2d``)
    or a replaced forward runs its own forward, with per-member statistics fed through ``member_statistics``."""
    return isinstance(module, _NORM) and stock_forward(module)


@dataclass
class _Plan:
    """What the probe established about one (model, units): per routed layer, whether its pruned input channels
    are exactly zero (``skip_inputs``); eval-mode BatchNorm folds (``folds``: producer name -> name of the
    BatchNorm called once, on that producer's output alone); the scoring modes whose routed forward was checked
    against the reference (``checked``)."""

    units: PrunableUnits
    signature: tuple
    skip_inputs: set
    folds: dict
    checked: set = field(default_factory=set)
    index_cache: dict = field(default_factory=dict)

    def index(self, key, index: torch.Tensor, device) -> torch.Tensor:
        """Bit-index tensors copied to ``device`` once, not on every call."""
        cached = self.index_cache.get((key, device))
        if cached is None:
            cached = self.index_cache[(key, device)] = index.to(device)
        return cached


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((name, id(m)) for name, m in model.named_modules())


def _probe_states(units: PrunableUnits, device, every_group: bool = False) -> torch.Tensor:
    """Two complementary random states: every bit is pruned in exactly one of them. With ``every_group`` each
    state keeps at least one unit of every group: a state that prunes a whole group can make the logits
    independent of the input, and per-member BatchNorm then turns rounding noise into O(1) differences."""
    half = torch.rand(units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    states = torch.stack([half, ~half])
    if every_group:
        for group in units.groups:
            bits = states[:, group.first_bit:group.first_bit + group.size]
            bits[~bits.any(dim=1), 0] = True
    return states.to(device)


def _pruned_inputs_zero(inputs: torch.Tensor, kind: str, keep: torch.Tensor) -> bool:
    """True when every input channel that ``keep`` [S, C] marks pruned holds exact zeros in that member's rows."""
    members, channels = keep.shape
    if inputs.shape[0] % members or inputs.dim() < 2:
        return False
    if kind == "linear":
        peak = inputs.reshape(members, -1, channels).abs().amax(dim=1)
    else:
        peak = inputs.reshape(members, inputs.shape[0] // members, channels, -1).abs().amax(dim=(1, 3))
    return bool((peak[~keep] == 0).all())


def _build_plan(model: nn.Module, units: PrunableUnits, probe_x: torch.Tensor) -> _Plan:
    """Run the reference masked forward on two complementary states and record, for every routed layer,
    whether its pruned inputs are exact zeros and which single module consumes its output."""
    states = _probe_states(units, probe_x.device)
    ext = units.extended(states)
    modules = dict(model.named_modules())
    routed = {n: _kind(m) for n, m in modules.items() if _kind(m)}
    zero_ok = {n: bool(weight_axes(units, n).get(1) is not None) for n in routed}
    calls, leaf_calls, produced, consumers, alive = {}, {}, {}, {}, []

    def check_inputs(name):
        def hook(module, inputs):
            axes1 = weight_axes(units, name).get(1)
            if axes1 is not None and zero_ok[name]:
                keep = ext[:, axes1.to(ext.device)]
                zero_ok[name] = bool(inputs) and torch.is_tensor(inputs[0]) and \
                    _pruned_inputs_zero(inputs[0], routed[name], keep)
        return hook

    def remember_output(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = name
            alive.append(output)  # keeps ids unique while the probe runs
        return hook

    def note_consumer(name):
        def hook(module, inputs):
            leaf_calls[name] = leaf_calls.get(name, 0) + 1
            for t in inputs:
                if torch.is_tensor(t) and id(t) in produced:
                    consumers.setdefault(produced[id(t)], []).append(name)
        return hook

    handles = []
    xs = probe_x.repeat((2,) + (1,) * (probe_x.dim() - 1))
    try:
        with scoring(model, units, states, batch_statistics=True):
            # registered inside the context, so they run after the mask hooks and see the masked outputs
            for name in routed:
                handles.append(modules[name].register_forward_pre_hook(check_inputs(name)))
                handles.append(modules[name].register_forward_hook(remember_output(name)))
            for name, m in modules.items():
                if next(m.children(), None) is None:
                    handles.append(m.register_forward_pre_hook(note_consumer(name)))
            model(xs)
    except Exception as exc:
        raise RuntimeError(f"backend='triton' scores all members in one batch of S·B member-major rows, and this "
                           f"model failed on such a batch ({type(exc).__name__}: {exc}); use "
                           f"backend='reference'") from exc
    finally:
        for h in handles:
            h.remove()
    folds = {}
    for name, kind in routed.items():
        users = consumers.get(name, [])
        bn = modules[users[0]] if len(users) == 1 else None
        # A redundant producer feeds only BatchNorms of its own group; with exactly one such consumer module and
        # one call of each, its output is that BatchNorm's only input.
        if (redundant_producer(units, name) and calls.get(name) == 1 and bn is not None
                and leaf_calls.get(users[0]) == 1
                and isinstance(bn, nn.BatchNorm2d if kind == "conv2d" else nn.BatchNorm1d)):
            folds[name] = users[0]
    verified = {n for n, ok in zero_ok.items() if ok and calls.get(n)}  # a layer the probe never ran stays dense
    return _Plan(units, _signature(model), verified, folds)


@contextlib.contextmanager
def _exact_fp32(device):
    """Exact float32 in PyTorch (no TF32, no autocast) for the self-check."""
    cudnn, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


def _self_check(model, units, plan, probe_x, batch_statistics, ek) -> None:
    """Routed logits must equal the reference's (one forward per state) on the probe rows, else raise."""
    states = _probe_states(units, probe_x.device, every_group=True)
    with _exact_fp32(probe_x.device):
        ref = []
        for state in states:
            with scoring(model, units, state[None], batch_statistics):
                ref.append(model(probe_x))
        ref = torch.cat(ref).float()
        xs = probe_x.repeat((2,) + (1,) * (probe_x.dim() - 1))
        with _routed(model, units, states, batch_statistics, plan, ek):
            got = model(xs).float()
    finite = torch.isfinite(ref)
    bad = got.shape != ref.shape or not torch.equal(finite, torch.isfinite(got))
    if not bad:
        error = (got[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-12)
        bad = bool(error > _SELF_CHECK_RTOL)
    if bad:
        raise RuntimeError("backend='triton' gives different outputs than backend='reference' for this model "
                           "(checked once on a few rows of the first batch). The usual causes: a model that "
                           "mixes rows of a batch (e.g. statistics over the batch outside BatchNorm), which a "
                           "one-batch population cannot score (use backend='reference'); or BatchNorm over so few "
                           "values per channel (e.g. 1x1 feature maps of two rows) that float32 rounding decides "
                           "their signs, so no two backends agree (score larger batches or larger inputs, or pass "
                           "score_in_eval_mode=True)")


def _plan_for(model, units, x, batch_statistics, ek) -> _Plan:
    """The model's plan, built and self-checked on first use of each scoring mode, then cached."""
    plan = _PLANS.get(model)
    if plan is None or plan.units is not units or plan.signature != _signature(model):
        plan = _PLANS[model] = _build_plan(model, units, x[:_PROBE_ROWS])
    if batch_statistics not in plan.checked:
        _self_check(model, units, plan, x[:_PROBE_ROWS], batch_statistics, ek)
        plan.checked.add(batch_statistics)
    return plan


# ----- 3. the routed forward ------------------------------------------------------------------------------------
def _conv_out_pixels(x, conv, padding) -> int:
    """Output height × width of ``conv`` on ``x``."""
    size = [(x.shape[2 + i] + 2 * padding[i] - conv.kernel_size[i]) // conv.stride[i] + 1 for i in (0, 1)]
    return size[0] * size[1]


def _kernel_ready(x: torch.Tensor, members: int, dims) -> bool:
    return x.dtype in _FLOAT and x.dim() in dims and x.shape[0] % members == 0


def _bn_scale_shift(bn):
    """Eval-mode BatchNorm as a per-channel scale and shift (float32, or float64 for a float64 model)."""
    return running_scale_shift(bn, torch.promote_types(bn.running_var.dtype, torch.float32))


def _running_norm(bn, x: torch.Tensor) -> torch.Tensor:
    """``bn`` with running statistics on ``x`` (channels on dim 1), in at least float32, as eval-mode PyTorch."""
    scale, shift = _bn_scale_shift(bn)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * scale.view(shape).to(wide.dtype) + shift.view(shape).to(wide.dtype)).to(x.dtype)


def _masked(mask, channel_dim, module, x, out):
    """``out`` with the channels ``mask`` [S, C] prunes zeroed per member (unchanged when ``mask`` is None)."""
    return out if mask is None else _mask_hook(mask, channel_dim)(module, (x,), out)


@dataclass(frozen=True)
class _Route:
    """What every patched forward of one routed scoring call reads: the population (``members`` states, their
    extended bits ``ext`` [S, E] and per-mask-point keeps ``masks``), the model's plan and units, the scoring
    mode, the kernels module, and the BatchNorms each producer applies itself (``folds``: producer name ->
    BatchNorm module, eval-mode scoring only), and every routed layer's kept-first channel orders (``kept``)."""

    members: int
    ext: torch.Tensor
    masks: dict
    plan: _Plan
    units: PrunableUnits
    batch_statistics: bool
    ek: object
    folds: dict
    kept: dict  # routed layer name -> _LayerKeeps, built once per population


def _active_folds(plan: _Plan, modules: dict, batch_statistics: bool) -> dict:
    """Producer name -> BatchNorm the producer applies itself in this call: eval-mode scoring only, where this
    backend computes that BatchNorm and no hook could see (or change) the unfolded value."""
    if batch_statistics:
        return {}
    folds = {}
    for name, bn_name in plan.folds.items():
        bn = modules[bn_name]
        if bn.running_mean is not None and _routes_norm(bn) and not has_forward_hooks([bn, modules[name]]):
            folds[name] = bn
    return folds


def _producer_forward(module, name, kind, route: _Route):
    """Forward of a Conv2d/Linear on the S·B batch: the population kernel on kept channels, exact zeros in pruned
    output channels; the stock forward (plus the mask) when the input does not suit the kernel. A producer with a
    folded BatchNorm returns that BatchNorm's masked output (in the kernel's epilogue where it can)."""
    members, plan, ek = route.members, route.plan, route.ek
    mask = route.masks.get(name)
    kept = route.kept[name]
    bn = route.folds.get(name)
    bn_mask = route.masks.get(plan.folds[name]) if bn is not None else None
    base = type(module).forward

    def forward(x):
        dtype = _compute_dtype(x)
        if not _kernel_ready(x, members, (4,) if kind == "conv2d" else (2, 3, 4, 5)):
            out = _masked(mask, -1 if kind == "linear" else 1, module, x, base(module, x))
            return out if bn is None else _masked(bn_mask, 1, bn, out, _running_norm(bn, out))
        epilogue = bn is not None and (kind == "conv2d" or x.dim() == 2)
        scale, shift = _bn_scale_shift(bn) if epilogue else (None, None)
        keep = kept.fold if epilogue else kept.outputs
        if kind == "conv2d":
            padding = _conv_padding(module)
            rows = x.shape[0] // members * _conv_out_pixels(x, module, padding)
            out = ek.population_conv2d(
                x.to(dtype), module.weight, module.bias, kept.inputs, keep, members=members, stride=module.stride,
                padding=padding, scale=scale, shift=shift, **_interpreter_tiles(ek, rows))
        else:
            flat = x.to(dtype).reshape(-1, x.shape[-1])
            out = ek.population_linear(
                flat, module.weight, module.bias, kept.inputs, keep, members=members, scale=scale, shift=shift,
                **_interpreter_tiles(ek, flat.shape[0] // members)).reshape(*x.shape[:-1], -1)
        if bn is not None and not epilogue:
            out = _masked(bn_mask, 1, bn, out, _running_norm(bn, out))
        return out

    return forward


def _folded_norm_forward(x):
    """Forward of a BatchNorm whose only producer already applied it (and its mask): its input is its output."""
    return x


def _norm_forward(module, name, route: _Route):
    """Forward of a BatchNorm on the S·B batch, as the reference computes it while scoring: per-member batch
    statistics (kernel), or running statistics in eval-mode scoring, masked."""
    members, mask = route.members, route.masks.get(name)
    per_member = route.batch_statistics or module.running_mean is None

    def forward(x):
        if not per_member:
            return _masked(mask, 1, module, x, _running_norm(module, x))
        if not _kernel_ready(x, members, (2, 3, 4, 5)):
            return _masked(mask, 1, module, x, member_batch_norm(x, members, module.weight, module.bias, module.eps))
        y = x if x.dim() in (2, 4) else x.reshape(x.shape[0], x.shape[1], -1, 1)
        out = route.ek.population_batchnorm(y, members, module.weight, module.bias, module.eps, out_keep=mask)
        return out.reshape(x.shape)

    return forward


@dataclass
class _LayerKeeps:
    """Kept-first channel orders (``edropout_kernels.KeptFirstOrder``) of one routed Conv2d/Linear for one
    population: its inputs, its outputs, and its outputs with its folded BatchNorm's mask (None: no fold)."""

    inputs: object
    outputs: object
    fold: object = None


def _keep_columns(units, plan, modules, folds):
    """Which state bits every keep-mask of one routed forward reads, as labelled bit-index tensors (bit D, the
    always-kept column of ``units.extended``, for channels never pruned there): the mask points, then each routed
    layer's inputs, outputs and (when a BatchNorm is folded into it) folded outputs; and per layer how many."""
    always = units.num_units
    points = {p.module_name: p.index for p in units.mask_points}
    columns = [(("mask", name), index) for name, index in points.items()]
    counts = {}
    for name, m in modules.items():
        if not _kind(m):
            continue
        axes = weight_axes(units, name)
        hooked = has_forward_hooks([m])  # a hook may change the input or see the output: compute them in full
        n_out, n_in = m.weight.shape[0], m.weight.shape[1]
        inputs = axes[1] if name in plan.skip_inputs and not hooked else torch.full((n_in,), always)
        if name in points:
            outputs = points[name]
        elif redundant_producer(units, name) and not hooked:  # its BatchNorm masks these channels
            outputs = axes[0]
        else:
            outputs = torch.full((n_out,), always)
        entry = [(("in", name, hooked), inputs), (("out", name, hooked), outputs)]
        if name in folds:
            entry.append((("fold", name), points.get(plan.folds[name], torch.full((n_out,), always))))
        counts[name] = len(entry)
        columns += entry
    return columns, counts


def _column_layout(units, plan, modules, folds, device):
    """``_keep_columns`` as (labels with their widths, per-layer counts, the bit index on ``device``), built once
    per plan, hooked layers, folds and device (their host work and upload are not repeated every call)."""
    hooked = tuple(name for name, m in modules.items() if _kind(m) and has_forward_hooks([m]))
    key = ("layout", hooked, tuple(folds), str(device))
    hit = plan.index_cache.get(key)
    if hit is None:
        columns, counts = _keep_columns(units, plan, modules, folds)
        index = torch.cat([i.to(torch.long) for _, i in columns]).to(device)
        hit = plan.index_cache[key] = ([(label, i.numel()) for label, i in columns], counts, index)
    return hit


@contextlib.contextmanager
def _routed(model, units, states, batch_statistics, plan, ek):
    """Within the block, ``model`` scores ``states`` [S, D] on member-major S·B rows through the kernels, like
    ``edropout.masking.scoring`` does through PyTorch; the model is restored on exit. Every keep-mask of the
    forward is one gather from the states, and every routed layer's kept-first orders come from one
    ``kept_first_orders`` call: a fixed number of device operations per population, whatever the depth."""
    ext = units.extended(states.reshape(-1, units.num_units))
    modules = dict(model.named_modules())
    folds = _active_folds(plan, modules, batch_statistics)
    folded_norms = {id(bn) for bn in folds.values()}
    sizes, counts, index = _column_layout(units, plan, modules, folds, ext.device)
    table = ext[:, index]
    views, first = {}, 0
    for label, size in sizes:
        views[label] = table[:, first:first + size]
        first += size
    masks = {label[1]: view for label, view in views.items() if label[0] == "mask"}
    orders = iter(ek.kept_first_orders([view for label, view in views.items() if label[0] != "mask"]))
    kept = {name: _LayerKeeps(*(next(orders) for _ in range(n))) for name, n in counts.items()}
    route = _Route(ext.shape[0], ext, masks, plan, units, batch_statistics, ek, folds, kept)
    patched, handles = {}, []
    own_norms = [m for m in modules.values() if isinstance(m, _NORM) and not _routes_norm(m)]
    with all_modules_in(model, False), member_statistics(own_norms, route.members, batch_statistics):
        try:
            for name, m in modules.items():
                kind = _kind(m)
                if kind or _routes_norm(m):
                    patched[m] = vars(m).get("forward")
                    if kind:
                        m.forward = _producer_forward(m, name, kind, route)
                    else:
                        m.forward = _folded_norm_forward if id(m) in folded_norms else _norm_forward(m, name, route)
                elif name in masks:
                    channel_dim = next(p.channel_dim for p in units.mask_points if p.module_name == name)
                    handles.append(m.register_forward_hook(_mask_hook(masks[name], channel_dim)))
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()
            for m, previous in patched.items():
                if previous is None:
                    del m.forward
                else:
                    m.forward = previous


# ----- 4. energies and the entry point --------------------------------------------------------------------------
def _energies(ek, energy_fn, logits, y, members) -> torch.Tensor:
    """Member energies [S]: margin / cross-entropy in one fused kernel, any other callable in PyTorch."""
    fused = energy_fn is margin_energy or energy_fn is cross_entropy_energy
    if fused and logits.dim() == 2 and logits.dtype in _FLOAT and logits.shape[0] == members * y.shape[0]:
        margin, ce = ek.population_energies(logits, y, members)
        return margin if energy_fn is margin_energy else ce
    return member_energies(energy_fn, logits, y.repeat(members), members)


class TritonBackend(ReferenceBackend):
    """The reference backend with scoring, the evolution step and the masked update as Triton kernels.

    ``cuda_graphs=True`` (CUDA only) replays each scoring pass from a captured CUDA graph (``_graphs``), captured
    per input shape after the first eager call has built and checked the model's plan. Opt in only for a model
    whose structure, hooks and scoring mode stay fixed while training: the capture bakes them in."""

    name = "triton"

    def __init__(self, cuda_graphs: bool = False, graph_factory=None):
        self.cuda_graphs = bool(cuda_graphs)
        self._graph_factory = graph_factory  # None: real CUDA graphs; tests pass a stand-in
        self._graphed = self._graphed_plan = None

    def plan(self, x: torch.Tensor) -> _Plan:
        """The bound model's routing plan for batches like ``x`` (built, self-checked and cached on first use)."""
        return _plan_for(self.model, self.units, x, self.batch_statistics, _kernels(x.device))

    def score(self, states, x, y):
        """Energies [S]: the population in routed forwards of up to ``max_members`` members (all at once by
        default); replayed from a CUDA graph with ``cuda_graphs=True`` once the plan exists."""
        ek = _kernels(x.device)
        plan = _plan_for(self.model, self.units, x, self.batch_statistics, ek)
        if self.cuda_graphs and (x.device.type == "cuda" or self._graph_factory is not None):
            if self._graphed is None or self._graphed_plan is not plan:  # a new plan: the old captures are stale
                from ._graphs import GraphedCall

                self._graphed = GraphedCall(lambda s, xb, yb: self._score_eager(s, xb, yb, plan, ek),
                                            self._graph_factory)
                self._graphed_plan = plan
            return self._graphed(states, x, y)
        return self._score_eager(states, x, y, plan, ek)

    def _score_eager(self, states, x, y, plan, ek):
        """The scoring pass itself: kernels and PyTorch ops launched one by one."""
        model, units = self.model, self.units
        out = []
        for chunk_states, members, xs in member_chunks(states, x, self.max_members):
            with _routed(model, units, chunk_states, self.batch_statistics, plan, ek):
                out.append(_energies(ek, self.energy_fn, model(xs), y, members))
        return out[0] if len(out) == 1 else torch.cat(out)

    def children(self, population, mutation_factor, crossover_rate, *, generator, seed, iteration):
        """Children in one launch; counter-based RNG keyed by (seed, iteration): reproducible and resumable
        without saved state."""
        return _kernels(population.device).make_children(population, mutation_factor, crossover_rate, seed=seed,
                                                         step=iteration)

    def select(self, population, energies, children, child_energies):
        """Greedy selection and the best member in one launch."""
        return _kernels(population.device).select_and_best(population, energies, children, child_energies)

    def optimizer_step(self, optimizer, view):
        """The fused masked update in one launch where the optimizer is supported, else the reference step."""
        if not _kernels(self.device).fused_masked_step(optimizer, view.row_col_keeps):
            super().optimizer_step(optimizer, view)

    def optimizer_step_if_finite(self, optimizer, view, value):
        """The fused masked update with ``value`` judged by the kernel (no host read: the returned step's
        ``undo()`` puts back its host-side bookkeeping if ``value`` turns out non-finite); the reference step,
        after a host read of ``value``, where the optimizer is not supported."""
        taken = _kernels(self.device).fused_masked_step(optimizer, view.row_col_keeps, only_if_finite=value)
        return taken if taken else super().optimizer_step_if_finite(optimizer, view, value)
