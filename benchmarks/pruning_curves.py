"""Filter-pruning curves on Fashion-MNIST: Batch Bridgeout vs Dropout vs weight decay, plus EDropout's point.

The same CNN (the engine's AlexNet-style net: five conv layers, two hidden Linear layers; its own Dropout(0.5)
layers set to p = 0 so that every run has exactly one regularizer), from the same initial weights, is trained
three ways: Batch Bridgeout on every conv and hidden Linear layer (then removed), Dropout after every ReLU,
or weight decay only. Then, for every fraction f, the share f of filters with the smallest L2 norm is removed
from every conv layer (Linear hidden layers kept), physically via ``export_pruned`` and without fine-tuning,
and the smaller network's Top-1 is measured (METHOD.md §8). EDropout trains the same net for the same epochs;
its exported (P) network is one point, placed at the share of conv filters its state removes (its Linear
hidden units may be pruned too, which only its "params removed" column shows).

    python benchmarks/pruning_curves.py --config benchmarks/configs/curves_cpu.json

Writes ``pruning_curves_<config>.{json,md,png}`` under ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from edropout.app.data import load_benchmark_data
from edropout.export import export_pruned
from edropout.flops import count_parameters
from edropout.magnitude_pruning import conv_filter_count, conv_filter_units, magnitude_state
from edropout.app.models import build_model
from edropout.regularizers import (apply_batch_bridgeout, apply_dropout, disable_dropout, remove_bridgeout,
                                   remove_dropout)
from edropout.app.report import benchmark_setup, figure, run_metadata
from edropout.app.training import evaluate, make_optimizer, train_edropout, train_plain

CURVES = ("batch_bridgeout", "dropout", "weight_decay")
LABELS = {"batch_bridgeout": "Batch Bridgeout", "dropout": "Dropout", "weight_decay": "Weight decay",
          "edropout": "EDropout (P)"}


def base_model(config, data, seed, device):
    """The config's network with fresh weights from ``seed`` (identical for every method) and no dropout."""
    torch.manual_seed(seed)
    model = build_model(config["net"], data.in_channels, data.input_size, data.num_classes, config["width"])
    disable_dropout(model)
    return model.to(device)


def train_regularised(method, config, data, seed, device):
    """Train the base model with one regularizer, then strip it; returns (plain model, training seconds)."""
    settings = config["methods"][method]
    model = base_model(config, data, seed, device)
    if method == "batch_bridgeout":
        apply_batch_bridgeout(model, settings["p"], settings["q"], settings["tau"],
                              backend=settings.get("backend", "torch"))
    elif method == "dropout":
        apply_dropout(model, settings["p"])
    elif method != "weight_decay":
        raise ValueError(f"unknown method {method!r}: use one of {CURVES}")
    optimizer = make_optimizer(config["optimizer"], model.parameters(), weight_decay=settings.get("weight_decay", 0.0))
    seconds = sum(train_plain(model, optimizer, data.train_x, data.train_y, config["epochs"], config["batch_size"],
                              seed))
    remove_bridgeout(model)
    remove_dropout(model)
    return model, seconds


def _measure(small, dense_filters, dense_params, data):
    top1, top5 = evaluate(small, data.test_x, data.test_y)
    return {"filters_removed": 100 * (1 - conv_filter_count(small) / dense_filters),
            "params_removed": 100 * (1 - count_parameters(small) / dense_params), "top1": top1, "top5": top5}


def pruning_curve(model, fractions, data, example):
    """Top-1/Top-5 after removing the share f of lowest-L2 filters of every conv layer, for each f (no fine-tuning)."""
    units = conv_filter_units(model, example)
    filters, params = conv_filter_count(model), count_parameters(model)
    points = []
    for fraction in fractions:
        small = export_pruned(model, units, magnitude_state(model, units, fraction, norm="l2"), example)
        points.append({"fraction": fraction, **_measure(small, filters, params, data)})
    return points


def edropout_point(config, data, seed, device, example):
    """EDropout trained like the others; its exported (P) network measured the same way."""
    model = base_model(config, data, seed, device)
    settings = {**config, **config["methods"]["edropout"]}
    pruner, run, seconds = train_edropout(model, example, data, settings, seed)
    point = _measure(pruner.export(), conv_filter_count(model), count_parameters(model), data)
    return {**point, "seconds": seconds, "converged_at_iteration": run.converged_at, "iterations": pruner.iteration}


def run_seed(config, data, seed, device):
    """All three curves and the EDropout point for one seed."""
    example = data.train_x[:2].to(device)
    result = {}
    for method in CURVES:
        model, seconds = train_regularised(method, config, data, seed, device)
        result[method] = {"seconds": seconds, "points": pruning_curve(model, config["fractions"], data, example)}
        print(f"seed {seed} {method}: " + " ".join(f"{p['top1']:.1f}" for p in result[method]["points"]),
              file=sys.stderr)
    result["edropout"] = edropout_point(config, data, seed, device, example)
    print(f"seed {seed} edropout: {result['edropout']['top1']:.1f} at "
          f"{result['edropout']['filters_removed']:.1f}% filters removed", file=sys.stderr)
    return result


def _mean_std(values):
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs, fractions):
    """Mean and std over seeds: per curve and fraction, and for the EDropout point."""
    keys = ("filters_removed", "params_removed", "top1", "top5")
    table = {"fractions": list(fractions), "curves": {}}
    for method in CURVES:
        table["curves"][method] = {
            "seconds": _mean_std([r[method]["seconds"] for r in runs]),
            "points": [{"fraction": f, **{k: _mean_std([r[method]["points"][i][k] for r in runs]) for k in keys}}
                       for i, f in enumerate(fractions)]}
    table["edropout"] = {k: _mean_std([r["edropout"][k] for r in runs]) for k in keys + ("seconds",)}
    return table


def markdown(table, meta):
    """The results table: one row per fraction (three curves), then EDropout's point and the training times."""
    fmt = lambda ms: f"{ms[0]:.2f}" + (f" ± {ms[1]:.2f}" if meta["seeds_count"] > 1 else "")
    lines = [f"# Filter-pruning curves on Fashion-MNIST: {meta['config']}", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; config `{meta['config']}`; "
             f"{meta['net']} width {meta['width']}; {meta['epochs']} epochs; {meta['train_images']} train / "
             f"{meta['test_images']} test images; seeds {meta['seeds']}; whole run {meta['wall_seconds']:.0f} s "
             f"wall clock.", "",
             "Top-1 (%) after removing the fraction f of lowest-L2 filters of every conv layer (Linear hidden "
             "layers kept), physically, without fine-tuning. The shares removed are measured on the exported "
             "network and are the same for every method.", "",
             "| f | conv filters removed (%) | params removed (%) | "
             + " | ".join(f"{LABELS[m]} Top-1" for m in CURVES) + " |",
             "|---|---|---|" + "---|" * len(CURVES)]
    first = table["curves"][CURVES[0]]["points"]
    for i, f in enumerate(table["fractions"]):
        cells = [fmt(table["curves"][m]["points"][i]["top1"]) for m in CURVES]
        lines.append(f"| {f:.1f} | {first[i]['filters_removed'][0]:.1f} | {first[i]['params_removed'][0]:.1f} | "
                     + " | ".join(cells) + " |")
    e = table["edropout"]
    lines += ["", "EDropout's own pruned network (its state also prunes Linear hidden units; plotted at its share "
              "of conv filters removed):", "",
              "| method | conv filters removed (%) | params removed (%) | Top-1 | Top-5 |", "|---|---|---|---|---|",
              f"| {LABELS['edropout']} | {fmt(e['filters_removed'])} | {fmt(e['params_removed'])} | "
              f"{fmt(e['top1'])} | {fmt(e['top5'])} |", "",
              "| method | training time (s) |", "|---|---|"]
    lines += [f"| {LABELS[m]} | {fmt(table['curves'][m]['seconds'])} |" for m in CURVES]
    lines.append(f"| {LABELS['edropout']} | {fmt(e['seconds'])} |")
    return "\n".join(lines) + "\n"


def plot_curves(table, meta, path):
    """Top-1 against the share of conv filters removed: one line per method, EDropout as a single point."""
    with figure(path, (8.5, 4.2)) as (fig, ax):
        for method, marker in zip(CURVES, "osD"):
            points = table["curves"][method]["points"]
            ax.errorbar([p["filters_removed"][0] for p in points], [p["top1"][0] for p in points],
                        yerr=[p["top1"][1] for p in points], marker=marker, capsize=3, label=LABELS[method])
        e = table["edropout"]
        ax.plot(e["filters_removed"][0], e["top1"][0], "*", markersize=14, color="black", zorder=5,
                label=f"{LABELS['edropout']} ({e['params_removed'][0]:.0f}% params removed)")
        ax.axhline(100 / 10, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("conv filters removed (%), lowest L2 norm per layer, no fine-tuning")
        ax.set_ylabel("Top-1 (%)")
        ax.set_title(f"{meta['net']} w{meta['width']}, Fashion-MNIST, {meta['epochs']} epochs ({meta['config']})",
                     fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point


def main(argv=None):
    args, config, name, device = benchmark_setup(argv, __doc__.splitlines()[0],
                                                 os.path.join(os.path.dirname(__file__), "results"))
    start = time.perf_counter()
    data = load_benchmark_data(config)
    runs = [run_seed(config, data, seed, device) for seed in config["seeds"]]
    table = summarise(runs, config["fractions"])
    meta = {**run_metadata(name, device), "net": config["net"], "width": config["width"], "epochs": config["epochs"],
            "seeds": config["seeds"], "seeds_count": len(config["seeds"]), "train_images": len(data.train_y),
            "test_images": len(data.test_y), "wall_seconds": time.perf_counter() - start}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"pruning_curves_{name}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "config": config, "table": table, "runs": runs}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(table, meta))
    plot_curves(table, meta, base + ".png")
    print(markdown(table, meta))
    return table


if __name__ == "__main__":
    main()
