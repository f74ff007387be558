"""Accuracy benchmark on Fashion-MNIST: dense vs EDropout vs L1 and Torch-Pruning filter pruning + fine-tune.

The training images are split, with a fixed seed, into training and validation images (the paper's 54,000 /
6,000); every choice is made on validation and the test images are only reported. Each (network, method,
seed) cell trains for the same number of epochs on one one-cycle schedule, checkpoints every epoch, and
writes ``<out>/cells/<cell>.json`` once done; a done cell is skipped, a killed one resumes from its last epoch,
so a long table is finished over several sittings. After every cell the table (``<out>/<config>.{md,json}``
and plots) is rebuilt from the cells done so far, marked partial until all are.

    export PYTHONPATH=$PWD
    python benchmarks/accuracy_fashion_mnist.py --config benchmarks/configs/accuracy_cpu_full.json
    python benchmarks/accuracy_fashion_mnist.py --config ... --cells 'resnet18:edropout_*:*'   # some cells only
    python benchmarks/accuracy_fashion_mnist.py --config ... --table-only                      # rebuild the table
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads that get
# descheduled made a 2-thread training step 8x slower than with this setting (measured: 7.6 s vs 0.9 s per
# ResNet-18 w16 step at load average 11). Read by OpenMP when torch starts, so set before importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy_cells import Bench, cell_status, run_cell  # noqa: E402
from accuracy_table import write_table  # noqa: E402
from edropout.app.data import load_dataset, split_validation  # noqa: E402
from edropout.app.report import run_metadata  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/<config>)")
    parser.add_argument("--checkpoints", default=None, help="checkpoint directory (default runs/accuracy/<config>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cells", default="*:*:*",
                        help="comma-separated net:method:seed patterns (shell wildcards) of the cells to run")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the done cells")
    return parser.parse_args(argv)


def load_splits(config):
    """Training data (with the test set) and the validation images, cut to the config's sizes if given."""
    data = load_dataset(config.get("data", "fashion-mnist"), config.get("data_dir"))
    data, val_x, val_y = split_validation(data, config["validation_images"], config.get("split_seed", 0))
    if config.get("train_images"):
        data.train_x, data.train_y = data.train_x[:config["train_images"]], data.train_y[:config["train_images"]]
    if config.get("test_images"):
        data.test_x, data.test_y = data.test_x[:config["test_images"]], data.test_y[:config["test_images"]]
    return data, val_x, val_y


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _selected(cell, patterns):
    return any(fnmatch.fnmatch(f"{cell.net}:{cell.method}:{cell.seed}", p.strip()) for p in patterns.split(","))


def _status_text(bench, cell, status):
    """The table's status line of a cell whose ``cell_status`` is ``status``, with its progress if it is running."""
    progress = os.path.join(bench.cell_dir(cell), "progress.json")
    if not os.path.exists(bench.result_path(cell)) and os.path.exists(progress):  # not done, nor stale
        with open(progress) as f:
            p = json.load(f)
        curve = f", validation Top-1 {p['val_curve'][-1]:.2f}" if p["val_curve"] else ""
        return f"in progress: epoch {p['epoch']} of {p['epochs']}{curve}" + \
            ("" if status == "ready" else f"; {status}")
    return "not started" if status == "ready" else status


def rebuild_table(bench, name, command):
    records, statuses = {}, {}
    for cell in bench.cells():
        status = cell_status(bench, cell)
        if status == "done":  # a stale cell is listed, not counted
            with open(bench.result_path(cell)) as f:
                records[(cell.net, cell.method, cell.seed)] = json.load(f)
        statuses[cell.name] = _status_text(bench, cell, status)
    dates = sorted({r["date"] for r in records.values()})
    meta = {**run_metadata(name, bench.device), "command": command,
            "dates": (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}") if dates else "no cell done",
            "train_images": len(bench.train.train_y), "val_images": len(bench.val_y),
            "test_images": len(bench.train.test_y)}
    return write_table(bench.config, meta, records, statuses, bench.results_dir, name)


def main(argv=None):
    args = parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", name)
    checkpoints = args.checkpoints or os.path.join(ROOT, "runs", "accuracy", name)
    data, val_x, val_y = load_splits(config)
    device = torch.device(args.device)
    bench = Bench(config, data, val_x, val_y, device, out, checkpoints)
    command = f"python benchmarks/accuracy_fashion_mnist.py --config {shlex.quote(os.path.relpath(args.config, ROOT))}"
    if not args.table_only:
        metadata = {**run_metadata(name, device), "commit": _commit()}
        for cell in bench.cells():
            if not _selected(cell, args.cells):
                continue
            status = cell_status(bench, cell)
            if status != "ready":
                print(f"{cell.name}: {status}", file=sys.stderr, flush=True)
                continue
            print(f"{cell.name}: running", file=sys.stderr, flush=True)
            record = run_cell(bench, cell, metadata)
            if record is None:
                print(f"{cell.name}: held by another process, skipped", file=sys.stderr, flush=True)
                continue
            split = "test" if "test" in record else "val"
            print(f"{cell.name}: done, {split} Top-1 {record[split][0]:.2f}, {record['params_removed']:.1f} % of "
                  f"parameters removed, {record['seconds'] / 60:.1f} min", file=sys.stderr, flush=True)
            rebuild_table(bench, name, command)
    return rebuild_table(bench, name, command)


if __name__ == "__main__":
    main()
