"""The compact backend: each member runs on its kept channels only, so a member with kept fraction k costs about
k² of a dense forward (kept inputs × kept outputs of every layer) instead of a full masked forward.

The model is traced once with torch.fx (``_compact_plan``); per call, every member's graph is interpreted on
channel-compact tensors (``_compact_exec``, ``_compact_values``): Conv/Linear on gathered weights
W[kept_out][:, kept_in] (cached per call, shared by members with the same kept channels), BatchNorm with the
member's own batch statistics (or running statistics folded into the conv before it), residual adds, concats,
pooling and flatten carrying the kept channel lists, and any other op on the tensor scattered back to full width
(always exact, just slower). Convolutions run channels-last with channel counts padded to multiples of 8 (zero
channels), oneDNN's fast path; work that no state affects (e.g. the first conv) is done once per call; ReLUs
and residual adds overwrite fresh tensors in place; identical states are scored once.

The same interpreter runs the training forward on CPU (``CompactBackend.training_logits``): one member, the best
state, under autograd and in the modules' own modes at call time (traced in them, re-traced when a mode changes),
drawing the dense forward's random numbers, so backward fills the dense parameters' gradients from gathered
weights.

Energies equal the reference backend's to float tolerance (different summation order only). Where the model
cannot be interpreted exactly (fx tracing fails, a mask point is not a called module, in-place writes into
values that other ops read, forward hooks), the batched backend scores instead, with a one-time warning.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn

from ..energy import member_energies
from ..modes import all_modules_in
from ._compact_exec import run
from ._compact_plan import CompactUnsupported, build_plan
from ._model_analysis import has_forward_hooks
from .batched import BatchedBackend

# model -> {batch_statistics, or ("train", modes): Plan or CompactUnsupported}; entries die with the model
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module, batch_statistics: bool, training: bool):
    """Scoring plans by scoring mode; training plans by every module's ``training`` flag, which tracing bakes into
    the graph (a module the user switches to eval, or back, gets a plan traced in its new mode)."""
    return ("train", tuple(m.training for m in model.modules())) if training else batch_statistics


def plan_for(model: nn.Module, units, x: torch.Tensor, batch_statistics: bool, training: bool = False):
    """The cached plan of ``model`` for ``units`` (scoring, or ``training`` in the modules' current modes), or the
    ``CompactUnsupported`` explaining why there is none."""
    entry = _PLANS.setdefault(model, {})
    key = _plan_key(model, batch_statistics, training)
    found = entry.get(key)
    if found is None or (not isinstance(found, CompactUnsupported) and found.units is not units):
        try:
            found = build_plan(model, units, x[:2], batch_statistics, training)
        except CompactUnsupported as exc:
            found = exc
            if not entry.get("warned"):
                what = "training with the masked dense forward" if training else "scoring with the batched backend"
                warnings.warn(f"compact backend: {exc}; {what} instead", RuntimeWarning, stacklevel=3)
                entry["warned"] = True
        entry[key] = found
    return found


def _has_hooks(model, plan) -> bool:
    """User hooks on modules the interpreter bypasses: Conv/Linear/BatchNorm are run functionally, and the model
    itself is never called (the traced graph runs in its place), so a hook on the top-level module counts too."""
    modules = dict(model.named_modules())
    return has_forward_hooks([model] + [modules[name] for name in plan.modules])


class CompactBackend(BatchedBackend):
    """The batched backend with each member scored, and on CPU the training forward run, on kept channels only."""

    name = "compact"
    # Score each distinct state once: late in training the population holds many copies of the same state.
    # (Benchmarks turn this off so that every backend computes all S members.)
    deduplicate = True

    def plan(self, x: torch.Tensor, training: bool = False):
        """The bound model's cached fx plan for batches like ``x`` (scoring, or the ``training`` forward), or the
        ``CompactUnsupported`` saying why the interpreter cannot run it."""
        return plan_for(self.model, self.units, x, True if training else self.batch_statistics, training)

    def runs_compact(self, x: torch.Tensor) -> bool:
        """Whether ``score`` runs the compact interpreter on batches like ``x`` (True) or falls back to the
        batched backend (False: untraceable model, forward hooks)."""
        plan = self.plan(x)
        return not isinstance(plan, CompactUnsupported) and not _has_hooks(self.model, plan)

    def score(self, states, x, y):
        """Energies [S], one compact forward per distinct state (``max_members`` is not needed: the compact path
        holds only one member's activations at a time); the batched backend's where the interpreter cannot run."""
        model = self.model
        plan = plan_for(model, self.units, x, self.batch_statistics)
        if isinstance(plan, CompactUnsupported) or _has_hooks(model, plan):
            if not isinstance(plan, CompactUnsupported):
                entry = _PLANS[model]
                if not entry.get("warned_hooks"):
                    warnings.warn("compact backend: the model has forward hooks, which the compact interpreter "
                                  "would bypass; scoring with the batched backend instead", RuntimeWarning,
                                  stacklevel=2)
                    entry["warned_hooks"] = True
            return super().score(states, x, y)
        if self.deduplicate:
            distinct, inverse = torch.unique(states.bool(), dim=0, return_inverse=True)
        else:
            distinct, inverse = states.bool(), torch.arange(states.shape[0], device=states.device)
        with torch.no_grad(), all_modules_in(model, False):
            logits = torch.stack(run(plan, model, distinct, x, self.batch_statistics))
        # one energy call over all members' rows, member-major in the caller's order, exactly as the batched backend
        members = states.shape[0]
        rows = logits.index_select(0, inverse.to(logits.device)).flatten(0, 1)
        return member_energies(self.energy_fn, rows, y.repeat(members), members)

    @property
    def trains_kept_channels(self) -> bool:
        """On CPU with the model in train mode: the training forward and backward run on the best state's kept
        channels only, about the kept share of a dense forward and backward, with the same weights, gradients and
        statistics as the masked dense forward to float tolerance."""
        return self.device.type == "cpu" and self.model.training

    def training_logits(self, state, x):
        """The kept-channel forward where it runs (``trains_kept_channels``, an interpretable model), else the
        masked dense forward."""
        if self.trains_kept_channels:
            logits = self.kept_channel_logits(state, x)
            if logits is not None:
                return logits
        return super().training_logits(state, x)

    def kept_channel_logits(self, state: torch.Tensor, x: torch.Tensor):
        """The model's output with ``state`` [D] applied, computed on kept channels only and differentiable:
        backward fills the model's parameter gradients (zero for pruned elements), and BatchNorm running
        statistics of kept channels move as in the masked dense forward. None where the interpreter cannot run
        the training forward exactly (untraceable model, forward hooks): the masked dense forward runs instead."""
        model = self.model
        plan = plan_for(model, self.units, x, True, training=True)
        if isinstance(plan, CompactUnsupported) or _has_hooks(model, plan):
            return None
        entry = _PLANS[model]
        key = _plan_key(model, True, True)
        ran = entry.setdefault("train_ran", set())
        if key in ran:
            return run(plan, model, state.reshape(1, -1), x, True, train=True)[0]
        # the first training forward of a model: an op the interpreter cannot run under autograd is not fatal; the
        # buffers and random state it may have moved are put back and the masked dense forward takes over for good
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        rng = torch.get_rng_state()
        try:
            out = run(plan, model, state.reshape(1, -1), x, True, train=True)[0]
        except Exception as exc:  # any failure: the dense path is always exact
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            torch.set_rng_state(rng)
            entry[key] = CompactUnsupported(f"the training forward failed ({type(exc).__name__}: {exc})")
            warnings.warn(f"compact backend: {entry[key]}; training with the masked dense forward instead",
                          RuntimeWarning, stacklevel=3)
            return None
        ran.add(key)
        return out
