"""The main job under ``torchrun``: join the job the environment describes (NCCL with one GPU per rank, else
gloo), and deal each rank its batches with a ``DistributedSampler``. Rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .errors import UserError


@dataclass(frozen=True)
class Launch:
    """This process's place in the job: rank, number of ranks, device and parallel mode (a single process is
    rank 0 of 1)."""

    rank: int
    world_size: int
    device: torch.device
    parallel: str | None = None
    owns_group: bool = False  # whether ``join`` created the process group (and ``leave`` destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, reports and plots and shows progress (rank 0)."""
        return self.rank == 0

    def local_batch_size(self, batch_size: int) -> int:
        """Rows per step on this rank: ``batch_size`` is the global batch, split over the ranks in data mode and
        held whole by every rank in population mode (which trains each rank on 1/W of it)."""
        if not self.distributed:
            return batch_size
        if batch_size % self.world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch and must divide evenly over the "
                             f"{self.world_size} ranks; use a multiple of {self.world_size}")
        return batch_size // self.world_size if self.parallel == "data" else batch_size

    def epoch_order(self, rows: int, epoch: int, seed: int) -> torch.Tensor:
        """This rank's order of the ``rows`` training rows for one epoch, from a ``DistributedSampler`` shuffled
        by (seed, epoch): in data mode each global batch is dealt over the ranks (consecutive ``local_batch_size``
        slices), in population mode every rank gets the same whole order. The last partial batch is dropped by the
        caller."""
        replicas, rank = (self.world_size, self.rank) if self.parallel == "data" else (1, 0)
        sampler = DistributedSampler(range(rows), num_replicas=replicas, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def batches_per_epoch(self, rows: int, batch_size: int) -> int:
        """How many steps one epoch of ``rows`` training rows takes on every rank."""
        replicas = self.world_size if self.parallel == "data" else 1
        return (rows // replicas) // self.local_batch_size(batch_size)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per rank
    return device


def core_share(cores, local_rank: int, local_world_size: int) -> list:
    """The cores of ``cores`` (sorted) that local rank ``local_rank`` of ``local_world_size`` gets: consecutive
    blocks as even as the count allows (8 cores over 3 ranks: 2, 3, 3)."""
    cores = sorted(cores)
    if len(cores) < local_world_size:
        raise UserError(f"--bind-cores gives every rank a core of its own, but this machine lets the job use "
                        f"{len(cores)} cores for {local_world_size} ranks on it; start at most {len(cores)} "
                        f"ranks per machine (--nproc_per_node), or leave out --bind-cores")
    return cores[local_rank * len(cores) // local_world_size:(local_rank + 1) * len(cores) // local_world_size]


def bind_cores(local_rank: int, local_world_size: int) -> int:
    """Bind this process, and every thread it starts from now on (the collectives' threads too), to its own share
    of the cores it may use (``core_share``), so that ranks on one CPU host do not move between cores and slow
    each other's collectives; returns the number of cores it got."""
    mine = core_share(os.sched_getaffinity(0), local_rank, local_world_size)
    os.sched_setaffinity(0, mine)
    return len(mine)


def join(device_name: str = "auto", parallel: str = "data", bind: bool = False, threads: int | None = None) -> Launch:
    """The job described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), joined with
    NCCL on GPUs and gloo on CPU; a single process when WORLD_SIZE is absent or 1. ``threads``: this process's CPU
    threads (None: torch's default). ``bind`` (CPU ranks only): ``bind_cores`` before joining, and as many threads
    as the cores it got unless ``threads`` says otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_name, local_rank)
    if bind and world_size > 1 and device.type == "cpu":
        cores = bind_cores(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        threads = threads or cores
    if threads:
        torch.set_num_threads(threads)
    if world_size == 1:
        return Launch(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Launch(dist.get_rank(), dist.get_world_size(), device, parallel, owns_group)


def leave(launch: Launch, finished: bool = True) -> None:
    """Leave the job if ``join`` started it (a no-op for a single process or a group the caller made). After a
    finished run the ranks first wait for each other (rank 0 writes the report meanwhile) and drop their DDP
    wrappers while the group still exists; after an error they leave at once."""
    if not (launch.owns_group and dist.is_initialized()):
        return
    if finished:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()
