"""A size target for pruning states: the exact share of parameters (or FLOPs) that export removes, and a seeded,
population-vectorised repair that adds or removes units until every state removes the target share.

Export removes, for each trainable parameter, every row and column whose bit is 0, so a parameter keeps
``prod over its pruned axes of (kept positions on that axis) × (its other dims)`` elements: a conv weight keeps
kept_out × kept_in × k × k, and a unit in a group that couples several layers costs all of their weights.
``SizeMeasure`` evaluates that count for a whole population at once with one product of a bit-to-axis incidence
matrix, and also gives, for every bit of every state, the exact change of the count when only that bit flips.
FLOPs are the same sum with each Conv/Linear weight element weighted by its FLOPs (``edropout.flops``).
"""
from __future__ import annotations

import torch

from .flops import flops_per_weight
from .units import PrunableUnits

METRICS = ("params", "flops")
# Repair aims for the target within this many shares (half a percentage point either way).
TOLERANCE = 0.005
# Repair stops after this many rounds even if some state could not be brought within the tolerance.
MAX_ROUNDS = 32


def check_metric(metric: str) -> str:
    """The size metric must be one we can count exactly."""
    if metric not in METRICS:
        raise ValueError(f"target_metric must be one of {METRICS}, got {metric!r}")
    return metric


class SizeMeasure:
    """Kept size (trainable parameters or FLOPs of Conv/Linear weights) of the exported network, as an exact
    function of pruning states [S, D], vectorised over the states.

    FLOPs of layers whose weight is frozen (``requires_grad=False``) are counted as never removed."""

    def __init__(self, units: PrunableUnits, metric: str = "params", model=None, example_inputs=None):
        self.metric = check_metric(metric)
        d = units.num_units
        if metric == "flops":
            if model is None or example_inputs is None:
                raise ValueError("the FLOPs metric needs the model and example_inputs to count FLOPs")
            factors = flops_per_weight(model, example_inputs)
            weight_of = {f"{name}.weight" if name else "weight": float(f) for name, f in factors.items()}
            modules = dict(model.named_modules())
            self.total = float(sum(f * modules[name].weight.numel() for name, f in factors.items()))
        else:
            weight_of = None
            self.total = float(units.total_parameters)
        columns, singles, pairs = [], [], []
        removable = 0.0
        for pa in units.param_axes:
            weight = 1.0 if weight_of is None else weight_of.get(pa.name, 0.0)
            if weight == 0.0:
                continue
            rest = 1
            for dim, size in enumerate(pa.shape):
                if dim not in pa.axes:
                    rest *= size
            full = rest
            cols = []
            for dim, index in sorted(pa.axes.items()):
                cols.append(len(columns))
                columns.append(torch.bincount(index, minlength=d + 1).double())
                full *= pa.shape[dim]
            removable += weight * full
            coefficient = weight * rest
            if len(cols) == 1:
                singles.append((cols[0], coefficient))
            elif len(cols) == 2:
                pairs.append((cols[0], cols[1], coefficient))
            else:
                raise ValueError(f"parameter {pa.name} has {len(cols)} prunable axes; at most 2 are supported")
        self.base = self.total - removable  # what no bit can remove
        incidence = torch.stack(columns, dim=1)  # [D + 1, T]: positions of bit b on axis t
        t = incidence.shape[1]
        # kept(states) = base + C @ linear + sum_p c_p C[:, i_p] C[:, j_p], with C = extended states @ incidence
        self._incidence = incidence
        self._linear = torch.zeros(t, dtype=torch.float64)
        for col, c in singles:
            self._linear[col] += c
        self._pair_i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        self._pair_j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        self._pair_c = torch.tensor([p[2] for p in pairs], dtype=torch.float64)
        # Flipping bit b (sign s = +1 if kept, -1 if pruned) removes s·(L_b + (C @ G)_b) − H_b, exactly:
        # a single axis loses s·a positions; a pair (C_i − s·a)(C_j − s·b) = C_i C_j − s(a C_j + b C_i) + a b.
        bits = incidence[:d]
        self._single_cost = bits @ self._linear  # L [D]
        cross = torch.zeros(t, d, dtype=torch.float64)  # G [T, D]
        cross.index_add_(0, self._pair_j, (bits[:, self._pair_i] * self._pair_c).T)
        cross.index_add_(0, self._pair_i, (bits[:, self._pair_j] * self._pair_c).T)
        self._cross = cross
        self._self_pair = (bits[:, self._pair_i] * bits[:, self._pair_j]) @ self._pair_c  # H [D]
        self._device = torch.device("cpu")

    def _to(self, device) -> None:
        if self._device != device:
            for name in ("_incidence", "_linear", "_pair_i", "_pair_j", "_pair_c", "_single_cost", "_cross",
                         "_self_pair"):
                setattr(self, name, getattr(self, name).to(device))
            self._device = device

    def _axis_counts(self, states):
        self._to(states.device)
        ones = torch.ones(states.shape[0], 1, dtype=torch.float64, device=states.device)
        return torch.cat([states.double(), ones], dim=1) @ self._incidence

    def _kept_from_counts(self, counts):
        pairs = (counts[:, self._pair_i] * counts[:, self._pair_j]) @ self._pair_c
        return self.base + counts @ self._linear + pairs

    def kept(self, states: torch.Tensor) -> torch.Tensor:
        """Size left after export for each state [S, D]: Tensor[S] (float64, integral)."""
        return self._kept_from_counts(self._axis_counts(states.reshape(states.shape[0], -1).bool()))

    def share_removed(self, states: torch.Tensor) -> torch.Tensor:
        """Share of the dense size that export removes, for each state [S, D]: Tensor[S] (float64)."""
        return 1.0 - self.kept(states) / self.total

    def flip_costs(self, states: torch.Tensor) -> torch.Tensor:
        """[S, D]: by how much the kept size changes (in absolute value) when only that bit of that state flips:
        what removing a kept unit removes, or what adding back a pruned unit adds. Exact for single flips; flips
        of several bits interact (a conv weight keeps kept_out × kept_in)."""
        states = states.bool()
        counts = self._axis_counts(states)
        sign = states.double() * 2 - 1
        return self._single_cost + counts @ self._cross - sign * self._self_pair


def _protected(states, keys, group_of_unit):
    """One kept unit per group and state (the one with the highest key) that removal must leave alone."""
    size, d = states.shape
    index = group_of_unit.to(states.device).expand(size, d)
    masked_keys = torch.where(states, keys, torch.full_like(keys, -1.0))
    groups = int(group_of_unit.max()) + 1
    top = torch.full((size, groups), -1.0, device=states.device).scatter_reduce(1, index, masked_keys, "amax")
    return states & (masked_keys == top.gather(1, index))


class SizeTarget:
    """Keeps a population at ``target`` share removed, by repair (default) or by an energy penalty.

    ``repair`` adds units to states that remove too much and removes units from states that remove too little,
    chosen at random from the generator, until each state is within ``TOLERANCE`` of the target (or no single
    flip brings it closer). With ``penalty`` set, states are not repaired; instead ``penalty`` × (distance of the
    share removed from the tolerance band) is added to their energy.
    """

    def __init__(self, units: PrunableUnits, target: float, metric: str = "params", penalty=None, model=None,
                 example_inputs=None):
        target = float(target)
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target is the share of {metric} to remove; it must lie in [0, 1), got {target}")
        if penalty is not None and not float(penalty) > 0:
            raise ValueError(f"target_penalty must be a positive weight (or None to repair states instead), "
                             f"got {penalty}")
        self.measure = SizeMeasure(units, metric, model, example_inputs)
        self.target = target
        self.metric = metric
        self.penalty_weight = None if penalty is None else float(penalty)
        self.group_of_unit = units.group_of_unit
        reachable = float(self.measure.share_removed(self._one_per_group(units))[0])
        if target > reachable + TOLERANCE:
            raise ValueError(f"target {target} is beyond what pruning can remove from this model: keeping one unit "
                             f"per group removes {reachable:.4f} of its {metric} (the classifier's outputs, ignored "
                             f"layers and unprunable layers always stay); ask for at most {reachable:.2f}")

    @staticmethod
    def _one_per_group(units):
        state = torch.zeros(1, units.num_units, dtype=torch.bool)
        for group in units.groups:
            state[0, group.first_bit] = True
        return state

    @property
    def repairs(self) -> bool:
        """True when states are repaired to the target, False when they are penalised instead."""
        return self.penalty_weight is None

    def distance(self, states: torch.Tensor) -> torch.Tensor:
        """How far each state's share removed lies outside target ± TOLERANCE (0 inside): Tensor[S] float64."""
        return ((self.measure.share_removed(states) - self.target).abs() - TOLERANCE).clamp(min=0)

    def penalise(self, states: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Energies with the size penalty added (unchanged when repairing)."""
        if self.repairs:
            return energies
        return energies + (self.penalty_weight * self.distance(states)).to(energies.dtype)

    def repair(self, states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """States [S, D] moved to the target by flipping units chosen from ``generator`` (unchanged when
        penalising). Never empties a group that has a kept unit; states already within tolerance are unchanged.

        Each round, in every state outside the band, the candidate units (kept ones, one per group protected,
        when too much is kept; pruned ones otherwise) whose single flip fits what is missing are taken in a random
        order while their flip costs add up to at most what is missing. Removals never overshoot (together they
        remove at most the sum of their single costs); an addition that overshoots is undone by later removals.
        If no candidate fits, the one with the smallest cost flips when that brings the state closer."""
        if not self.repairs:
            return states
        states = states.bool().clone()
        size, d = states.shape
        goal = (1.0 - self.target) * self.measure.total
        band = TOLERANCE * self.measure.total
        for _ in range(MAX_ROUNDS):
            excess = self.measure.kept(states) - goal  # > 0: too much kept
            outside = excess.abs() > band
            if not bool(outside.any()):
                break
            remove = (excess > 0).unsqueeze(1)
            budget = torch.where(excess > 0, excess + band, -excess).unsqueeze(1)
            costs = self.measure.flip_costs(states)
            keys = torch.rand(size, d, generator=generator).to(states.device)
            protected = _protected(states, keys, self.group_of_unit)
            candidate = outside.unsqueeze(1) & torch.where(remove, states & ~protected, ~states)
            fits = candidate & (costs <= budget)
            order = torch.where(fits, keys.double(), torch.full_like(costs, 2.0)).argsort(dim=1)
            sorted_fits = fits.gather(1, order)
            running = (costs.gather(1, order) * sorted_fits).cumsum(dim=1)
            flips = torch.zeros_like(states).scatter(1, order, sorted_fits & (running <= budget))
            # no candidate fits: the cheapest single flip, if it lands closer to the goal than the state is now
            cheapest_cost, cheapest = torch.where(candidate, costs, torch.full_like(costs, float("inf"))).min(dim=1)
            stuck = outside & ~fits.any(dim=1) & (cheapest_cost < 2 * excess.abs())
            flips[stuck, cheapest[stuck]] = True
            if not bool(flips.any()):
                break
            states ^= flips
        return states
