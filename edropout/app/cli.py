"""The ``edropout`` command: ``edropout prune`` trains a model with EDropout on a data set and writes a report,
the pruned model and plots to ``--out``. A run that stops (killed, interrupted, out of power) continues with
``--resume`` from its last checkpoint, bit for bit. User errors print one line and exit with status 2. Under
``torchrun --nproc_per_node=N -m edropout prune ...`` it runs data- or population-parallel (``--parallel``); rank 0
alone writes files and shows progress.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import signal
import sys
import threading
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from ..backends import BACKENDS
from ..checks import NonFiniteError
from ..distributed import MODES
from ..energy import ENERGIES
from ..flops import count_flops
from ..size_target import METRICS
from ..pruner import EDropout
from .checkpoint import load_checkpoint, load_pruned_model, save_pruned_model
from .data import DATASETS, FASHION_MNIST_DIR, load_dataset
from .errors import CheckpointError, UserError
from .launch import join, leave
from .models import MODELS, build_model
from .report import plot_history, write_json
from .training import Interrupted, Run, evaluate, make_optimizer

DEVICES = ("auto", "cpu", "cuda")
# the files a run writes into --out: a directory holding any of them holds a run
RUN_FILES = ("checkpoint.pt", "report.json", "history.json", "pruned_model.pt", "energy.png", "pruning.png")
# options that may differ when a run is resumed; every other option must match the checkpoint's
CHANGEABLE = ("epochs", "no_progress", "device", "threads", "checkpoint_every", "out", "resume", "overwrite",
              "bind_cores")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem and where to read more."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help with its default; options whose default depends on others say so in words."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _number(kind, name, low, low_inclusive=True, high=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, "a positive integer", 0, low_inclusive=False)
NON_NEGATIVE_INT = _number(int, "an integer >= 0", 0)
POPULATION = _number(int, "an integer >= 4 (each child needs three other members)", 4)
PROBABILITY = _number(float, "a probability in [0, 1]", 0.0, high=1.0)
POSITIVE_FLOAT = _number(float, "a positive number", 0.0, low_inclusive=False)
NON_NEGATIVE_FLOAT = _number(float, "a number >= 0", 0.0)


F_MEANING = ("(F): the trained network with every unit switched back on, pruned weights at the values they had "
             "when their units were last kept; not a network anyone deploys (pruned weights stop training), so "
             "it is often near chance. (P) is the pruned network, the one export() returns.")


def _share(text: str) -> float:
    """A share to remove, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1) (e.g. 0.5 removes half)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edropout", description="Energy-based pruning (EDropout) for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="train a model with EDropout and export the pruned network",
                       formatter_class=_HelpFormatter,
                       description="Train a model with EDropout on a data set; write report.json, the pruned "
                                   "model, history and plots to --out, with checkpoints to resume from.")
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS), help="network to prune")
    p.add_argument("--width", type=POSITIVE_INT, default=None,
                   help="base width (channels of the first stage); default per model")
    p.add_argument("--data", default="digits", choices=DATASETS,
                   help="digits: scikit-learn's 8x8 digits; fashion-mnist: 28x28 idx files from --data-dir")
    p.add_argument("--data-dir", default=None,
                   help=f"directory with the four Fashion-MNIST idx files (.gz or not); default {FASHION_MNIST_DIR}")
    p.add_argument("--limit", type=POSITIVE_INT, default=None,
                   help="use only the first N train and N test images; default all")
    p.add_argument("--epochs", type=POSITIVE_INT, default=12,
                   help="epochs to train; with --resume, a larger value extends a run")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per iteration")
    p.add_argument("--optimizer", default="adadelta", choices=("adadelta", "sgd", "adam"),
                   help="official: Adadelta (rho 0.9, eps 1e-6)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="learning rate; default per optimizer (adadelta 1.0, sgd 0.05, adam 1e-3)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=1e-5, help="L2 weight decay")
    p.add_argument("--lr-step", type=POSITIVE_INT, default=None,
                   help="multiply the learning rate by 0.1 every N epochs; default never")
    p.add_argument("--population-size", type=POPULATION, default=8, help="pruning states evolved (S)")
    p.add_argument("--init-keep", type=PROBABILITY, default=0.5,
                   help="probability that a unit is kept in the initial population")
    p.add_argument("--mutation-factor", type=PROBABILITY, default=0.9, help="differential evolution's F")
    p.add_argument("--crossover-rate", type=PROBABILITY, default=0.9, help="differential evolution's C")
    p.add_argument("--energy", default="margin", choices=ENERGIES, help="energy that scores a pruning state")
    p.add_argument("--target-rate", type=_share, default=None,
                   help="share of the target metric the pruned network removes, in [0, 1); default no target "
                        "(the share is whatever the evolution lands on)")
    p.add_argument("--target-metric", default="params", choices=METRICS,
                   help="what --target-rate counts: trainable parameters or FLOPs")
    p.add_argument("--backend", default="auto", choices=tuple(BACKENDS),
                   help="how the population is scored: reference (one masked forward per state), batched (one "
                        "forward of S*B rows), compact (kept channels only, CPU), triton (GPU kernels), auto")
    p.add_argument("--min-iterations", type=NON_NEGATIVE_INT, default=None,
                   help="iterations before the state may freeze; default half of the run")
    p.add_argument("--patience", type=POSITIVE_INT, default=10,
                   help="freeze once the best state is unchanged for this many iterations")
    p.add_argument("--rescore-parents", action="store_true", help="re-score parents on every batch")
    p.add_argument("--eval-mode-scoring", action="store_true", help="score with BatchNorm running statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data order and evolution")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when available, else cpu")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads (torch.set_num_threads); default torch's")
    p.add_argument("--bind-cores", action="store_true",
                   help="under torchrun on CPU: bind each rank to its own share of the cores, with that many "
                        "threads unless --threads says otherwise")
    p.add_argument("--out", default="runs/edropout", help="output directory")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE_FLOAT, default=5.0,
                   help="minutes between checkpoints inside an epoch (0: after every iteration); one is also "
                        "written after every epoch and on SIGINT/SIGTERM")
    run_mode = p.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its checkpoint (same settings; --epochs may grow)")
    run_mode.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--parallel", default="data", choices=MODES,
                   help="under torchrun: split each batch over the ranks (data) or the population (population)")
    return parser


def _device(args) -> torch.device:
    """The device to run on; CUDA and the Triton backend are checked before anything is built."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch.cuda.is_available() is False (this torch build has no CUDA, or no "
                        "GPU is visible); use --device cpu, or install a CUDA build of torch")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UserError("--backend triton: Triton is not installed (pip install triton); or use --backend auto")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("--backend triton needs a CUDA GPU, and this run is on the CPU; use --backend auto, or "
                            "set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on the CPU (slow)")
    return device


def _config(args) -> dict:
    """The settings a resumed run must share with its checkpoint (every option not in ``CHANGEABLE``)."""
    config = {k: v for k, v in vars(args).items() if k not in CHANGEABLE and k != "command"}
    config["data_dir"] = os.path.abspath(args.data_dir) if args.data == "fashion-mnist" and args.data_dir else None
    return config


def _prepare_out(args, writes: bool = True):
    """Refuse to replace a run unless asked; with --overwrite remove the old run's files; remove temporary files
    a killed run left (the writing process only: rank 0 under torchrun); with --resume load and check the
    checkpoint. Returns the checkpoint or None."""
    holds = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if holds and not (args.resume or args.overwrite):
        raise UserError(f"{args.out} already holds a run ({', '.join(holds)}); pass --resume to continue it or "
                        f"--overwrite to replace it, or choose another --out")
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    if args.resume and not os.path.exists(checkpoint):
        raise UserError(f"--resume: there is no checkpoint at {checkpoint}; run without --resume to start")
    if writes:
        os.makedirs(args.out, exist_ok=True)
        for stale in glob.glob(os.path.join(args.out, ".tmp-*.pt")) + glob.glob(os.path.join(args.out, "*.tmp")):
            os.remove(stale)
        if args.overwrite:
            for name in holds:
                os.remove(os.path.join(args.out, name))
    if not args.resume:
        return None
    saved = load_checkpoint(checkpoint)
    if not isinstance(saved, dict) or "config" not in saved or "rng" not in saved:
        raise CheckpointError(f"{checkpoint} was written by an older edropout and lacks the run's settings and "
                              f"random states, so it cannot be resumed exactly; start again with --overwrite")
    mine = _config(args)
    theirs = {k: v for k, v in saved["config"].items() if k != "min_iterations_resolved"}
    differences = [f"--{k.replace('_', '-')} {theirs.get(k)!r} (checkpoint) vs {mine.get(k)!r}"
                   for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differences:
        raise CheckpointError(f"--resume: these options differ from the run in {args.out}: "
                              f"{'; '.join(differences)}. Resume with the run's settings, or start a new run "
                              f"in another --out (only {', '.join('--' + c.replace('_', '-') for c in CHANGEABLE[:4])} "
                              f"may change)")
    needed = saved["epoch"] + (1 if saved["order"] is not None else 0)
    if args.epochs < needed:
        raise UserError(f"--resume: the run in {args.out} has reached epoch {needed}; pass --epochs {needed} or "
                        f"more")
    return saved


@contextlib.contextmanager
def _stop_on_signals(run_state: dict):
    """SIGINT/SIGTERM during training ask the run to checkpoint after the current iteration and stop; outside
    training (or a second signal) they stop at once. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        run = run_state.get("run")
        if run is not None and run_state.get("training") and run.stop_signal is None:
            run.stop_signal = signum
        else:
            raise Interrupted(signum, saved=False)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prune(args, run_state=None) -> dict | None:
    """Run the main job and return the report it wrote (None on ranks other than 0, which write nothing)."""
    device = _device(args)
    launch = join(device.type, args.parallel, args.bind_cores, args.threads)
    try:
        report = _prune(args, launch, {} if run_state is None else run_state)
    except BaseException:
        leave(launch, finished=False)
        raise
    leave(launch)
    return report


def _prune(args, launch, run_state) -> dict | None:
    device = launch.device
    saved = _prepare_out(args, launch.writes)
    try:
        data = load_dataset(args.data, args.data_dir, args.limit)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    per_epoch = launch.batches_per_epoch(len(data.train_y), args.batch_size)
    if per_epoch == 0:
        shared = f" shared by {launch.world_size} ranks" if launch.distributed else ""
        raise UserError(f"--batch-size {args.batch_size} exceeds the {len(data.train_y)} training images{shared}; "
                        f"use a smaller --batch-size or a larger --limit")
    config = _config(args)
    # the convergence rule a run started with stays when --epochs extends it
    min_iterations = saved["config"]["min_iterations_resolved"] if saved else (
        args.min_iterations if args.min_iterations is not None else per_epoch * args.epochs // 2)
    config["min_iterations_resolved"] = min_iterations
    torch.manual_seed(args.seed)
    kwargs = {"in_channels": data.in_channels, "input_size": data.input_size,
              "num_classes": data.num_classes, "width": args.width}
    model = build_model(args.model, **kwargs).to(device)
    trained = model
    if launch.distributed:  # DDP averages the ranks' gradients; rank 0's weights are broadcast first
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    try:  # EDropout checks its arguments against the model (an unreachable --target-rate, --init-keep 2, ...)
        pruner = EDropout(trained, data.train_x[:2].to(device), population_size=args.population_size,
                          init_keep=args.init_keep, mutation_factor=args.mutation_factor,
                          crossover_rate=args.crossover_rate, energy=args.energy, backend=args.backend,
                          seed=args.seed, min_iterations=min_iterations, patience=args.patience,
                          rescore_parents=args.rescore_parents, score_in_eval_mode=args.eval_mode_scoring,
                          target=args.target_rate, target_metric=args.target_metric,
                          parallel=args.parallel if launch.distributed else None)
    except ValueError as error:
        raise UserError(str(error)) from None
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step or 10 ** 9, gamma=0.1)
    run = Run(model, pruner, optimizer, scheduler, data, args.batch_size, args.seed, args.out, config,
              args.checkpoint_every, launch)
    if saved:
        run.restore(saved)
        run.resumes.append({"iteration": pruner.iteration, "epochs": args.epochs})
        if launch.writes:
            print(f"resumed from {run.checkpoint_path} at epoch {run.epoch + 1}, iteration {pruner.iteration}",
                  file=sys.stderr)
            written_with = saved.get("threads", torch.get_num_threads())
            if written_with != torch.get_num_threads() and device.type == "cpu":
                print(f"warning: the run was written with {written_with} CPU threads and continues with "
                      f"{torch.get_num_threads()}; CPU sums then round differently, so it will not end bit-equal to "
                      f"an uninterrupted run (pass --threads {written_with} for that)", file=sys.stderr)
    run_state["run"] = run
    progress = None
    if not args.no_progress and launch.writes:
        from tqdm import tqdm

        progress = tqdm(total=per_epoch * args.epochs, initial=pruner.iteration, desc="edropout", unit="it",
                        file=sys.stderr)
    try:
        run_state["training"] = True
        while run.epoch < args.epochs:
            run.train_epoch(progress)
        run_state["training"] = False
    finally:
        if progress is not None:
            progress.close()
    if not launch.writes:
        return None
    if not pruner.converged:
        pruner.finalize()
    pruner.sync()
    return _report(args, kwargs, data, model, pruner, run, device)


def _report(args, kwargs, data, model, pruner, run, device) -> dict:
    dense_top = evaluate(model, data.test_x, data.test_y, context=pruner.full_network())
    pruned_top = evaluate(model, data.test_x, data.test_y, context=pruner.apply())
    small = pruner.export()
    model_path = os.path.join(args.out, "pruned_model.pt")
    save_pruned_model(model_path, args.model, kwargs, pruner.best_state, small)
    reloaded = load_pruned_model(model_path).to(device)
    exported_top = evaluate(reloaded, data.test_x, data.test_y)
    rate = pruner.pruning_rate
    example = data.train_x[:1].to(device)
    flops_removed = 1.0 - count_flops(small, example) / count_flops(model, example)
    report = {
        "model": args.model, "data": args.data, "device": str(device), "backend": str(pruner.backend),
        "world_size": run.world_size, "parallel": run.parallel,
        "epochs": run.epoch, "batch_size": args.batch_size, "population_size": args.population_size,
        "energy": args.energy, "seed": args.seed, "iterations": pruner.iteration,
        "min_iterations": pruner.convergence.min_iterations, "resumed": run.resumes,
        "converged_at_iteration": run.converged_at,
        "parameters_dense": _params(model), "parameters_pruned": _params(small),
        "percent_removed": 100.0 * rate, "R_percent_kept": 100.0 * (1.0 - rate),
        "percent_flops_removed": 100.0 * flops_removed,
        "target_metric": args.target_metric,
        "target_percent_removed": None if pruner.target is None else 100.0 * pruner.target,
        "achieved_percent_removed": 100.0 * pruner.removed_share,
        "units_total": pruner.num_units, "units_kept": int(pruner.best_state.sum()),
        "percent_units_kept": 100.0 * pruner.units_kept_share,
        "top1_P": pruned_top[0], "top5_P": pruned_top[1],
        "top1_exported": exported_top[0], "top5_exported": exported_top[1],
        "top1_F": dense_top[0], "top5_F": dense_top[1], "F_meaning": F_MEANING,
        "seconds_per_epoch": run.epoch_seconds, "minutes_total": sum(run.epoch_seconds) / 60.0,
        "pruned_model": model_path,
    }
    write_json(report, args.out)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(run.history, f)
    plot_history(run.history, args.out, run.converged_at, energy=args.energy)
    return report


def main(argv=None) -> int:
    """``edropout ...``: 0 on success, 2 for a user error, 1 when training stops on a non-finite value, 128 + the
    signal's number when SIGINT or SIGTERM stopped it; each failure is one line on stderr."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    run_state = {}
    try:
        with _stop_on_signals(run_state):
            report = prune(args, run_state)
    except UserError as error:
        print(f"edropout: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        checkpoint = os.path.join(args.out, "checkpoint.pt")
        kept = f"; the last checkpoint is {checkpoint}" if os.path.exists(checkpoint) else ""
        print(f"edropout: error: training stopped: {error}{kept}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        run = run_state.get("run")
        where = (f" at iteration {run.pruner.iteration} (epoch {run.epoch + 1}, batch {run.position} of "
                 f"{run.iterations_per_epoch}); checkpoint saved to {run.checkpoint_path}; continue with --resume"
                 if stop.saved else "; nothing was saved" if run is None else
                 f"; the last checkpoint is {run.checkpoint_path}")
        print(f"edropout: interrupted by {signal.Signals(stop.signum).name}{where}", file=sys.stderr)
        return 128 + stop.signum
    if report is None:  # a rank other than 0: rank 0 printed the summary
        return 0
    print(summary_line(report, (time.perf_counter() - start) / 60, args.out))
    return 0


def summary_line(report: dict, minutes: float, out: str) -> str:
    """The one line the command prints: the pruned network's accuracy first, then its size against the target."""
    target = report["target_percent_removed"]
    aim = "" if target is None else f" (target {target:.1f}% of {report['target_metric']})"
    return (f"{report['model']} on {report['data']}: Top-1 (P) {report['top1_P']:.2f}%  Top-5 (P) "
            f"{report['top5_P']:.2f}%  removed {report['percent_removed']:.1f}% of parameters and "
            f"{report['percent_flops_removed']:.1f}% of FLOPs{aim}, {report['percent_units_kept']:.1f}% of units "
            f"kept, in {minutes:.2f} min; report in {out}/report.json")


if __name__ == "__main__":
    sys.exit(main())
