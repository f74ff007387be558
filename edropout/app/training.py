"""Evaluation (Top-1/Top-5), plain training, and the EDropout training loop of the main job and benchmarks, with
atomic checkpoints and resume."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import time

import numpy as np
import torch

from .checkpoint import atomic_save, load_checkpoint
from .data import batches
from .errors import CheckpointError
from .launch import Launch
from ..modes import all_modules_in
from ..pruner import EDropout


@torch.no_grad()
def evaluate(model, x, y, batch_size=512, context=None):
    """Top-1 and Top-5 accuracy (%) of ``model`` in eval mode, inside ``context`` (e.g. a pruning state)."""
    top1 = top5 = 0
    device = next(model.parameters()).device
    with all_modules_in(model, False), context or contextlib.nullcontext():
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb)
            top = logits.topk(min(5, logits.shape[-1]), dim=1).indices
            top1 += (top[:, 0] == yb).sum().item()
            top5 += (top == yb[:, None]).any(dim=1).sum().item()
    return 100.0 * top1 / len(y), 100.0 * top5 / len(y)


def train_plain(model, optimizer, x, y, epochs: int, batch_size: int, seed: int = 0) -> list:
    """Ordinary cross-entropy training (the dense baseline and fine-tuning); returns seconds per epoch."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for xb, yb in batches(x, y, batch_size, generator):
            loss = torch.nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def make_optimizer(name: str, params, lr=None, weight_decay=1e-5):
    """The official EDropout optimizer (Adadelta lr 1.0, rho 0.9, eps 1e-6) or SGD/Adam."""
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr or 1.0, rho=0.9, eps=1e-6, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.05, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr or 1e-3, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use adadelta, sgd or adam")


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3):
    """The one-cycle schedule, stepped once per iteration: the learning rate warms up to ``max_lr`` over the
    first ``pct_start`` of ``total_steps`` and anneals (cosine) to about zero; momentum (SGD) or beta1 (Adam)
    cycles the other way. It reaches a good network in far fewer epochs than a step schedule."""
    cycle_momentum = optimizer.defaults.get("momentum", 0) > 0 or "betas" in optimizer.defaults
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start,
                                               cycle_momentum=cycle_momentum)


def rng_states() -> dict:
    """The global random states a run consumes (torch CPU and CUDA, numpy, Python), as tensors and plain values
    so that a checkpoint holding them loads with ``weights_only=True``."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint at the current iteration."""

    def __init__(self, signum: int, saved: bool):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


class Run:
    """The state of one EDropout training run, checkpointed atomically at the end of every epoch, every
    ``checkpoint_every`` minutes inside an epoch (None: never inside one), and when a stop is requested.

    A checkpoint holds the model, optimizer, scheduler, pruner, the epoch's data order and position, the global
    random states and ``config`` (the run's settings), so a resumed run continues bit for bit. Under torchrun
    (``launch``) every rank holds the same state and rank 0 alone writes it; each rank trains on its own share of
    every epoch's order (a ``DistributedSampler`` keyed by seed and epoch)."""

    def __init__(self, model, pruner, optimizer, scheduler, data, batch_size, seed, out_dir, config=None,
                 checkpoint_every=None, launch: Launch = None):
        self.model, self.pruner, self.optimizer, self.scheduler = model, pruner, optimizer, scheduler
        self.data, self.batch_size, self.out_dir, self.seed = data, batch_size, out_dir, seed
        self.launch = launch if launch is not None and launch.distributed else None
        self.config = dict(config or {})
        self.checkpoint_every = checkpoint_every
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.order = None  # this epoch's shuffled indices, None between epochs
        self.position = 0  # batches of this epoch already trained
        self.epoch_elapsed = 0.0
        self.history = []
        self.epoch_seconds = []
        self.converged_at = None
        self.resumes = []  # {"iteration", "epochs"} of every resume, for the report
        self.stop_signal = None
        self._last_save = time.monotonic()

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.pt")

    @property
    def world_size(self) -> int:
        return 1 if self.launch is None else self.launch.world_size

    @property
    def parallel(self):
        return None if self.launch is None else self.launch.parallel

    def save(self):
        if self.launch is not None and not self.launch.writes:
            return
        pruner_state = self.pruner.state_dict()  # first: it writes the exported network's weights back into the model
        atomic_save({"config": self.config, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "pruner": pruner_state, "generator": self.generator.get_state(), "rng": rng_states(),
                     "epoch": self.epoch, "order": self.order, "position": self.position,
                     "epoch_elapsed": self.epoch_elapsed, "history": self.history,
                     "epoch_seconds": self.epoch_seconds, "converged_at": self.converged_at,
                     "resumes": self.resumes, "world_size": self.world_size, "parallel": self.parallel,
                     "threads": torch.get_num_threads()},
                    self.checkpoint_path)
        self._last_save = time.monotonic()

    def restore(self, saved: dict) -> None:
        """Continue from a loaded checkpoint (``checkpoint.load_checkpoint``); it must come from a run with as many
        processes and the same parallel mode (their batches and per-rank statistics differ otherwise)."""
        world_size, parallel = saved.get("world_size", 1), saved.get("parallel")
        if (world_size, parallel) != (self.world_size, self.parallel):
            raise CheckpointError(
                f"{self.checkpoint_path} was written by {_processes(world_size, parallel)}, but this run has "
                f"{_processes(self.world_size, self.parallel)}; resume it the way it started"
                + (f" (torchrun --nproc_per_node={world_size} -m edropout prune ... --parallel {parallel} --resume)"
                   if world_size > 1 else " (one process, without torchrun)"))
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.pruner.load_state_dict(saved["pruner"])
        self.generator.set_state(saved["generator"])
        set_rng_states(saved["rng"])
        self.epoch, self.order, self.position = saved["epoch"], saved["order"], saved["position"]
        self.epoch_elapsed, self.history = saved["epoch_elapsed"], saved["history"]
        self.epoch_seconds, self.converged_at = saved["epoch_seconds"], saved["converged_at"]
        self.resumes = saved["resumes"]
        if self.launch is not None and self.order is not None:  # rank 0 saved its own rows: take this rank's
            self.order = self._epoch_order()

    @property
    def iterations_per_epoch(self) -> int:
        if self.launch is None:
            return len(self.data.train_y) // self.batch_size
        return self.launch.batches_per_epoch(len(self.data.train_y), self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """Rows per step on this process (the whole batch for one process)."""
        return self.batch_size if self.launch is None else self.launch.local_batch_size(self.batch_size)

    def _epoch_order(self) -> torch.Tensor:
        """This epoch's order of training rows: a running shuffle for one process, this rank's share of a
        ``DistributedSampler`` order under torchrun."""
        if self.launch is None:
            return torch.randperm(len(self.data.train_y), generator=self.generator)
        return self.launch.epoch_order(len(self.data.train_y), self.epoch, self.seed)

    def train_epoch(self, progress=None):
        """The rest of the current epoch (all of it at an epoch's start); each iteration is one ``pruner.step``.
        Raises ``Interrupted`` after saving when ``stop_signal`` was set."""
        device = next(self.model.parameters()).device
        if self.order is None:
            self.order = self._epoch_order()
            self.position, self.epoch_elapsed = 0, 0.0
        while self.position < self.iterations_per_epoch:
            start = time.perf_counter()
            size = self.local_batch_size
            idx = self.order[self.position * size:(self.position + 1) * size]
            info = self.pruner.step(self.data.train_x[idx].to(device), self.data.train_y[idx].to(device),
                                    self.optimizer)
            self.history.append({"iteration": info.iteration, "loss": info.loss, "best_energy": info.best_energy,
                                 "mean_energy": info.mean_energy, "pruning_rate": info.pruning_rate})
            if info.converged and self.converged_at is None:
                self.converged_at = info.iteration
            self.position += 1
            self.epoch_elapsed += time.perf_counter() - start
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=self.epoch + 1, energy=f"{info.best_energy:.3f}",
                                     pruned=f"{100 * info.pruning_rate:.1f}%", loss=f"{info.loss:.3f}")
            if self.stop_signal is not None:
                self.save()
                raise Interrupted(self.stop_signal, saved=True)
            if (self.checkpoint_every is not None and self.position < self.iterations_per_epoch
                    and time.monotonic() - self._last_save >= 60.0 * self.checkpoint_every):
                self.save()
        self.scheduler.step()
        self.epoch += 1
        self.order, self.position = None, 0
        self.epoch_seconds.append(self.epoch_elapsed)
        self.save()


def _processes(world_size, parallel) -> str:
    return "one process" if world_size == 1 else f"{world_size} processes (--parallel {parallel})"


def train_edropout(model, example_inputs, data, config: dict, seed: int):
    """Train ``model`` with EDropout for ``config["epochs"]`` epochs (the benchmarks' shared loop).

    ``config`` holds ``epochs``, ``batch_size``, ``optimizer``, ``population_size``, ``energy``, ``patience``,
    ``min_iterations_fraction`` (of all iterations) and optionally ``backend``, ``weight_decay``, ``init_keep`` and
    the size target (``target``, ``target_metric``, ``target_penalty``; see ``EDropout``). Checkpoints
    go to a temporary directory. If the state never froze it is frozen at the end, and the exported
    network's weights are written back, so the model and ``pruner.export()`` are final. Returns (pruner, run, seconds).
    """
    epochs, batch_size = config["epochs"], config["batch_size"]
    per_epoch = len(data.train_y) // batch_size
    pruner = EDropout(model, example_inputs, population_size=config["population_size"], energy=config["energy"],
                      backend=config.get("backend", "auto"), seed=seed, patience=config["patience"],
                      min_iterations=int(config["min_iterations_fraction"] * per_epoch * epochs),
                      init_keep=config.get("init_keep", 0.5), target=config.get("target"),
                      target_metric=config.get("target_metric", "params"), target_penalty=config.get("target_penalty"))
    optimizer = make_optimizer(config["optimizer"], model.parameters(),
                               weight_decay=config.get("weight_decay", 1e-5))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10 ** 9)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(model, pruner, optimizer, scheduler, data, batch_size, seed, tmp)
        start = time.perf_counter()
        while run.epoch < epochs:
            run.train_epoch()
        seconds = time.perf_counter() - start
    if not pruner.converged:
        pruner.finalize()
    pruner.sync()
    return pruner, run, seconds
