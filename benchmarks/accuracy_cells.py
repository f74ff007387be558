"""The cells of the Fashion-MNIST accuracy table: one (network, method, seed) each, trained with the shared
one-cycle schedule for the same total number of epochs, checkpointed atomically after every epoch (a killed run
loses at most an epoch) and recorded as one JSON file once done (a done cell is never run again).

Methods (the config's ``methods`` maps a name to one of these kinds and its settings):
- ``dense``: plain training for ``epochs`` epochs; its checkpoint at ``prune_epoch`` is kept as the starting
  point of the pruning baselines.
- ``l1``: the dense network at ``prune_epoch``, L1 filter pruning (``edropout.magnitude_pruning``) to the share
  ``share`` of parameters removed, fine-tuned for the remaining epochs on the same schedule.
- ``torch_pruning``: the same, pruned by Torch-Pruning's GroupNormPruner (group L2 importance, one shot, no
  sparsity-regularised training); its per-layer ratio is searched so the share of parameters removed matches.
- ``edropout``: EDropout from the dense network's initial weights for all ``epochs`` epochs, with the pruner
  settings given (e.g. ``init_keep`` for the paper's setting, ``target`` for a size target).

A method may also set ``lr_scale`` (its peak lr is the network's times this, so one change means the same on
networks with different optimizers) and ``networks`` (the networks it runs on, where it is not some network's
default already). A done cell whose recorded schedule or pruner settings differ from what the config now asks
is reported as stale, never silently counted as the config's.
"""
from __future__ import annotations

import copy
import errno
import inspect
import json
import os
import time
from dataclasses import dataclass

import torch

from edropout.app.checkpoint import atomic_save
from edropout.app.data import batches
from edropout.app.models import build_model
from edropout.app.training import evaluate, make_optimizer, one_cycle
from edropout.export import export_pruned
from edropout.flops import count_flops, count_parameters
from edropout.magnitude_pruning import magnitude_state_for_rate
from edropout.pruner import EDropout
from edropout.units import discover_units, find_classifier

SCHEDULE_SETTINGS = ("optimizer", "lr", "lr_scale", "weight_decay", "pct_start")
HISTORY_EVERY = 10  # iterations between the EDropout history points kept in a cell's result file


@dataclass(frozen=True)
class Cell:
    """One entry of the table: network, method name (a key of the config's ``methods``) and seed."""

    net: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.net}_{self.method}_s{self.seed}"


class Bench:
    """What every cell shares: the config, the data splits, the device and where results and checkpoints go."""

    def __init__(self, config: dict, train, val_x, val_y, device, results_dir: str, checkpoint_dir: str):
        self.config, self.train, self.val_x, self.val_y = config, train, val_x, val_y
        self.device, self.results_dir, self.checkpoint_dir = device, results_dir, checkpoint_dir
        self.epochs, self.batch_size = config["epochs"], config["batch_size"]
        self.per_epoch = len(train.train_y) // self.batch_size
        self.example = train.train_x[:2].to(device)
        for method, spec in config["methods"].items():
            if spec.get("kind") not in RUNNERS:
                raise ValueError(f"method {method!r} has kind {spec.get('kind')!r}; use one of {sorted(RUNNERS)}")
            unknown = sorted(set(spec.get("networks", config["networks"])) - set(config["networks"]))
            if unknown:
                raise ValueError(f"method {method!r} names networks {unknown} the config does not have; "
                                 f"use some of {sorted(config['networks'])}")

    def cells(self) -> list:
        """Every planned cell, in the order they are run: per network and seed, dense first; a method that names
        its ``networks`` runs on those only."""
        return [Cell(net, method, seed) for net, spec in self.config["networks"].items() for seed in spec["seeds"]
                for method, own in self.config["methods"].items() if net in own.get("networks", [net])]

    def result_path(self, cell: Cell) -> str:
        return os.path.join(self.results_dir, "cells", cell.name + ".json")

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.checkpoint_dir, cell.name)

    def snapshot_path(self, net: str, seed: int) -> str:
        """The dense network at ``prune_epoch``: where the pruning baselines start."""
        return os.path.join(self.checkpoint_dir, f"{net}_dense_s{seed}", f"epoch{self.config['prune_epoch']}.pt")

    def new_model(self, net: str, seed: int):
        """The network with the initial weights of ``seed`` (the same for every method)."""
        torch.manual_seed(seed)
        data = self.train
        return build_model(net, data.in_channels, data.input_size, data.num_classes,
                           self.config["networks"][net]["width"]).to(self.device)

    def schedule(self, net: str, spec: dict | None = None) -> dict:
        """Optimizer, peak lr, weight decay and warm-up share of a cell: the config's, overridden by the network's
        entry and, for an ablation, by a dense or EDropout method's entry; ``lr_scale`` multiplies the peak lr."""
        merged = {**self.config, **self.config["networks"][net],
                  **{k: v for k, v in (spec or {}).items() if k in SCHEDULE_SETTINGS}}
        return {"optimizer": merged["optimizer"], "lr": merged["lr"] * merged.get("lr_scale", 1),
                "weight_decay": merged.get("weight_decay", 1e-5), "pct_start": merged.get("pct_start", 0.3)}

    def optimizer_and_schedule(self, params, net: str, spec: dict | None = None):
        """The optimizer and the one-cycle schedule over all ``epochs``, stepped every iteration."""
        c = self.schedule(net, spec)
        optimizer = make_optimizer(c["optimizer"], params, c["lr"], c["weight_decay"])
        return optimizer, one_cycle(optimizer, c["lr"], self.epochs * self.per_epoch, c["pct_start"])

    def evaluate_all(self, model) -> dict:
        """Top-1/Top-5 on validation (always) and test (unless the config says ``evaluate_test: false``, as the
        ablation does: its choices must never see the test set)."""
        out = {"val": list(evaluate(model, self.val_x, self.val_y))}
        if self.config.get("evaluate_test", True):
            out["test"] = list(evaluate(model, self.train.test_x, self.train.test_y))
        return out


class CellLock:
    """An exclusive claim on a cell (a lock file holding the owner's pid), so two processes never run or write
    the same cell; a lock whose process has died is taken over."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "lock")

    def acquire(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    return False
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def _owner_alive(self) -> bool:
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)
        except (ValueError, FileNotFoundError):
            return False
        except OSError as e:
            return e.errno == errno.EPERM
        return pid != os.getpid()

    def release(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


class Progress:
    """A running cell's mutable state: data order, epoch, validation curve, seconds; saved with the weights."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.val_curve, self.epoch_seconds, self.load_average = [], [], []

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "rng": torch.get_rng_state(), "epoch": self.epoch,
                "val_curve": self.val_curve, "epoch_seconds": self.epoch_seconds, "load_average": self.load_average}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])  # dropout draws continue exactly
        self.epoch, self.val_curve = state["epoch"], list(state["val_curve"])
        self.epoch_seconds, self.load_average = list(state["epoch_seconds"]), list(state["load_average"])


def _load(path: str) -> dict:
    """A checkpoint of this benchmark (tensors, numbers, lists and dicts only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_epochs(bench: Bench, progress: Progress, step, scheduler, last_epoch: int, end_of_epoch):
    """Epochs ``progress.epoch`` .. ``last_epoch``: ``step(x, y)`` and one schedule step per iteration, then
    ``end_of_epoch()`` (evaluate and checkpoint)."""
    data = bench.train
    while progress.epoch < last_epoch:
        start = time.perf_counter()
        for xb, yb in batches(data.train_x, data.train_y, bench.batch_size, progress.generator):
            step(xb.to(bench.device), yb.to(bench.device))
            scheduler.step()
        progress.epoch_seconds.append(time.perf_counter() - start)
        progress.load_average.append(os.getloadavg()[0])
        progress.epoch += 1
        end_of_epoch()


def _plain_step(model, optimizer):
    """One ordinary cross-entropy training step of ``model`` (dense training and fine-tuning)."""
    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def producer_channels(model, classifier: str) -> int:
    """Output channels of every Conv and output features of every Linear layer but the classifier: the units a
    filter-pruning method can remove, counted the same way for every method."""
    return sum(m.out_channels if hasattr(m, "out_channels") else m.out_features
               for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))
               and name != classifier)


def _size_figures(bench: Bench, dense, small, classifier: str) -> dict:
    example = bench.example
    return {"params_dense": count_parameters(dense), "params": count_parameters(small),
            "params_removed": 100 * (1 - count_parameters(small) / count_parameters(dense)),
            "flops_removed": 100 * (1 - count_flops(small, example) / count_flops(dense, example)),
            "units_kept": 100 * producer_channels(small, classifier) / producer_channels(dense, classifier)}


def _resume_training(path: str, progress: Progress, **objects) -> dict | None:
    """Continue a cell from its last end-of-epoch checkpoint, if it has one: each of ``objects`` (model,
    optimizer, scheduler, pruner) loads its entry, in that order, then ``progress``; returns the checkpoint."""
    if not os.path.exists(path):
        return None
    saved = _load(path)
    for key, owner in objects.items():
        owner.load_state_dict(saved[key])
    progress.load_state_dict(saved["progress"])
    return saved


def _save_training(path: str, model, optimizer, scheduler, progress: Progress) -> None:
    """The end-of-epoch checkpoint of a plainly trained cell (written atomically)."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "progress": progress.state_dict()}, path)


# ----- dense ---------------------------------------------------------------------------------------------------
def run_dense(bench: Bench, cell: Cell, spec: dict) -> dict:
    """Plain training for all epochs; keeps the checkpoint at ``prune_epoch`` for the pruning baselines."""
    model = bench.new_model(cell.net, cell.seed)
    optimizer, scheduler = bench.optimizer_and_schedule(model.parameters(), cell.net, spec)
    progress = Progress(cell.seed)
    path = os.path.join(bench.cell_dir(cell), "checkpoint.pt")
    _resume_training(path, progress, model=model, optimizer=optimizer, scheduler=scheduler)

    def end_of_epoch():
        progress.val_curve.append(evaluate(model, bench.val_x, bench.val_y)[0])
        _save_training(path, model, optimizer, scheduler, progress)
        if progress.epoch == bench.config["prune_epoch"]:
            _save_training(bench.snapshot_path(cell.net, cell.seed), model, optimizer, scheduler, progress)
        _write_progress(bench, cell, progress)

    _train_epochs(bench, progress, _plain_step(model, optimizer), scheduler, bench.epochs, end_of_epoch)
    classifier = find_classifier(model, bench.example)
    return {**bench.evaluate_all(model), **_size_figures(bench, model, model, classifier),
            "seconds": sum(progress.epoch_seconds), **_progress_record(progress)}


# ----- pruning baselines ---------------------------------------------------------------------------------------
def prune_l1(model, example, share: float):
    """L1 filter pruning over EDropout's unit groups to the share of parameters removed closest to ``share``."""
    units = discover_units(model, example)
    return export_pruned(model, units, magnitude_state_for_rate(model, units, share, norm="l1"), example), {}


def prune_torch_pruning(model, example, share: float, steps: int = 24):
    """Torch-Pruning's GroupNormPruner (group L2 importance, uniform per-layer ratio, classifier kept), its ratio
    found by bisection so that the share of parameters removed is closest to ``share``."""
    import torch_pruning as tp

    classifier = find_classifier(model, example)
    dense_params = count_parameters(model)

    def attempt(ratio):
        pruned = copy.deepcopy(model).eval()
        pruner = tp.pruner.GroupNormPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[dict(pruned.named_modules())[classifier]])
        pruner.step()
        return pruned, 1 - count_parameters(pruned) / dense_params

    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (low + high) / 2
        pruned, removed = attempt(mid)
        if best is None or abs(removed - share) < abs(best[1] - share):
            best = (pruned, removed, mid)
        low, high = (mid, high) if removed < share else (low, mid)
    best[0].train(model.training)
    return best[0], {"torch_pruning_ratio": best[2]}


PRUNERS = {"l1": prune_l1, "torch_pruning": prune_torch_pruning}


def run_pruned_baseline(bench: Bench, cell: Cell, spec: dict) -> dict:
    """Dense until ``prune_epoch`` (the dense cell's snapshot), prune, fine-tune on the rest of the schedule."""
    snapshot = _load(bench.snapshot_path(cell.net, cell.seed))
    dense = bench.new_model(cell.net, cell.seed)
    dense.load_state_dict(snapshot["model"])
    start = time.perf_counter()
    small, details = PRUNERS[spec["kind"]](dense, bench.example, spec["share"])
    prune_seconds = time.perf_counter() - start
    optimizer, scheduler = bench.optimizer_and_schedule(small.parameters(), cell.net)
    scheduler.load_state_dict(snapshot["scheduler"])  # the shared schedule, continued where the dense run was
    for group, dense_group in zip(optimizer.param_groups, snapshot["optimizer"]["param_groups"]):
        group.update({k: dense_group[k] for k in ("lr", "momentum", "betas") if k in dense_group})
    progress = Progress(cell.seed)
    progress.load_state_dict(snapshot["progress"])  # the dense run's data order from here on
    prefix_seconds = sum(progress.epoch_seconds)
    progress.val_curve, progress.epoch_seconds, progress.load_average = [], [], []
    path = os.path.join(bench.cell_dir(cell), "checkpoint.pt")
    _resume_training(path, progress, model=small, optimizer=optimizer, scheduler=scheduler)

    def end_of_epoch():
        progress.val_curve.append(evaluate(small, bench.val_x, bench.val_y)[0])
        _save_training(path, small, optimizer, scheduler, progress)
        _write_progress(bench, cell, progress)

    _train_epochs(bench, progress, _plain_step(small, optimizer), scheduler, bench.epochs, end_of_epoch)
    classifier = find_classifier(dense, bench.example)
    return {**bench.evaluate_all(small), **_size_figures(bench, dense, small, classifier), **details,
            "share_asked": spec["share"], "prune_epoch": bench.config["prune_epoch"], "prune_seconds": prune_seconds,
            "seconds": sum(progress.epoch_seconds) + prune_seconds,
            "seconds_with_dense_prefix": sum(progress.epoch_seconds) + prune_seconds + prefix_seconds,
            **_progress_record(progress)}


# ----- EDropout ------------------------------------------------------------------------------------------------
BENCH_SETTINGS = ("kind", "label", "networks", "min_iterations_fraction") + SCHEDULE_SETTINGS  # not EDropout's settings


def edropout_settings(bench: Bench, spec: dict, net: str) -> dict:
    """The EDropout keyword arguments of a method: the config's shared ``edropout`` block, then the network's,
    then the method's own (``min_iterations_fraction`` of all iterations becomes ``min_iterations``; every other
    key goes to EDropout)."""
    merged = {**bench.config.get("edropout", {}), **bench.config["networks"][net].get("edropout", {}), **spec}
    settings = {k: v for k, v in merged.items() if k not in BENCH_SETTINGS}
    settings["min_iterations"] = int(merged.get("min_iterations_fraction", 0.5) * bench.epochs * bench.per_epoch)
    return settings


def missing_arguments(settings: dict) -> list:
    """Pruner settings this EDropout does not take (e.g. ``target`` before the size target exists)."""
    accepted = inspect.signature(EDropout.__init__).parameters
    return [k for k in settings if k not in accepted]


def run_edropout(bench: Bench, cell: Cell, spec: dict) -> dict:
    """EDropout for all epochs from the dense run's initial weights; the exported network is evaluated."""
    model = bench.new_model(cell.net, cell.seed)
    settings = edropout_settings(bench, spec, cell.net)
    pruner = EDropout(model, bench.example, seed=cell.seed, **settings)
    optimizer, scheduler = bench.optimizer_and_schedule(model.parameters(), cell.net, spec)
    progress = Progress(cell.seed)
    history, converged_at = [], [None]
    path = os.path.join(bench.cell_dir(cell), "checkpoint.pt")
    saved = _resume_training(path, progress, model=model, optimizer=optimizer, scheduler=scheduler, pruner=pruner)
    if saved is not None:
        history, converged_at = list(saved["history"]), [saved["converged_at"]]

    def step(x, y):
        info = pruner.step(x, y, optimizer)
        if info.iteration % HISTORY_EVERY == 1:  # the first iteration, then every HISTORY_EVERY
            history.append([info.iteration, info.loss, info.best_energy, info.mean_energy, info.pruning_rate])
        if info.converged and converged_at[0] is None:
            converged_at[0] = info.iteration

    def end_of_epoch():
        pruner_state = pruner.state_dict()  # first: it writes compact-training weights back into the model
        progress.val_curve.append(evaluate(model, bench.val_x, bench.val_y, context=pruner.apply())[0])
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "pruner": pruner_state, "progress": progress.state_dict(),
                     "history": history, "converged_at": converged_at[0]}, path)
        _write_progress(bench, cell, progress)

    _train_epochs(bench, progress, step, scheduler, bench.epochs, end_of_epoch)
    if not pruner.converged:
        pruner.finalize()
    pruner.sync()
    small = pruner.export()
    classifier = pruner.units.classifier
    dense_reference = bench.new_model(cell.net, cell.seed)
    result = {**bench.evaluate_all(small), **_size_figures(bench, dense_reference, small, classifier),
              "settings": settings, "bits_kept": 100 * float(pruner.best_state.float().mean()),
              "converged_at_iteration": converged_at[0], "iterations": pruner.iteration,
              "seconds": sum(progress.epoch_seconds), **_progress_record(progress),
              "history_columns": ["iteration", "loss", "best_energy", "mean_energy", "pruning_rate"],
              "history": history}
    result["val_F"] = list(evaluate(model, bench.val_x, bench.val_y, context=pruner.full_network()))
    return result


RUNNERS = {"dense": run_dense, "l1": run_pruned_baseline, "torch_pruning": run_pruned_baseline,
           "edropout": run_edropout}


def _progress_record(progress: Progress) -> dict:
    return {"val_curve": progress.val_curve, "epoch_seconds": progress.epoch_seconds,
            "load_average": progress.load_average}


def _write_progress(bench: Bench, cell: Cell, progress: Progress) -> None:
    """A small progress file beside the checkpoint, for partial tables (no checkpoint has to be loaded)."""
    path = os.path.join(bench.cell_dir(cell), "progress.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"epoch": progress.epoch, "epochs": bench.epochs, "val_curve": progress.val_curve}, f)
    os.replace(path + ".tmp", path)


def cell_status(bench: Bench, cell: Cell) -> str:
    """``done``, ``stale: ...`` (done with other settings than the config's now), ``waiting: ...`` (cannot start
    yet), or ``ready``."""
    spec = bench.config["methods"][cell.method]
    if os.path.exists(bench.result_path(cell)):
        with open(bench.result_path(cell)) as f:
            changed = stale_settings(bench, cell, spec, json.load(f))
        return f"stale: {changed}; delete {bench.result_path(cell)} and its checkpoints to rerun" if changed \
            else "done"
    if spec["kind"] in PRUNERS and not os.path.exists(bench.snapshot_path(cell.net, cell.seed)):
        return f"waiting: needs the dense snapshot at epoch {bench.config['prune_epoch']}"
    if spec["kind"] == "edropout":
        missing = missing_arguments(edropout_settings(bench, spec, cell.net))
        if missing:
            return f"waiting: this EDropout takes no {', '.join(missing)} argument"
    return "ready"


def _own_schedule(spec: dict) -> dict | None:
    """The method entry whose schedule settings apply: a dense or EDropout method's; the pruning baselines
    continue the dense schedule."""
    return spec if spec["kind"] in ("dense", "edropout") else None


def stale_settings(bench: Bench, cell: Cell, spec: dict, record: dict) -> str:
    """What a done cell's record says it ran with that the config no longer asks ("" if nothing)."""
    asked = {"schedule": bench.schedule(cell.net, _own_schedule(spec))}
    if spec["kind"] == "edropout":
        asked["settings"] = edropout_settings(bench, spec, cell.net)
    changed = [f"{part} {key} {record[part].get(key)!r} (config: {value!r})"
               for part, values in asked.items() if part in record
               for key, value in values.items() if record[part].get(key) != value]
    return ", ".join(changed)


def run_cell(bench: Bench, cell: Cell, metadata: dict) -> dict | None:
    """Run (or resume) one cell and write its result file; None if another process holds it."""
    lock = CellLock(bench.cell_dir(cell))
    if not lock.acquire():
        return None
    try:
        spec = bench.config["methods"][cell.method]
        result = RUNNERS[spec["kind"]](bench, cell, spec)
        record = {"net": cell.net, "method": cell.method, "kind": spec["kind"], "seed": cell.seed,
                  "width": bench.config["networks"][cell.net]["width"], "epochs": bench.epochs,
                  "schedule": bench.schedule(cell.net, _own_schedule(spec)), **metadata, **result}
        path = bench.result_path(cell)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
        return record
    finally:
        lock.release()
