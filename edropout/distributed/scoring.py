"""The two distributed scorers: each wraps one rank's scoring function and returns the same energies [N] on every
rank, with one collective per call that also compares a hash of the best state across the ranks."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class RanksDiverged(RuntimeError):
    """The ranks' best states differ: their evolutions no longer draw the same random numbers or energies."""


class StateCheck:
    """A hash of the best state, refreshed whenever it changes and compared across the ranks in every energy
    collective: Σ_d s_d·w_d mod 2^20 with fixed random weights w (a differing state escapes with odds 2^-20)."""

    BITS = 20

    def __init__(self, num_units: int, device):
        weights = torch.randint(0, 2 ** self.BITS, (num_units,), generator=torch.Generator().manual_seed(0x5EED))
        self.weights = weights.to(device)
        self.since = 0
        self.value = self._hash(torch.ones(num_units, dtype=torch.bool, device=device))

    def _hash(self, state: torch.Tensor) -> torch.Tensor:
        return (state.long() * self.weights).sum().remainder(2 ** self.BITS).double().reshape(1)

    def update(self, state: torch.Tensor, iteration: int) -> None:
        """Record the new best state, chosen at ``iteration``."""
        self.value = self._hash(state)
        self.since = iteration

    def verify(self, hashes: torch.Tensor) -> None:
        """Raise ``RanksDiverged`` unless every rank's hash (one per rank, [W]) is the same."""
        if not bool((hashes == hashes[0]).all()):
            self._diverged()

    def verify_sums(self, total: torch.Tensor, total_of_squares: torch.Tensor, world_size: int) -> None:
        """The same from all-reduced Σh and Σh² (every rank sees the same verdict): the hashes are all equal
        exactly when W·Σh² = (Σh)², computed exactly in float64 for h < 2^20."""
        if float(world_size * total_of_squares - total * total) != 0.0:
            self._diverged()

    def _diverged(self):
        raise RanksDiverged(
            f"EDropout ranks diverged: the best pruning state chosen at iteration {self.since} differs across the "
            f"ranks. Every rank must build the pruner on the same model with the same seed and settings and call "
            f"step()/energies() together, with the same batch in parallel='population' mode")


NO_VERDICT = (0.0, 0.0)  # what a call without a batch verdict contributes (``checks.batch_verdict``: all fine)


def _verdict(verdict, device) -> torch.Tensor:
    return (torch.tensor(NO_VERDICT, dtype=torch.float64, device=device) if verdict is None
            else verdict.to(device, torch.float64))


class DataParallelScorer:
    """Data-parallel: every rank scores all states on its own shard; per-member energy sums and the sample count
    are all-reduced (one all-reduce of N + 5 float64 values, with the hash and the batch verdicts), so each rank
    gets the global batch's mean energies."""

    def __init__(self, local_score, group, check: StateCheck):
        self.local_score, self.group, self.check = local_score, group, check

    def score(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, verdict=None):
        """(energies [N] of ``states`` on the union of all ranks' batches, the ranks' summed batch verdicts [2]):
        ``verdict`` is this rank's ``checks.batch_verdict`` (None: nothing to report)."""
        local = self.local_score(states, x, y)
        rows = float(x.shape[0])
        count = torch.full((1,), rows, dtype=torch.float64, device=local.device)
        hashed = self.check.value.to(local.device)
        buffer = torch.cat([local.double() * rows, count, hashed, hashed * hashed, _verdict(verdict, local.device)])
        dist.all_reduce(buffer, group=self.group)
        n = states.shape[0]
        self.check.verify_sums(buffer[n + 1], buffer[n + 2], dist.get_world_size(self.group))
        return (buffer[:n] / buffer[n]).float(), buffer[n + 3:]


def deal(costs: list, speeds: list, cap: int) -> list:
    """Positions 0..N-1 of ``costs`` (estimated work, costliest first) dealt over the ranks: each to the rank that
    would finish it soonest, (load + cost) / speed, among ranks with fewer than ``cap`` positions, ties to the
    lowest rank. [W] lists of positions; with equal speeds and costs, positions go round the ranks (±1 member)."""
    world = len(speeds)
    loads, dealt = [0.0] * world, [[] for _ in range(world)]
    for position, cost in enumerate(costs):
        rank = min((r for r in range(world) if len(dealt[r]) < cap), key=lambda r: ((loads[r] + cost) / speeds[r], r))
        dealt[rank].append(position)
        loads[rank] += cost
    return dealt


def labels_fingerprint(y: torch.Tensor) -> torch.Tensor:
    """Σ_i y_i·(i + 1) mod 2^20 (exact in float64): differs between batches of other labels or order."""
    positions = torch.arange(1, y.shape[0] + 1, device=y.device)
    return (y.long() * positions).sum().remainder(2 ** 20).double()


class PopulationParallelScorer:
    """Population-parallel: every rank scores its share of the states on the whole batch, and the energies are
    all-gathered (one all-gather per call of 2·ceil(N/W) + 6 float64 per rank: the energies, the best-state hash, a
    fingerprint of the batch's labels, since every rank must hold the same batch, the batch verdict, and the rank's
    dealt work and scoring seconds).

    The states are dealt by estimated work (``cost``) and by each rank's measured speed, so that the ranks finish
    together: on CPU the ranks' cores need not be equally fast (on a shared 2-core machine one rank's scoring took
    5 ms longer than the other's, for the same work, over whole runs). Speeds are work per second of the last
    calls, from the gathered numbers, so every rank deals alike; with a device that runs asynchronously (CUDA) the
    host clock does not see the work, and speeds stay equal. Which rank scores a member does not change its energy
    where members are scored one by one (the compact backend); the batched backend's S·B-row forwards may round
    differently when the grouping changes."""

    SMOOTHING = 0.5  # weight of the newest measurement in each rank's speed

    def __init__(self, local_score, group, check: StateCheck, cost=None):
        self.local_score, self.group, self.check = local_score, group, check
        self.cost = cost  # cost(states [N, D], x) -> Tensor[N]: estimated work of scoring each state (None: equal)
        self.speeds = None  # [W] relative work per second, the same on every rank

    def score(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, verdict=None):
        """(energies [N] of ``states`` on the batch, every member scored by exactly one rank, the ranks' summed
        batch verdicts [2]): ``verdict`` is this rank's ``checks.batch_verdict`` (None: nothing to report)."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if self.speeds is None:
            self.speeds = [1.0] * world
        n = states.shape[0]
        costs = (torch.ones(n, dtype=torch.float64) if self.cost is None else
                 self.cost(states, x).detach().to("cpu", torch.float64))
        costly_first = torch.argsort(costs, descending=True, stable=True)
        ordered = costs[costly_first].tolist()
        per = min(n, 2 * math.ceil(n / world))
        dealt = deal(ordered, self.speeds, per)
        mine = costly_first[dealt[rank]].to(states.device)
        chunk = torch.full((per + 6,), float("inf"), dtype=torch.float64, device=states.device)
        start = time.perf_counter()
        if len(mine):
            chunk[:len(mine)] = self.local_score(states[mine], x, y).double()
        seconds = time.perf_counter() - start
        chunk[per] = self.check.value.to(chunk.device)[0]
        chunk[per + 1] = labels_fingerprint(y)
        chunk[per + 2:per + 4] = _verdict(verdict, chunk.device)
        chunk[per + 4] = sum(ordered[p] for p in dealt[rank])
        chunk[per + 5] = seconds
        everyone = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(everyone, chunk, group=self.group)
        table = torch.stack(everyone)
        self.check.verify(table[:, per])
        everywhere = table[:, per + 2:per + 4].sum(dim=0)
        # a bad batch on some rank (a label out of range changes the fingerprint) is reported by the pruner instead
        if not bool((table[:, per + 1] == table[0, per + 1]).all() | (everywhere > 0).any()):
            raise ValueError("parallel='population' scores every member on the whole batch, but the ranks hold "
                             "different batches; give every rank the same batches (no DistributedSampler; the "
                             "same shuffling seed)")
        if states.device.type == "cpu":
            self._measured(table[:, per + 4].tolist(), table[:, per + 5].tolist())
        layout = torch.full((world, per), -1, dtype=torch.long)
        for r, positions in enumerate(dealt):
            layout[r, :len(positions)] = costly_first[positions]
        flat = layout.flatten()
        filled = flat >= 0
        energies = torch.empty(n, dtype=torch.float64, device=states.device)
        energies[flat[filled].to(states.device)] = table[:, :per].flatten()[filled.to(states.device)]
        return energies.float(), everywhere

    def _measured(self, work: list, seconds: list) -> None:
        """Fold each rank's dealt work per second, relative to the ranks' mean, into its speed (a rank without
        work or time keeps its speed); speeds are kept at mean 1. The same numbers on every rank give the same
        speeds."""
        rates = [w / t if w > 0 and t > 0 else None for w, t in zip(work, seconds)]
        known = [r for r in rates if r is not None]
        if not known:
            return
        mean_rate = sum(known) / len(known)
        speeds = [s if r is None else (1 - self.SMOOTHING) * s + self.SMOOTHING * r / mean_rate
                  for s, r in zip(self.speeds, rates)]
        mean = sum(speeds) / len(speeds)
        self.speeds = [s / mean for s in speeds]
