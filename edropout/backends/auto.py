"""``backend="auto"``: the triton backend on CUDA (when Triton is installed); on CPU the compact backend's
kept-channel training, and for each scoring call the compact backend when a member's kept work is large enough to
pay for its per-op interpreter overhead, else the batched backend; the batched backend elsewhere.

Cost model (population of S members, batch B, dense multiply-adds per sample M, kept share of those
multiply-adds ρ, per-member steps n of the compact plan):
    compact ≈ S · (B·M·ρ·c + n·t)          batched ≈ S · B·M·c·r
c is the compact backend's cost per kept multiply-add, r how many times more the batched backend pays per dense
multiply-add, t the compact interpreter's cost per step. Compact wins when  B·M·(r − ρ) > n·t/c ; S cancels.
The rule reads only the cached plan and the states: well under a millisecond per call.

Measurement (``python benchmarks/cpu_table.py --calibrate-only``; AMD EPYC, AVX2, 2 torch threads, machine
shared with other jobs, so ratios of interleaved runs): q = compact time / batched time at S = 8,
k = 1.0 / 0.5 / 0.25 (exact keep fractions), 28×28 grey input:
                                B=2             B=8             B=32            B=128
    lenet    (M=3.0e6, n=13)   1.21 1.78 1.80  0.59 0.91 0.84  0.46 0.48 0.36  0.33 0.26 0.20
    resnet18 (M=2.9e7, n=68)   1.48 2.08 1.89  0.79 0.90 0.80  0.32 0.28 0.27  0.20 0.18 0.13
A relative-error least-squares fit of q = ρ/r + (t/c)/r · n/(B·M) gives r = 3.6 and t/c = 3.5e6 multiply-adds
per step; with them the rule picks the measured winner in 24 of 24 cases. A second run (the full table, 36
cases) refits r = 4.8, t/c = 7.7e6; the constants in use pick the winner in 33 of 36 there, the misses at B = 8
with k < 1, where the two backends are within 1.0-1.44× of each other. Batched only wins at a few samples per
batch (and on the 8×8 test nets), where the interpreter's per-op cost dominates. The batched backend
is slower per multiply-add than one-member-at-a-time on this CPU (one S·B-row NCHW forward with mask multiplies
and per-member statistics, against oneDNN channels-last convolutions on B rows).
"""
from __future__ import annotations

import importlib.util

import torch

from . import compact
from ._compact_plan import CompactUnsupported
from ._model_analysis import weight_axes
from .base import Backend
from .batched import BatchedBackend
from .compact import CompactBackend
from .triton import TritonBackend

# r: batched cost per dense multiply-add over compact cost per kept multiply-add
MEASURED_RATIO = 3.6
# t/c: the compact interpreter's cost of one per-member step, in kept multiply-adds
MEASURED_STEP_MACS = 3.5e6


def kept_mac_fraction(plan, units, states: torch.Tensor) -> float:
    """ρ: mean over members of the share of the dense Conv/Linear multiply-adds that a compact forward still does
    (kept input channels × kept output channels of every layer, weighted by the layer's multiply-adds)."""
    ext = units.extended(states.reshape(-1, units.num_units).cpu()).float()
    total = kept = 0.0
    for name, macs in plan.layer_macs.items():
        share = torch.ones(ext.shape[0])
        for dim, index in weight_axes(units, name).items():
            if dim in (0, 1):
                share = share * ext[:, index].mean(dim=1)
        total += macs
        kept += macs * float(share.mean())
    return kept / total if total else 1.0


def features(model, units, states: torch.Tensor, x: torch.Tensor, batch_statistics: bool = True):
    """(B·M, ρ, n) for the rule, or None when the compact backend would fall back to batched anyway."""
    plan = compact.plan_for(model, units, x, batch_statistics)
    if isinstance(plan, CompactUnsupported):
        return None
    return x.shape[0] * sum(plan.layer_macs.values()), kept_mac_fraction(plan, units, states), len(plan.member)


def choose(model, units, states: torch.Tensor, x: torch.Tensor, batch_statistics: bool = True,
           ratio: float = None, step_macs: float = None) -> type:
    """``CompactBackend`` or ``BatchedBackend``, whichever the cost model above says scores this model, population
    and batch faster (``ratio`` and ``step_macs`` replace the measured constants, e.g. to calibrate them)."""
    found = features(model, units, states, x, batch_statistics)
    if found is None:
        return BatchedBackend
    work, rho, steps = found
    ratio = MEASURED_RATIO if ratio is None else ratio
    step_macs = MEASURED_STEP_MACS if step_macs is None else step_macs
    return CompactBackend if work * (ratio - rho) > steps * step_macs else BatchedBackend


def main_backend_for(device: torch.device) -> type:
    """The backend that does most of auto's work on ``device``: triton on CUDA when Triton is installed (kept-channel
    kernels), compact on CPU (kept-channel training and, by the rule above, scoring), else batched."""
    if device.type == "cuda" and importlib.util.find_spec("triton"):
        return TritonBackend
    return CompactBackend if device.type == "cpu" else BatchedBackend


class AutoBackend(Backend):
    """The fastest backend for the device, composed of the others: ``main`` does everything but, on CPU, the
    scoring calls for which the cost model above picks the batched backend."""

    name = "auto"

    def bind(self, model, units, energy_fn, *, batch_statistics=True, max_members=None):
        """Bind, and bind the backends it composes for the model's device."""
        super().bind(model, units, energy_fn, batch_statistics=batch_statistics, max_members=max_members)
        options = dict(batch_statistics=batch_statistics, max_members=max_members)
        self.main = main_backend_for(self.device)().bind(model, units, energy_fn, **options)
        cpu = self.device.type == "cpu"
        self.batched = BatchedBackend().bind(model, units, energy_fn, **options) if cpu else None
        return self

    def __str__(self) -> str:
        return f"auto ({self.main}{' or batched per call' if self.batched is not None else ''})"

    @property
    def max_members(self):
        """Most members per forward, for every backend it composes."""
        return self._max_members

    @max_members.setter
    def max_members(self, value):
        self._max_members = value
        for part in (getattr(self, "main", None), getattr(self, "batched", None)):
            if part is not None:
                part.max_members = value

    @property
    def trains_kept_channels(self) -> bool:
        """As ``main``: on CPU the compact backend's kept-channel training."""
        return self.main.trains_kept_channels

    def scorer(self, states: torch.Tensor, x: torch.Tensor) -> Backend:
        """The composed backend that scores ``states`` on batches like ``x``: on CPU the one the measured rule picks
        for this model, population and batch (well under a millisecond); elsewhere ``main``."""
        if self.batched is not None and choose(self.model, self.units, states, x,
                                               self.batch_statistics) is BatchedBackend:
            return self.batched
        return self.main

    def score(self, states, x, y):
        """Energies [S] from ``scorer``'s choice."""
        return self.scorer(states, x).score(states, x, y)

    def children(self, population, mutation_factor, crossover_rate, *, generator, seed, iteration):
        """``main``'s children."""
        return self.main.children(population, mutation_factor, crossover_rate, generator=generator, seed=seed,
                                  iteration=iteration)

    def select(self, population, energies, children, child_energies):
        """``main``'s selection."""
        return self.main.select(population, energies, children, child_energies)

    def training_logits(self, state, x):
        """``main``'s training forward."""
        return self.main.training_logits(state, x)

    def optimizer_step(self, optimizer, view):
        """``main``'s masked update."""
        self.main.optimizer_step(optimizer, view)

    def optimizer_step_if_finite(self, optimizer, view, value):
        """``main``'s guarded masked update."""
        return self.main.optimizer_step_if_finite(optimizer, view, value)
