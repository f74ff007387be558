"""Evaluation (Top-1/Top-5), plain training, and the EDropout training loop of the main job and benchmarks, with
atomic checkpoints and resume."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from .checkpoint import atomic_save
from .data import batches
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


class Run:
    """The state of one EDropout training run; checkpointed atomically after every epoch."""

    def __init__(self, model, pruner, optimizer, scheduler, data, batch_size, seed, out_dir):
        self.model, self.pruner, self.optimizer, self.scheduler = model, pruner, optimizer, scheduler
        self.data, self.batch_size, self.out_dir = data, batch_size, out_dir
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.history = []
        self.epoch_seconds = []
        self.converged_at = None

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.pt")

    def save(self):
        pruner_state = self.pruner.state_dict()  # first: it writes compact-training weights back into the model
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "pruner": pruner_state,
                     "generator": self.generator.get_state(), "epoch": self.epoch, "history": self.history,
                     "epoch_seconds": self.epoch_seconds, "converged_at": self.converged_at},
                    self.checkpoint_path)

    def resume(self) -> bool:
        """Continue from ``checkpoint.pt`` in the output directory if there is one."""
        if not os.path.exists(self.checkpoint_path):
            return False
        saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.pruner.load_state_dict(saved["pruner"])
        self.generator.set_state(saved["generator"])
        self.epoch, self.history = saved["epoch"], saved["history"]
        self.epoch_seconds, self.converged_at = saved["epoch_seconds"], saved["converged_at"]
        return True

    def train_epoch(self, progress=None):
        """One pass over the training set; each iteration is one ``pruner.step``."""
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        for xb, yb in batches(self.data.train_x, self.data.train_y, self.batch_size, self.generator):
            info = self.pruner.step(xb.to(device), yb.to(device), self.optimizer)
            self.history.append({"iteration": info.iteration, "loss": info.loss, "best_energy": info.best_energy,
                                 "mean_energy": info.mean_energy, "pruning_rate": info.pruning_rate})
            if info.converged and self.converged_at is None:
                self.converged_at = info.iteration
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=self.epoch + 1, energy=f"{info.best_energy:.3f}",
                                     pruned=f"{100 * info.pruning_rate:.1f}%", loss=f"{info.loss:.3f}")
        self.scheduler.step()
        self.epoch += 1
        self.epoch_seconds.append(time.perf_counter() - start)
        self.save()


def train_edropout(model, example_inputs, data, config: dict, seed: int):
    """Train ``model`` with EDropout for ``config["epochs"]`` epochs (the benchmarks' shared loop).

    ``config`` holds ``epochs``, ``batch_size``, ``optimizer``, ``population_size``, ``energy``, ``patience``,
    ``min_iterations_fraction`` (of all iterations) and optionally ``backend``, ``weight_decay``, ``init_keep`` and
    the size target (``target``, ``target_metric``, ``target_penalty``; see ``EDropout``). Checkpoints
    go to a temporary directory. If the state never froze it is frozen at the end, and compact-training
    weights are written back, so the model and ``pruner.export()`` are final. Returns (pruner, run, seconds).
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
