"""Device operations per scoring call and per training iteration, counted on CPU: what a GPU would launch.

``op_counter`` counts every ATen operation that reaches the dispatcher, as a device op or, when all its inputs are
host copies (the best state read back for the convergence check and what is derived from it, ...), as a host op;
views and allocations launch nothing on a GPU and are counted apart, and so are host synchronisations. Triton
launches (interpreter; its own tensor copies inside a launch are not counted) and the engine's transfers count as
device ops. Counts do not depend on widths or batch size, so a narrow ResNet-18-style net on 8x8 inputs stands in
for the benchmark net; they are per call of ``EDropout.energies`` and per ``EDropout.step`` (after warm-up steps,
the worst steady step and the worst step whose best state changed), for each backend at S = 8 and 32, beside one
plain training iteration (forward, backward, ``optimizer.step()``). The optimizers use ``foreach=True``, as torch
picks on CUDA.

    TRITON_INTERPRET=1 python benchmarks/device_ops.py     # writes benchmarks/results/device_ops.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of edropout_kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edropout import EDropout  # noqa: E402
from edropout.app.models import build_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from op_counter import HostCopies, counting  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _optimizer(model):
    return torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5, foreach=True)


def _data(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


def count_plain(net, width, batch, size, steps):
    """Counts of ``steps`` plain training iterations (forward, backward, ``optimizer.step()``) after two warm-up
    ones (counted too, so that the host copies they make, the optimizer's step counters, are known)."""
    torch.manual_seed(0)
    model = build_model(net, 1, size, 10, width)
    opt = _optimizer(model)
    x, y = _data(batch, size)
    host = HostCopies()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counts = []
    for i in range(2 + steps):
        with counting(host) as c:
            step()
        if i >= 2:
            counts.append(c.totals())
    return counts


def count_edropout(net, width, batch, size, backend, members, steps, warmup):
    """Counts of one scoring call and of ``steps`` iterations after ``warmup`` ones, with whether each counted
    iteration changed the best state, and the operations of the last steady and the last changed iteration."""
    torch.manual_seed(0)
    model = build_model(net, 1, size, 10, width)
    opt = _optimizer(model)
    x, y = _data(batch, size)
    pruner = EDropout(model, x[:2], population_size=members, backend=backend, min_iterations=10 ** 9)
    host = HostCopies()
    host.mark_units(pruner.units)
    for _ in range(warmup):
        with counting(host):
            pruner.step(x, y, opt)
    pruner.energies(x, y)
    with counting(host) as c:
        pruner.energies(x, y)
    result = {"scoring": c.totals(), "scoring_ops": _ops(c), "iteration": [], "changed": []}
    for _ in range(steps):
        before = pruner.best_state
        with counting(host) as c:
            pruner.step(x, y, opt)
        changed = pruner.best_state is not before
        result["iteration"].append(c.totals())
        result["changed"].append(changed)
        result["changed_iteration_ops" if changed else "steady_iteration_ops"] = _ops(c)
    return result


def _ops(c) -> dict:
    """What a counter saw, by kind and name."""
    return {"device_aten": dict(c.device_ops.most_common()), "triton": dict(c.triton.most_common()),
            "transfers": dict(c.transfers), "host_aten": dict(c.host_ops.most_common()), "syncs": dict(c.syncs)}


def _summary(counts):
    return {key: {"mean": sum(c[key] for c in counts) / len(counts), "max": max(c[key] for c in counts)}
            for key in counts[0]}


def _split(ops: dict) -> str:
    """'device ops (ATen + Triton + transfers)' of one count."""
    return f"{ops['device_ops']:.0f} ({ops['aten']:.0f} + {ops['triton']:.0f} + {ops['transfers']:.0f})"


def markdown(report) -> str:
    """The table of a report (``main`` writes it; ``--markdown-only`` rewrites it from the JSON)."""
    cfg, info = report["config"], report["info"]
    plain = report["plain"]["device_ops"]["mean"]
    lines = ["# Device operations per scoring call and per iteration", "",
             f"Counted on CPU ({info['machine']}; torch {info['torch']}, triton {info['triton']} interpreter; "
             f"{info['date_utc']}; command `{info['command']}`) for a {cfg['net']} (width {cfg['width']}, "
             f"{cfg['size']}x{cfg['size']}, batch {cfg['batch']}; counts do not depend on these), Adadelta with "
             f"foreach=True, {cfg['steps']} iterations counted after {cfg['warmup']} warm-up ones.", "",
             "**Device ops** are what a GPU would run (`benchmarks/op_counter.py`): ATen operations that launch "
             "work (views and allocations excluded) with at least one input on the device, Triton launches, and "
             "transfers (`host.read`: one copy to the host; `host.upload`: one packed copy to the device; a new "
             "pointer table of the fused optimizer; a `.to(device)` of a host copy). **Host ops** are ATen "
             "operations whose inputs are all host copies: the best state that the convergence read brings to "
             "the host and what `StateView` derives from it, the random keys drawn from the CPU generator, "
             "torch's CPU step counters; an operation that mixes a host copy with a device tensor counts as a "
             "device op. A *changed* iteration is one whose best state changed: it derives and uploads the new "
             "state's masks. Syncs: host synchronisations (`host.read`, and `.item()`, `bool()`, ... on a device "
             "value).", "",
             f"Plain training iteration: **{plain:.0f}** device ops ({report['plain']['aten']['mean']:.0f} ATen + "
             f"{report['plain']['triton']['mean']:.0f} Triton + {report['plain']['transfers']['mean']:.0f} "
             f"transfers), {report['plain']['host_ops']['mean']:.0f} host op (torch's CPU step counters), "
             f"{report['plain']['syncs']['mean']:.0f} syncs. Each column shows the worst counted iteration of its "
             "kind; \"(none counted)\": no counted iteration changed the best state. On CPU every triton iteration "
             "counts one transfer for the fused optimizer's pointer table, which is rebuilt because the CPU "
             "allocator gives the gradients new addresses each step (CUDA's caching allocator usually gives the "
             "same ones, and the cached table is reused).",
             "",
             "| backend | S | scoring call: device ops (ATen + Triton + transfers) | steady iteration: device ops | "
             "× plain | changed iteration: device ops | × plain | host ops per iteration (steady, changed) | "
             "syncs per iteration |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        steady = [c for c, changed in zip(row["iteration"], row["changed"]) if not changed]
        moved = [c for c, changed in zip(row["iteration"], row["changed"]) if changed]
        cells = []
        for counts in (steady, moved):
            if counts:
                worst = max(counts, key=lambda c: c["device_ops"])
                cells += [_split(worst), f"{worst['device_ops'] / plain:.2f}"]
            else:
                cells += ["(none counted)", "-"]
        host_ops = ", ".join(f"{max(c['host_ops'] for c in counts):.0f}" if counts else "-"
                             for counts in (steady, moved))
        syncs = max(c["syncs"] for c in row["iteration"])
        lines.append(f"| {row['backend']} | {row['members']} | {_split(row['scoring'])} | {cells[0]} | {cells[1]} "
                     f"| {cells[2]} | {cells[3]} | {host_ops} | {syncs:.0f} |")
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
            result.update(backend=backend, members=members)
            rows.append(result)
            print(backend, members, result["scoring"], result["iteration"], result["changed"], flush=True)
            report = {"config": config, "info": info, "plain": plain, "rows": rows}
            with open(stem + ".json", "w") as f:  # rewritten after every row: a long run leaves what it counted
                json.dump(report, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(markdown(report))
    print(markdown(report))

if __name__ == "__main__":
    main()
