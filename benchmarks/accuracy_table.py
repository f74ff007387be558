"""The Fashion-MNIST accuracy table, rebuilt from whatever cells are done: means and spreads over seeds, the
status of every planned cell (a partial table says so), the floors of the config, and the plots."""
from __future__ import annotations

import itertools
import json
import os
import statistics

from edropout.app.report import figure, plot_history

FIGURES = ("top1", "top5", "val_top1", "params_removed", "flops_removed", "units_kept", "minutes")
CHANCE_MARGIN = 5.0  # a Top-1 within this many points of 100 / classes counts as "at chance"


def _mean_spread(values):
    """Mean and half the range over seeds (0 for one seed)."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def cell_figures(record: dict, split: str) -> dict:
    """The table's figures of one done cell; Top-1/Top-5 from ``split`` (``test`` or ``val``)."""
    top = record.get(split) or [float("nan"), float("nan")]
    minutes = record.get("seconds_with_dense_prefix", record["seconds"]) / 60
    return {"top1": top[0], "top5": top[1], "val_top1": record["val"][0], "params_removed": record["params_removed"],
            "flops_removed": record["flops_removed"], "units_kept": record["units_kept"], "minutes": minutes}


def summarise(config: dict, records: dict, split: str) -> dict:
    """{net: {method: {figure: (mean, spread), "seeds": [...]}}} over the done cells."""
    table = {}
    for net, spec in config["networks"].items():
        for method in config["methods"]:
            done = [records[(net, method, s)] for s in spec["seeds"] if (net, method, s) in records]
            if not done:
                continue
            rows = [cell_figures(r, split) for r in done]
            entry = {f: _mean_spread([row[f] for row in rows]) for f in FIGURES}
            entry["seeds"] = [r["seed"] for r in done]
            table.setdefault(net, {})[method] = entry
    return table


def check_floors(config: dict, table: dict, records: dict, split: str) -> list:
    """(text, met: True/False/None) for every floor of the config and for "no cell at chance"; None = not yet
    measurable (a cell it needs is not done)."""
    checks = []
    for floor in config.get("floors", []):
        net, method = floor["net"], floor["method"]
        row = table.get(net, {}).get(method)
        if floor["what"] == "top1":
            text = f"{net} {method}: Top-1 >= {floor['at_least']}"
            checks.append((text, None if row is None else row["top1"][0] >= floor["at_least"]))
        elif floor["what"] == "params_removed":
            low, high = floor["within"]
            text = f"{net} {method}: {low}-{high} % of parameters removed"
            checks.append((text, None if row is None else low <= row["params_removed"][0] <= high))
        elif floor["what"] == "top1_vs":
            other = table.get(net, {}).get(floor["other"])
            text = f"{net} {method}: Top-1 at least {floor['other']}'s {floor['at_least']:+.1f} points"
            met = None if row is None or other is None else row["top1"][0] - other["top1"][0] >= floor["at_least"]
            checks.append((text, met))
        else:
            raise ValueError(f"unknown floor kind {floor['what']!r}: use top1, params_removed or top1_vs")
    chance = 100.0 / config.get("classes", 10)
    at_chance = [f"{n} {m} seed {s}" for (n, m, s), r in records.items()
                 if cell_figures(r, split)["top1"] < chance + CHANCE_MARGIN]
    checks.append((f"no cell at chance (Top-1 < {chance + CHANCE_MARGIN:.0f} %)"
                   + (f": {', '.join(at_chance)}" if at_chance else ""), not at_chance if records else None))
    return checks


def _fmt(ms, seeds):
    return f"{ms[0]:.2f}" if len(seeds) < 2 else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def _schedules(config) -> str:
    parts = []
    for net, spec in config["networks"].items():
        c = {**config, **spec}
        own = "".join(f", EDropout {k} {v}" for k, v in spec.get("edropout", {}).items())
        parts.append(f"{net}: {c['optimizer']}, peak lr {c['lr']}, weight decay {c.get('weight_decay', 1e-5)}{own}")
    return "; ".join(parts)


def comparison(config, table, split) -> list:
    """An ablation's view: one row per method, per network its Top-1 and the change against the method that
    ``config["compare_to"]`` names (the one every other method changes one thing of); [] without it. "–" is a cell
    not done yet, "not run" a method the config leaves out for that network."""
    reference = config.get("compare_to")
    if not reference:
        return []
    nets = list(table)
    name = "test" if split == "test" else "validation"
    lines = [f"Each change against `{reference}` ({name} Top-1, mean over the seeds done; in brackets the "
             f"change in points):", "",
             "| method | " + " | ".join(f"{net} w{config['networks'][net]['width']}" for net in nets) + " |",
             "|---|" + "---|" * len(nets)]
    for method, spec in config["methods"].items():
        cells = []
        for net in nets:
            row, ref = table[net].get(method), table[net].get(reference)
            if net not in spec.get("networks", [net]):
                cells.append("not run")
            elif row is None:
                cells.append("–")
            elif ref is None or method == reference:
                cells.append(f"{row['top1'][0]:.2f}")
            else:
                cells.append(f"{row['top1'][0]:.2f} ({row['top1'][0] - ref['top1'][0]:+.2f})")
        lines.append(f"| {spec.get('label', method)} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(config, meta, table, statuses, checks, split) -> str:
    done = sum(s == "done" for s in statuses.values())
    name = "test" if split == "test" else "validation"
    lines = [f"# Fashion-MNIST accuracy: {meta['config']}", ""]
    if done < len(statuses):
        lines += [f"**PARTIAL: {done} of {len(statuses)} cells done** (status of every cell below).", ""]
    lines += [f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['dates']}. Command: `{meta['command']}`.",
              f"Data: {meta['train_images']} train / {meta['val_images']} validation (fixed split, seed "
              f"{config.get('split_seed', 0)}) / {meta['test_images']} test images. Every method trains "
              f"{config['epochs']} epochs (batch {config['batch_size']}) on one one-cycle schedule per network "
              f"({_schedules(config)}); "
              f"pruning baselines prune the dense network after epoch {config['prune_epoch']} and fine-tune for "
              f"the rest. Top-1/Top-5 on the {name} set; mean ± half the range over the seeds done.", "",
              f"| net | method | seeds | Top-1 | Top-5 | val Top-1 | % params removed | % FLOPs removed | "
              f"% units kept | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for net, row in table.items():
        for method, r in row.items():
            s = r["seeds"]
            lines.append(f"| {net} w{config['networks'][net]['width']} | {config['methods'][method].get('label', method)}"
                         f" | {len(s)} | " + " | ".join(_fmt(r[f], s) for f in FIGURES) + " |")
    lines += [""] + comparison(config, table, split)
    lines += ["Minutes are training wall-clock on a shared machine (load average per epoch in the cell files); "
              "a pruning baseline's include the dense epochs before pruning.", "", "Floors (on the means):", ""]
    lines += [f"- {'not yet measurable' if ok is None else 'met' if ok else 'MISSED'}: {text}" for text, ok in checks]
    lines += ["", "Cells:", "", "| cell | status |", "|---|---|"]
    lines += [f"| {cell} | {status} |" for cell, status in statuses.items()]
    return "\n".join(lines) + "\n"


def plot_accuracy(config, table, path):
    """Top-1 against % of parameters kept, one marker per method, one colour per network."""
    markers = dict(zip(config["methods"], itertools.cycle("osD^vP*Xhp<>d")))  # any number of methods
    with figure(path, (6.5, 4.5)) as (fig, ax):
        for i, (net, row) in enumerate(table.items()):
            for method, r in row.items():
                ax.errorbar(100 - r["params_removed"][0], r["top1"][0], yerr=r["top1"][1], marker=markers[method],
                            color=f"C{i}", linestyle="none",
                            label=f"{net}: {config['methods'][method].get('label', method)}")
        ax.set_xlabel("% of parameters kept")
        ax.set_ylabel("Top-1 (%)")
        ax.legend(fontsize=6)


def plot_validation_curves(config, records, net, path):
    """Validation Top-1 after every epoch of each done cell of ``net`` (first seed)."""
    seed = config["networks"][net]["seeds"][0]
    with figure(path, (6.5, 4)) as (fig, ax):
        for method in config["methods"]:
            r = records.get((net, method, seed))
            if r is None:
                continue
            start = r.get("prune_epoch", 0)
            ax.plot(range(start + 1, start + 1 + len(r["val_curve"])), r["val_curve"], marker=".",
                    label=config["methods"][method].get("label", method))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Top-1 (%)")
        ax.legend(fontsize=7)


def write_table(config, meta, records, statuses, out_dir, name) -> dict:
    """Write ``<name>.{md,json}`` and the plots under ``out_dir``; returns the summarised table."""
    split = "test" if config.get("evaluate_test", True) else "val"
    table = summarise(config, records, split)
    checks = check_floors(config, table, records, split)
    base = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "config": config, "split": split, "table": table, "cells": statuses,
                   "floors": [{"floor": t, "met": ok} for t, ok in checks]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(config, meta, table, statuses, checks, split))
    if table:
        plot_accuracy(config, table, base + "_accuracy_vs_params.png")
    for net in config["networks"]:
        if any(k[0] == net for k in records):
            plot_validation_curves(config, records, net, f"{base}_{net}_val_curves.png")
    for (net, method, seed), r in records.items():
        if r.get("history") and seed == config["networks"][net]["seeds"][0]:
            history = [dict(zip(r["history_columns"], h)) for h in r["history"]]
            plot_history(history, out_dir, r.get("converged_at_iteration"), prefix=f"{name}_{net}_{method}_",
                         energy=r["settings"].get("energy", "margin"))
    return table
