"""Repair or penalty: which way of holding EDropout's population at a size target gives the better network.

For every network, seed and method of a config file (``methods``: {name: {"target_penalty": null | weight}},
null = repair), EDropout trains from the same initial weights with ``target`` and the config's schedule, and the
pruned network (P) is evaluated on a validation split cut from the end of the training set (never the test set:
this measurement picks a default). Reported: validation Top-1/Top-5, the share removed, the share of units kept
and the training time. Writes ``target_<config>.{json,md}`` under ``--out``; each finished (net, seed, method)
cell is kept in ``target_<config>_cells.json`` and skipped when the command is run again.

    python benchmarks/target_repair_vs_penalty.py --config benchmarks/configs/target_cpu.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from edropout.app.data import load_dataset
from edropout.app.models import build_model
from edropout.app.report import benchmark_setup, run_metadata
from edropout.app.training import evaluate, train_edropout


def split(config):
    """Training images from the front of the training set, validation images from its end (disjoint)."""
    data = load_dataset(config.get("data", "fashion-mnist"), config.get("data_dir"))
    n_train, n_val = config["train_images"], config["validation_images"]
    if n_train + n_val > len(data.train_y):
        raise ValueError(f"train_images + validation_images exceed the {len(data.train_y)} training images")
    val_x, val_y = data.train_x[-n_val:], data.train_y[-n_val:]
    data.train_x, data.train_y = data.train_x[:n_train], data.train_y[:n_train]
    return data, val_x, val_y


def run_one(net, width, seed, method, data, val_x, val_y, config, device):
    """One EDropout run with the method's target handling; the pruned network's validation accuracy and size."""
    torch.manual_seed(seed)
    model = build_model(net, data.in_channels, data.input_size, data.num_classes, width).to(device)
    run_config = {**config, **config["methods"][method]}
    pruner, run, seconds = train_edropout(model, data.train_x[:2].to(device), data, run_config, seed)
    top = evaluate(model, val_x, val_y, context=pruner.apply())
    return {"top1": top[0], "top5": top[1], "removed": 100 * pruner.removed_share,
            "units_kept": 100 * pruner.units_kept_share, "seconds": seconds,
            "converged_at_iteration": run.converged_at, "iterations": pruner.iteration}


def _load_cells(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _save_cells(cells, path):
    """Atomically, so an interrupted run keeps every finished cell."""
    with open(path + ".tmp", "w") as f:
        json.dump(cells, f, indent=2)
    os.replace(path + ".tmp", path)


def _mean_spread(values):
    return statistics.mean(values), (max(values) - min(values)) / 2


def markdown(raw, meta, config):
    fmt = lambda v: f"{v[0]:.2f} ± {v[1]:.2f}"  # noqa: E731
    lines = [f"# Size target: repair vs energy penalty ({meta['config']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; seeds {config['seeds']}; "
             f"{config['epochs']} epochs of {config['train_images']} Fashion-MNIST training images, batch "
             f"{config['batch_size']}, {config['optimizer']}, S = {config['population_size']}, "
             f"target {config['target']} of {config.get('target_metric', 'params')}; accuracy of (P) on "
             f"{config['validation_images']} validation images cut from the end of the training set; mean ± half "
             f"the range over seeds. Command: `{meta['command']}`.", "",
             "| net | method | Top-1 | Top-5 | % removed | % units kept | state froze at | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for net, methods in raw.items():
        for method, runs in methods.items():
            cols = {k: _mean_spread([r[k] for r in runs]) for k in ("top1", "top5", "removed", "units_kept",
                                                                    "seconds")}
            froze = ", ".join(str(r["converged_at_iteration"]) for r in runs)
            lines.append(f"| {net} | {method} | {fmt(cols['top1'])} | {fmt(cols['top5'])} | "
                         f"{fmt(cols['removed'])} | {fmt(cols['units_kept'])} | {froze} | {fmt(cols['seconds'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, config, name, device = benchmark_setup(argv, __doc__.splitlines()[0],
                                                 os.path.join(os.path.dirname(__file__), "results"))
    data, val_x, val_y = split(config)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"target_{name}")
    cells = _load_cells(base + "_cells.json")
    raw = {}
    for net, width in config["networks"].items():
        raw[net] = {method: [] for method in config["methods"]}
        for seed in config["seeds"]:
            for method in config["methods"]:
                key = f"{net}|{width}|{seed}|{method}"
                if key not in cells:
                    cells[key] = run_one(net, width, seed, method, data, val_x, val_y, config, device)
                    _save_cells(cells, base + "_cells.json")
                result = cells[key]
                raw[net][method].append(result)
                print(f"{net} seed {seed} {method}: Top-1 {result['top1']:.2f}, removed {result['removed']:.2f}%",
                      file=sys.stderr)
    meta = {**run_metadata(name, device),
            "command": f"python benchmarks/target_repair_vs_penalty.py --config {args.config}"}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "config": config, "runs": raw}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(raw, meta, config))
    print(markdown(raw, meta, config))
    return raw


if __name__ == "__main__":
    main()
