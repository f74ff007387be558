"""EDropout across processes with ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on CPU).

Two modes, both keeping the evolution identical on every rank (same seed, so the same random numbers):
- ``"data"``: every rank scores the whole population on its own shard of the batch; per-member energy sums and
  sample counts are all-reduced, so every rank holds the energies of the global batch;
- ``"population"``: every rank holds the whole batch and scores its slice of the members; the energies are
  all-gathered. The training step then runs on the rank's slice of the batch rows.
The model trains under ``DistributedDataParallel`` (DDP's gradient all-reduce, then the masked update). Each
energy collective also carries a hash of the best state, so ranks that drift apart stop with a clear error.
"""
from .ddp import forward_inside, unwrap, wrapper_like
from .group import MODES, Parallelism, resolve_parallelism
from .scoring import DataParallelScorer, PopulationParallelScorer, RanksDiverged, StateCheck

__all__ = ["MODES", "Parallelism", "resolve_parallelism", "DataParallelScorer", "PopulationParallelScorer",
           "StateCheck", "RanksDiverged", "unwrap", "forward_inside", "wrapper_like"]
