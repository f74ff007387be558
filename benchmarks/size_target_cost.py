"""What repairing a population to a size target costs beside scoring it: one generation's repair (children made
by the evolution operators, then repaired to the target) against one generation's scoring on CPU.

Both are timed in interleaved rounds on the same children (ResNet-18-style and SqueezeNet-style, 28×28, batch
128, backend auto); reported: median ms of each and repair as a share of scoring. Run it under
with other jobs paused on the shared machine. Writes ``results/size_target_cost.{json,md}``.

    python benchmarks/size_target_cost.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from edropout import EDropout
from edropout import evolution as evo
from edropout.app.models import build_model
from edropout.app.report import run_metadata

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [("resnet18", 16, 8), ("resnet18", 16, 32), ("squeezenet", 16, 8), ("squeezenet", 16, 32)]
ROUNDS = 7
THREADS = 2


def time_case(net, width, members):
    """Median seconds of one generation's repair and of scoring the repaired children, interleaved."""
    torch.manual_seed(0)
    model = build_model(net, 1, 28, 10, width).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    pruner = EDropout(model, x[:2], population_size=members, seed=0, target=0.5)
    size = pruner.size_target
    repair, scoring, rounds = [], [], []
    for _ in range(ROUNDS):
        draws = evo.draw_randoms(members, pruner.num_units, g)
        raw = evo.keep_one_per_group(evo.make_children(pruner.population, draws, 0.9, 0.9), pruner.units.group_of_unit,
                                     g)
        start = time.perf_counter()
        children = size.repair(raw, g)
        repair.append(time.perf_counter() - start)
        start = time.perf_counter()
        pruner.score_states(children, x, y)
        scoring.append(time.perf_counter() - start)
        rounds.append(float((size.measure.share_removed(children) - 0.5).abs().max()))
    r, s = statistics.median(repair), statistics.median(scoring)
    return {"net": net, "width": width, "S": members, "D": pruner.num_units, "repair_ms": 1e3 * r,
            "score_ms": 1e3 * s, "repair_share": r / s, "worst_distance_to_target": max(rounds)}


def main():
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]
    rows = [time_case(*case) for case in CASES]
    meta = {**run_metadata("size_target_cost", "cpu"), "threads": THREADS, "rounds": ROUNDS,
            "command": "python benchmarks/size_target_cost.py (other jobs paused)",
            "loadavg_1min": [load_start, os.getloadavg()[0]]}
    lines = ["# Repair to a size target vs scoring, per generation (CPU)", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; {THREADS} threads; median of "
             f"{ROUNDS} interleaved rounds; batch 128, 28×28, target 0.5 of parameters, backend auto. "
             f"Command: `{meta['command']}`. Load average (1 min) {meta['loadavg_1min'][0]:.1f} at the start, "
             f"{meta['loadavg_1min'][1]:.1f} at the end: processes started after the others were paused share "
             f"the cores, so compare the columns of one row (timed in interleaved rounds), not absolute times.", "",
             "| net | width | S | D | repair (ms) | scoring (ms) | repair / scoring | worst distance to target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['width']} | {r['S']} | {r['D']} | {r['repair_ms']:.2f} | "
                     f"{r['score_ms']:.1f} | {100 * r['repair_share']:.2f} % | "
                     f"{100 * r['worst_distance_to_target']:.2f} pt |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "size_target_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "size_target_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
