"""The ``edropout`` command: ``edropout prune`` trains a model with EDropout on a data set and writes a report,
the pruned model and plots to ``--out``. A run killed midway resumes with ``--resume``. Under
``torchrun --nproc_per_node=N -m edropout prune ...`` it runs data- or population-parallel (``--parallel``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_pruned_model, save_pruned_model
from .data import DATASETS, load_dataset
from ..distributed import MODES
from ..energy import ENERGIES
from .launch import join, leave
from .models import MODELS, build_model
from ..pruner import EDropout
from .report import plot_history, write_json
from .training import Run, evaluate, make_optimizer


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
    p.add_argument("--parallel", default="data", choices=MODES,
                   help="under torchrun: split each batch over the ranks (data) or the population (population)")
    return parser


def _params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prune(args) -> dict | None:
    """Run the main job and return the report it wrote (None on ranks other than 0, which write nothing)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    launch = join(args.device, args.parallel)
    try:
        report = _prune(args, launch)
    except BaseException:
        leave(launch, finished=False)
        raise
    leave(launch)
    return report


def _prune(args, launch) -> dict | None:
    device = launch.device
    data = load_dataset(args.data, args.data_dir, args.limit)
    torch.manual_seed(args.seed)
    kwargs = {"in_channels": data.in_channels, "input_size": data.input_size,
              "num_classes": data.num_classes, "width": args.width}
    model = build_model(args.model, **kwargs).to(device)
    per_epoch = launch.batches_per_epoch(len(data.train_y), args.batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch size {args.batch_size} exceeds the {len(data.train_y)} training images"
                         + (f" shared by {launch.world_size} ranks" if launch.distributed else ""))
    total = per_epoch * args.epochs
    min_iterations = args.min_iterations if args.min_iterations is not None else total // 2
    trained = model
    if launch.distributed:  # DDP averages the ranks' gradients; rank 0's weights are broadcast first
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    pruner = EDropout(trained, data.train_x[:2].to(device), population_size=args.population_size,
                      init_keep=args.init_keep, mutation_factor=args.mutation_factor,
                      crossover_rate=args.crossover_rate, energy=args.energy, backend=args.backend, seed=args.seed,
                      min_iterations=min_iterations, patience=args.patience, rescore_parents=args.rescore_parents,
                      score_in_eval_mode=args.eval_mode_scoring,
                      parallel=args.parallel if launch.distributed else None)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step or 10 ** 9, gamma=0.1)
    if launch.writes:
        os.makedirs(args.out, exist_ok=True)
    run = Run(model, pruner, optimizer, scheduler, data, args.batch_size, args.seed, args.out, launch)
    if args.resume and run.resume() and launch.writes:
        print(f"resumed from {run.checkpoint_path} at epoch {run.epoch}", file=sys.stderr)
    progress = None
    if not args.no_progress and launch.writes:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=run.epoch * per_epoch, desc="edropout", unit="it", file=sys.stderr)
    while run.epoch < args.epochs:
        run.train_epoch(progress)
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
    report = {
        "model": args.model, "data": args.data, "device": str(device), "backend": str(pruner.backend),
        "world_size": run.world_size, "parallel": run.parallel,
        "epochs": args.epochs, "batch_size": args.batch_size, "population_size": args.population_size,
        "energy": args.energy, "seed": args.seed, "iterations": pruner.iteration,
        "converged_at_iteration": run.converged_at,
        "parameters_dense": _params(model), "parameters_pruned": _params(small),
        "percent_removed": 100.0 * rate, "R_percent_kept": 100.0 * (1.0 - rate),
        "units_total": pruner.num_units, "units_kept": int(pruner.best_state.sum()),
        "top1_F": dense_top[0], "top5_F": dense_top[1], "top1_P": pruned_top[0], "top5_P": pruned_top[1],
        "top1_exported": exported_top[0], "top5_exported": exported_top[1],
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
    try:
        report = prune(args)
    except (ValueError, FileNotFoundError) as exc:  # a user error: one line, no traceback
        print(f"edropout: error: {exc}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    print(f"{report['model']} on {report['data']}: Top-1 (F) {report['top1_F']:.2f}%  (P) {report['top1_P']:.2f}%  "
          f"Top-5 (P) {report['top5_P']:.2f}%  removed {report['percent_removed']:.2f}% of parameters "
          f"(R = {report['R_percent_kept']:.2f}% kept)  in {(time.perf_counter() - start) / 60:.2f} min; "
          f"report in {args.out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
