"""The ``edropout`` command: ``edropout prune`` trains a model with EDropout on a data set and writes a report,
the pruned model and plots to ``--out``. A run killed midway resumes with ``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .checkpoint import load_pruned_model, save_pruned_model
from .data import DATASETS, load_dataset
from ..energy import ENERGIES
from ..flops import count_flops
from ..size_target import METRICS
from .models import MODELS, build_model
from ..pruner import EDropout
from .report import plot_history, write_json
from .training import Run, evaluate, make_optimizer


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
    parser = argparse.ArgumentParser(prog="edropout", description="Energy-based pruning (EDropout) for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="train a model with EDropout and export the pruned network")
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--width", type=int, default=None, help="base width of the model (default per model)")
    p.add_argument("--data", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST idx files")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adadelta", choices=("adadelta", "sgd", "adam"))
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--lr-step", type=int, default=None, help="multiply lr by 0.1 every N epochs (default: never)")
    p.add_argument("--population-size", type=int, default=8)
    p.add_argument("--init-keep", type=float, default=0.5)
    p.add_argument("--mutation-factor", type=float, default=0.9)
    p.add_argument("--crossover-rate", type=float, default=0.9)
    p.add_argument("--energy", default="margin", choices=ENERGIES)
    p.add_argument("--target-rate", type=_share, default=None,
                   help="share of the target metric the pruned network removes, in [0, 1) (default: no target, "
                        "the share is whatever the evolution lands on)")
    p.add_argument("--target-metric", default="params", choices=METRICS,
                   help="what --target-rate counts: trainable parameters or FLOPs")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "batched", "compact", "triton"))
    p.add_argument("--min-iterations", type=int, default=None,
                   help="iterations before the state may freeze (default: half of the run)")
    p.add_argument("--patience", type=int, default=10, help="freeze once the best state is unchanged this long")
    p.add_argument("--rescore-parents", action="store_true", help="re-score parents on every batch")
    p.add_argument("--eval-mode-scoring", action="store_true", help="score with BatchNorm running statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="runs/edropout", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prune(args) -> dict:
    """Run the main job and return the report it wrote."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    data = load_dataset(args.data, args.data_dir, args.limit)
    torch.manual_seed(args.seed)
    kwargs = {"in_channels": data.in_channels, "input_size": data.input_size,
              "num_classes": data.num_classes, "width": args.width}
    model = build_model(args.model, **kwargs).to(device)
    per_epoch = len(data.train_y) // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {args.batch_size} exceeds the {len(data.train_y)} training images")
    total = per_epoch * args.epochs
    min_iterations = args.min_iterations if args.min_iterations is not None else total // 2
    pruner = EDropout(model, data.train_x[:2].to(device), population_size=args.population_size,
                      init_keep=args.init_keep, mutation_factor=args.mutation_factor,
                      crossover_rate=args.crossover_rate, energy=args.energy, backend=args.backend, seed=args.seed,
                      min_iterations=min_iterations, patience=args.patience, rescore_parents=args.rescore_parents,
                      score_in_eval_mode=args.eval_mode_scoring, target=args.target_rate,
                      target_metric=args.target_metric)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step or 10 ** 9, gamma=0.1)
    os.makedirs(args.out, exist_ok=True)
    run = Run(model, pruner, optimizer, scheduler, data, args.batch_size, args.seed, args.out)
    if args.resume and run.resume():
        print(f"resumed from {run.checkpoint_path} at epoch {run.epoch}", file=sys.stderr)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=run.epoch * per_epoch, desc="edropout", unit="it", file=sys.stderr)
    while run.epoch < args.epochs:
        run.train_epoch(progress)
    if progress is not None:
        progress.close()
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
        "epochs": args.epochs, "batch_size": args.batch_size, "population_size": args.population_size,
        "energy": args.energy, "seed": args.seed, "iterations": pruner.iteration,
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
    plot_history(run.history, args.out, run.converged_at)
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    report = prune(args)
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
