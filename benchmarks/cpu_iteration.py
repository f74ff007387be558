"""CPU benchmark of whole training iterations: one EDropout iteration and one converged iteration against one
plain training iteration of the same model, batch and optimizer (issue 7's floors), in one run.

    python benchmarks/cpu_iteration.py          # writes benchmarks/results/cpu_iteration.{json,md}

Fixed setup: 2 torch threads, LeNet-style and ResNet-18-style nets at 28×28 grey input, batch 128, Adadelta
(the official optimizer), keep fraction k = 0.5, backend "auto" (the CPU rule). Times are medians of
interleaved rounds, so load from other processes hits every path alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from edropout import EDropout
from edropout.app.models import build_model
from edropout.app.report import run_metadata

THREADS, BATCH, SIZE, CLASSES, KEEP = 2, 128, 28, 10, 0.5


def _optimizer(model):
    return torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)


def iteration_paths(net, members_list, x, y):
    """Callables for one net: the plain iteration, an EDropout iteration per S, and the converged iteration."""
    torch.manual_seed(0)
    plain_model = build_model(net, 1, SIZE, CLASSES)
    plain_opt = _optimizer(plain_model)

    def plain():
        loss = F.cross_entropy(plain_model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def evolving(members):
        torch.manual_seed(0)
        model = build_model(net, 1, SIZE, CLASSES)
        opt = _optimizer(model)
        pruner = EDropout(model, x[:2], population_size=members, init_keep=KEEP, min_iterations=10 ** 9)
        return pruner, opt

    paths = {"plain": plain}
    for members in members_list:
        pruner, opt = evolving(members)
        paths[f"edropout_S{members}"] = lambda p=pruner, o=opt: p.step(x, y, o)
    frozen, frozen_opt = evolving(members_list[0])
    frozen.step(x, y, frozen_opt)
    frozen.finalize()  # from here on each step trains the compact network
    paths["converged"] = lambda: frozen.step(x, y, frozen_opt)
    return paths, frozen.pruning_rate


def measure(net, members_list, rounds):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    paths, rate = iteration_paths(net, members_list, x, y)
    for fn in paths.values():
        fn()  # warm-up (plans, caches, allocator)
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"net": net, "ms": medians, "converged_pruning_rate": rate,
            "ratio_to_plain": {name: ms / medians["plain"] for name, ms in medians.items()},
            "floor": {f"edropout_S{s}": 1 + s * KEEP ** 2 / 3 for s in members_list}}


def markdown(rows, meta) -> str:
    lines = ["# CPU training iterations: EDropout vs plain", "", f"{meta['machine']}; torch {meta['torch']}; "
             f"{meta['date']}; {THREADS} threads; batch {BATCH}, {SIZE}×{SIZE} grey; Adadelta; k = {KEEP}; "
             "backend auto; medians of interleaved rounds.", "",
             "| net | iteration | ms | × plain | cost-model floor 1 + S·k²/3 |", "|---|---|---|---|---|"]
    for r in rows:
        for name, ms in r["ms"].items():
            label = name if name != "converged" else f"converged ({100 * r['converged_pruning_rate']:.0f}% removed)"
            floor = r["floor"].get(name)
            lines.append(f"| {r['net']} | {label} | {ms:.1f} | {r['ratio_to_plain'][name]:.2f} | "
                         f"{'' if floor is None else f'{floor:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--nets", nargs="+", default=["lenet", "resnet18"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rows = [measure(net, args.members, args.rounds) for net in args.nets]
    meta = run_metadata("cpu_iteration", torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_iteration.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "cpu_iteration.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
