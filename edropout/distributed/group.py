"""Which ranks a pruner works with and how it splits the work: resolved once from ``process_group=``,
``parallel=`` and the model's DDP wrapper, and checked once across ranks."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .scoring import DataParallelScorer, PopulationParallelScorer

MODES = ("data", "population")


@dataclass(frozen=True)
class Parallelism:
    """How one pruner shares its work with the other ranks of ``group`` (None: the default group)."""

    mode: str
    group: object
    rank: int
    world_size: int

    def scorer(self, local_score, check, cost=None):
        """The scorer of this mode around ``local_score(states, x, y) -> Tensor[N]`` (one rank's backend);
        population mode deals the states by ``cost(states) -> Tensor[N]``, their estimated work."""
        if self.mode == "data":
            return DataParallelScorer(local_score, self.group, check)
        return PopulationParallelScorer(local_score, self.group, check, cost)

    def check_batch(self, x: torch.Tensor, training: bool = False) -> None:
        """Every rank needs a non-empty batch; population mode trains every rank on an equal slice of it."""
        rows = x.shape[0]
        if rows == 0:
            raise ValueError(f"rank {self.rank} got an empty batch; every rank needs at least one sample")
        if training and self.mode == "population" and rows % self.world_size:
            raise ValueError(f"parallel='population' trains each rank on an equal slice of the batch, but the "
                             f"batch has {rows} rows for {self.world_size} ranks; use a batch size divisible by "
                             f"the number of ranks")

    def training_rows(self, x: torch.Tensor, y: torch.Tensor):
        """The rows this rank trains on: its shard as given (data mode) or its slice of the whole batch
        (population mode), so that DDP's average of the ranks' gradients is the whole batch's gradient."""
        if self.mode == "data":
            return x, y
        return x.chunk(self.world_size)[self.rank], y.chunk(self.world_size)[self.rank]

    def check_same_settings(self, settings: dict, device) -> None:
        """Every rank must evolve the same way: compare ``settings`` (numbers or strings) across the ranks once."""
        names = sorted(settings)
        values = [float(zlib.crc32(v.encode())) if isinstance(v, str) else float(v) for v in
                  (settings[n] for n in names)]
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        table = torch.stack(everyone).cpu()
        for column, name in enumerate(names):
            if not bool((table[:, column] == table[0, column]).all()):
                raise ValueError(f"EDropout ranks disagree on {name}: rank 0 has {table[0, column].item():g}, rank "
                                 f"{int((table[:, column] != table[0, column]).nonzero()[0])} differs; build the "
                                 f"pruner with the same model and settings on every rank")


def resolve_parallelism(ddp, process_group, parallel) -> Parallelism | None:
    """The parallelism for ``EDropout(..., process_group=, parallel=)``, or None for a single process.

    Distributed when ``torch.distributed`` is initialised with more than one rank in the group (the given
    ``process_group``, else the DDP wrapper's, else the default group); the mode defaults to ``"data"``."""
    if parallel is not None and parallel not in MODES:
        raise ValueError(f"unknown parallel mode {parallel!r}: use one of {MODES} (or None: data-parallel when "
                         f"torch.distributed is initialised)")
    if not (dist.is_available() and dist.is_initialized()):
        if parallel is not None or process_group is not None:
            raise ValueError(f"parallel={parallel!r} / process_group= need torch.distributed initialised: start "
                             f"the script with torchrun and call torch.distributed.init_process_group first")
        return None
    group = process_group if process_group is not None else (ddp.process_group if ddp is not None else None)
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return None
    return Parallelism(parallel or "data", group, dist.get_rank(group), world_size)
