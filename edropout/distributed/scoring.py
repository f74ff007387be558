"""The two distributed scorers: each wraps one rank's scoring function and returns the same energies [N] on every
rank, with one collective per call that also compares a hash of the best state across the ranks."""
from __future__ import annotations

import math

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


NO_VERDICT = (0.0, 0.0, 0.0)  # what a call without a batch verdict contributes (``checks.batch_verdict``: all fine)


def _verdict(verdict, device) -> torch.Tensor:
    return (torch.tensor(NO_VERDICT, dtype=torch.float64, device=device) if verdict is None
            else verdict.to(device, torch.float64))


class DataParallelScorer:
    """Data-parallel: every rank scores all states on its own shard; per-member energy sums and the sample count
    are all-reduced (one all-reduce of N + 6 float64 values, with the hash and the batch verdicts), so each rank
    gets the global batch's mean energies."""

    def __init__(self, local_score, group, check: StateCheck):
        self.local_score, self.group, self.check = local_score, group, check

    def score(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, verdict=None):
        """(energies [N] of ``states`` on the union of all ranks' batches, the ranks' summed batch verdicts [3]):
        ``verdict`` is this rank's ``checks.batch_verdict`` (None: nothing to report)."""
        local = self.local_score(states, x, y)
        rows = float(x.shape[0])
        return self._reduce(local.double() * rows, rows, verdict)

    def abstain(self, count: int, verdict: torch.Tensor) -> None:
        """Take part in the collective of the others' ``score`` of ``count`` states without scoring (this rank's
        batch is malformed): no samples, and ``verdict`` (``checks.MALFORMED_VERDICT``) stops the other ranks."""
        self._reduce(torch.zeros(count, dtype=torch.float64, device=verdict.device), 0.0, verdict)

    def _reduce(self, sums: torch.Tensor, rows: float, verdict):
        count = torch.full((1,), rows, dtype=torch.float64, device=sums.device)
        hashed = self.check.value.to(sums.device)
        buffer = torch.cat([sums, count, hashed, hashed * hashed, _verdict(verdict, sums.device)])
        dist.all_reduce(buffer, group=self.group)
        n = sums.shape[0]
        self.check.verify_sums(buffer[n + 1], buffer[n + 2], dist.get_world_size(self.group))
        return (buffer[:n] / buffer[n]).float(), buffer[n + 3:]


def snake_layout(count: int, world: int) -> torch.Tensor:
    """Positions 0..count-1 dealt over ``world`` ranks in snake order (0, 1, .., W-1, W-1, .., 0, 0, ..):
    [W, ceil(count / W)] position indices, -1 where a rank has one member fewer. Dealt from a list sorted by
    cost, every rank gets as many members (±1) and about as much work."""
    per = math.ceil(count / world)
    table = torch.full((world, per), -1, dtype=torch.long)
    filled = [0] * world
    for position in range(count):
        turn, offset = divmod(position, world)
        rank = offset if turn % 2 == 0 else world - 1 - offset
        table[rank, filled[rank]] = position
        filled[rank] += 1
    return table


def labels_fingerprint(y: torch.Tensor) -> torch.Tensor:
    """Σ_i y_i·(i + 1) mod 2^20 (exact in float64): differs between batches of other labels or order."""
    positions = torch.arange(1, y.shape[0] + 1, device=y.device)
    return (y.long() * positions).sum().remainder(2 ** 20).double()


class PopulationParallelScorer:
    """Population-parallel: every rank scores its share of the states on the whole batch (at most ceil(N/W)
    states, dealt by estimated cost so that the ranks finish together), and the energies are all-gathered (one
    all-gather of ceil(N/W) + 5 float64 per rank: the energies, the best-state hash, a fingerprint of the
    batch's labels, since every rank must hold the same batch, and the batch verdicts)."""

    def __init__(self, local_score, group, check: StateCheck, cost=None):
        self.local_score, self.group, self.check = local_score, group, check
        self.cost = cost  # cost(states [N, D]) -> Tensor[N]: estimated work of scoring each state (None: equal)
        self._layouts = {}

    def score(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, verdict=None):
        """(energies [N] of ``states`` on the batch, every member scored by exactly one rank, the ranks' summed
        batch verdicts [3]): ``verdict`` is this rank's ``checks.batch_verdict`` (None: nothing to report)."""
        n = states.shape[0]
        layout = self._layout(n)
        per = layout.shape[1]
        costly_first = (torch.arange(n, device=states.device) if self.cost is None else
                        torch.argsort(self.cost(states), descending=True, stable=True))
        mine = layout[dist.get_rank(self.group)]
        mine = mine[mine >= 0]
        chunk = torch.full((per + 5,), float("inf"), dtype=torch.float64, device=states.device)
        if len(mine):
            chunk[:len(mine)] = self.local_score(states[costly_first[mine.to(states.device)]], x, y).double()
        table, everywhere = self._gather(chunk, per, labels_fingerprint(y), verdict)
        # a bad batch on some rank (a label out of range changes the fingerprint) is reported by the pruner instead
        if not bool((table[:, per + 1] == table[0, per + 1]).all() | (everywhere > 0).any()):
            raise ValueError("parallel='population' scores every member on the whole batch, but the ranks hold "
                             "different batches; give every rank the same batches (no DistributedSampler; the "
                             "same shuffling seed)")
        dealt = layout.flatten()
        filled = (dealt >= 0).to(states.device)
        energies = torch.empty(n, dtype=torch.float64, device=states.device)
        energies[costly_first[dealt.to(states.device)[filled]]] = table[:, :per].flatten()[filled]
        return energies.float(), everywhere

    def abstain(self, count: int, verdict: torch.Tensor) -> None:
        """Take part in the collective of the others' ``score`` of ``count`` states without scoring (this rank's
        batch is malformed): ``verdict`` (``checks.MALFORMED_VERDICT``) stops the other ranks."""
        per = self._layout(count).shape[1]
        chunk = torch.full((per + 5,), float("inf"), dtype=torch.float64, device=verdict.device)
        self._gather(chunk, per, 0.0, verdict)

    def _layout(self, count: int) -> torch.Tensor:
        if count not in self._layouts:
            self._layouts[count] = snake_layout(count, dist.get_world_size(self.group))
        return self._layouts[count]

    def _gather(self, chunk: torch.Tensor, per: int, fingerprint, verdict):
        """All-gather ``chunk`` (this rank's energies in its first ``per`` entries) with the best-state hash, the
        labels' ``fingerprint`` and ``verdict`` appended: (the table [W, per + 5], the summed verdicts [3])."""
        chunk[per] = self.check.value.to(chunk.device)[0]
        chunk[per + 1] = fingerprint
        chunk[per + 2:] = _verdict(verdict, chunk.device)
        everyone = [torch.empty_like(chunk) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(everyone, chunk, group=self.group)
        table = torch.stack(everyone)
        self.check.verify(table[:, per])
        return table, table[:, per + 2:].sum(dim=0)
