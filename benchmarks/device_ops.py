"""Device operations per scoring call and per training iteration, counted on CPU: what a GPU would launch.

A ``TorchDispatchMode`` counts every ATen operation that reaches the dispatcher (views and allocations launch
nothing on a GPU and are counted apart; so are host synchronisations, ``aten._local_scalar_dense``), and a patch
of Triton's interpreter counts kernel launches (the interpreter's own tensor copies inside a launch are not
counted). Counts do not depend on widths or batch size, so a narrow ResNet-18-style net on 8x8 inputs stands in
for the benchmark net; they are per call of ``EDropout.energies`` and per ``EDropout.step`` (after warm-up steps,
mean and max over the counted steps), for each backend at S = 8 and 32, beside one plain training iteration
(forward, backward, ``optimizer.step()``). The optimizers use ``foreach=True``, as torch picks on CUDA.

    TRITON_INTERPRET=1 python benchmarks/device_ops.py     # writes benchmarks/results/device_ops.{json,md}
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of edropout_kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from edropout import EDropout  # noqa: E402
from edropout.app.models import build_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
              "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "t", "transpose",
              "as_strided", "split", "split_with_sizes", "unbind", "chunk", "view_as", "_reshape_alias", "unfold",
              "lift_fresh", "_to_copy_noop", "set_", "resize_"}
_SYNC = {"_local_scalar_dense", "is_nonzero", "item"}


class OpCounter(TorchDispatchMode):
    """Counts ATen operations by kind: launching ops (by name), no-launch ops (views, allocations), syncs."""

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.reset()

    def reset(self):
        self.launching = collections.Counter()
        self.no_launch = 0
        self.syncs = collections.Counter()
        self.triton = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if name in _SYNC:
                self.syncs[name] += 1
            elif name in _NO_LAUNCH or func.is_view:
                self.no_launch += 1
            else:
                self.launching[name] += 1
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict:
        aten = sum(self.launching.values())
        triton = sum(self.triton.values())
        return {"device_ops": aten + triton, "aten": aten, "triton": triton, "syncs": sum(self.syncs.values()),
                "views_and_allocations": self.no_launch}


@contextlib.contextmanager
def counting():
    """An OpCounter that also counts Triton launches (interpreter), with ATen counting paused inside them."""
    from triton.runtime.interpreter import InterpretedFunction

    counter = OpCounter()
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter.triton[getattr(self.fn, "__name__", "kernel")] += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.run = original


def _optimizer(model):
    return torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5, foreach=True)


def _data(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


def count_plain(net, width, batch, size, steps):
    torch.manual_seed(0)
    model = build_model(net, 1, size, 10, width)
    opt = _optimizer(model)
    x, y = _data(batch, size)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    counts = []
    for _ in range(steps):
        with counting() as c:
            step()
        counts.append(c.totals())
    return counts


def count_edropout(net, width, batch, size, backend, members, steps, warmup):
    torch.manual_seed(0)
    model = build_model(net, 1, size, 10, width)
    opt = _optimizer(model)
    x, y = _data(batch, size)
    pruner = EDropout(model, x[:2], population_size=members, backend=backend, min_iterations=10 ** 9)
    for _ in range(warmup):
        pruner.step(x, y, opt)
    pruner.energies(x, y)
    with counting() as c:
        pruner.energies(x, y)
    scoring = c.totals()
    scoring_ops = dict(c.launching.most_common())
    scoring_triton = dict(c.triton)
    per_step = []
    for _ in range(steps):
        with counting() as c:
            pruner.step(x, y, opt)
        per_step.append(c.totals())
    return {"scoring": scoring, "scoring_aten_ops": scoring_ops, "scoring_triton": scoring_triton,
            "iteration": per_step, "last_iteration_aten_ops": dict(c.launching.most_common()),
            "last_iteration_triton": dict(c.triton)}


def _summary(counts):
    return {key: {"mean": sum(c[key] for c in counts) / len(counts), "max": max(c[key] for c in counts)}
            for key in counts[0]}


def markdown(report) -> str:
    """The table of a report (``main`` writes it; ``--markdown-only`` rewrites it from the JSON)."""
    cfg, info = report["config"], report["info"]
    plain = report["plain"]["device_ops"]["mean"]
    lines = ["# Device operations per scoring call and per iteration", "",
             f"Counted on CPU ({info['machine']}; torch {info['torch']}, triton {info['triton']} interpreter; "
             f"{info['date_utc']}; command `{info['command']}`): ATen operations that launch work (views and "
             "allocations excluded) plus Triton launches, for a "
             f"{cfg['net']} (width {cfg['width']}, {cfg['size']}x{cfg['size']}, batch {cfg['batch']}; counts do "
             f"not depend on these), Adadelta with foreach=True. Iteration: mean (min-max) over {cfg['steps']} "
             f"steps after {cfg['warmup']} warm-up steps; the max is a step whose best state changed, where the "
             "masks derived from it are counted too (on CPU those host-side operations cannot be told from device "
             "ones). Syncs: host synchronisations seen by the dispatcher (`.item()`, `bool()`, ...).", "",
             f"Plain training iteration: **{plain:.0f}** device ops "
             f"({report['plain']['syncs']['mean']:.0f} syncs).", "",
             "| backend | S | scoring call: ATen + Triton = ops | iteration: ATen + Triton = ops (min-max) | "
             "× plain (mean, min) | syncs per iteration |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        s, it = row["scoring"], row["iteration_summary"]
        low = min(c["device_ops"] for c in row["iteration"])
        lines.append(f"| {row['backend']} | {row['members']} | {s['aten']} + {s['triton']} = {s['device_ops']} | "
                     f"{it['aten']['mean']:.0f} + {it['triton']['mean']:.0f} = {it['device_ops']['mean']:.0f} "
                     f"({low:.0f}-{it['device_ops']['max']:.0f}) | {it['device_ops']['mean'] / plain:.2f}, "
                     f"{low / plain:.2f} | {it['syncs']['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="resnet18")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--backends", nargs="+", default=["reference", "batched", "compact", "triton"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--stem", default="device_ops")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json and stop")
    args = parser.parse_args(argv)
    if args.markdown_only:
        stem = os.path.join(args.out_dir, args.stem)
        with open(stem + ".json") as f:
            report = json.load(f)
        with open(stem + ".md", "w") as f:
            f.write(markdown(report))
        return
    torch.set_num_threads(1)
    import triton

    plain = _summary(count_plain(args.net, args.width, args.batch, args.size, args.steps))
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "stem")}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.stem)
    rows = []
    for backend in args.backends:
        for members in args.members:
            result = count_edropout(args.net, args.width, args.batch, args.size, backend, members, args.steps,
                                    args.warmup)
            result.update(backend=backend, members=members, iteration_summary=_summary(result["iteration"]))
            rows.append(result)
            print(backend, members, result["scoring"], result["iteration_summary"]["device_ops"], flush=True)
            report = {"config": config, "info": info, "plain": plain, "rows": rows}
            with open(stem + ".json", "w") as f:  # rewritten after every row: a long run leaves what it counted
                json.dump(report, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(markdown(report))
    print(markdown(report))

if __name__ == "__main__":
    main()
