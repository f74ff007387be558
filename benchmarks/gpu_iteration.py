"""GPU benchmark of the accelerated iteration (issue 4): fused masked update bandwidth, one-launch evolution,
and the overhead of one EDropout iteration over one plain training iteration, in one run.

    PYTHONPATH=. python benchmarks/gpu_iteration.py              # on a GPU: writes benchmarks/results/
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_iteration.py --smoke   # CPU: proves it runs

Every figure is measured in this run; ratios are against the PyTorch paths timed in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from edropout import EDropout
from edropout.masked_update import masked_step
from edropout.state_view import StateView
from edropout.app.models import build_model


def bench(fn, device) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench on CUDA, a wall-clock median elsewhere)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def copy_bandwidth(device, numel) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write of a large buffer)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _setup(device, width, size, k, seed=0):
    model = build_model("resnet18", 3, size, 10, width).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    pruner = EDropout(model, x, population_size=4, init_keep=k, seed=seed)
    state = torch.rand(pruner.num_units, generator=torch.Generator().manual_seed(seed)) < k
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, pruner, state


UPDATE_TRAFFIC = {"sgd": 5, "adam": 7, "adadelta": 7}  # float32 reads + writes per kept element


def update_bandwidth(device, width, size, k):
    """Fused masked update vs torch.optim (foreach, fused) followed by the reference masking."""
    rows = []
    makers = {"sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw),
              "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4, **kw),
              "adadelta": lambda p, **kw: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5,
                                                                **kw)}
    from edropout_kernels.masked_optimizer import fused_masked_step

    for name, make in makers.items():
        model, pruner, state = _setup(device, width, size, k)
        view = StateView(model, pruner.units, state)
        masks, rc = view.parameter_keeps, view.row_col_keeps
        kept = sum(int(masks[p].expand_as(p).sum()) if p in masks else p.numel() for p in model.parameters())
        need = UPDATE_TRAFFIC[name] * 4 * kept
        timings = {}
        opt = make(model.parameters())
        timings["triton_fused"] = bench(lambda: fused_masked_step(opt, rc), device)
        opt = make(model.parameters(), foreach=True)
        timings["torch_foreach_masked"] = bench(lambda: masked_step(opt, masks), device)
        if device.type == "cuda" and name != "adadelta":
            opt = make(model.parameters(), fused=True)
            timings["torch_fused_masked"] = bench(lambda: masked_step(opt, masks), device)
        for path, ms in timings.items():
            rows.append({"optimizer": name, "path": path, "ms": ms, "bytes_needed": need,
                         "GB_per_s": need / (ms * 1e-3) / 1e9})
    return rows


def evolution_time(device, size, units):
    """One-launch children and one-launch selection for a population of ``size`` × ``units`` bits."""
    from edropout_kernels.evolution import make_children, select_and_best

    pop = torch.rand(size, units, device=device) < 0.5
    energies = torch.rand(size, device=device)
    child_e = torch.rand(size, device=device)
    step = [0]

    def one():
        step[0] += 1
        children = make_children(pop, 0.9, 0.9, seed=0, step=step[0])
        select_and_best(pop, energies.clone(), children, child_e)

    torch_pop = pop.cpu() if device.type != "cuda" else pop
    from edropout import evolution as evo

    g = torch.Generator().manual_seed(0)

    def reference():
        draws = evo.draw_randoms(size, units, g)
        children = evo.make_children(torch_pop, draws, 0.9, 0.9)
        evo.select(torch_pop, energies.to(torch_pop.device), children, child_e.to(torch_pop.device))

    return {"S": size, "D": units, "triton_ms": bench(one, device), "torch_ms": bench(reference, device)}


def iteration_overhead(device, width, size, batch, populations, k, backends):
    """EDropout iteration vs a plain training iteration of the same model and batch; converged vs dense."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = build_model("resnet18", 3, size, 10, width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain_ms = bench(plain, device)
    rows = []
    for backend in backends:
        for s in populations:
            m = build_model("resnet18", 3, size, 10, width).to(device)
            o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            pruner = EDropout(m, x[:2], population_size=s, init_keep=k, backend=backend, min_iterations=10 ** 9)
            ms = bench(lambda: pruner.step(x, y, o), device)
            rows.append({"backend": backend, "S": s, "k": k, "ms": ms, "plain_ms": plain_ms,
                         "overhead": ms / plain_ms, "floor": 1 + s * k * k / 3})
            pruner.finalize()
            converged_ms = bench(lambda: pruner.step(x, y, o), device)
            rows.append({"backend": backend, "S": s, "k": k, "converged": True, "ms": converged_ms,
                         "plain_ms": plain_ms, "ratio_to_plain": converged_ms / plain_ms,
                         "pruning_rate": pruner.pruning_rate})
    return rows


def markdown(result) -> str:
    meta = result["meta"]
    lines = [f"# EDropout iteration on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; copy bandwidth "
             f"{result['copy_GB_per_s']:.0f} GB/s.", "", "## Masked optimizer update (ResNet-18-style, k = "
             f"{meta['k']})", "", "| optimizer | path | ms | GB/s needed | % of copy bandwidth |", "|---|---|---|---|---|"]
    for r in result["update"]:
        lines.append(f"| {r['optimizer']} | {r['path']} | {r['ms']:.3f} | {r['GB_per_s']:.0f} | "
                     f"{100 * r['GB_per_s'] / result['copy_GB_per_s']:.0f}% |")
    e = result["evolution"]
    lines += ["", f"## Evolution step, S = {e['S']}, D = {e['D']}", "",
              f"Triton (children + selection, two launches): {1e3 * e['triton_ms']:.1f} µs; PyTorch operators: "
              f"{1e3 * e['torch_ms']:.1f} µs.", "", "## Iteration overhead over plain training", "",
              "| backend | S | k | EDropout ms | plain ms | ratio | floor 1 + S·k²/3 |", "|---|---|---|---|---|---|---|"]
    for r in result["iteration"]:
        if r.get("converged"):
            lines.append(f"| {r['backend']} (converged, {100 * r['pruning_rate']:.0f}% removed) | {r['S']} | "
                         f"{r['k']} | {r['ms']:.2f} | {r['plain_ms']:.2f} | {r['ratio_to_plain']:.2f} | < 1 wanted |")
        else:
            lines.append(f"| {r['backend']} | {r['S']} | {r['k']} | {r['ms']:.2f} | {r['plain_ms']:.2f} | "
                         f"{r['overhead']:.2f} | {r['floor']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to prove the script runs on CPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.smoke:
        width, size, batch, pops, numel, evo_shape, backends = 4, 8, 8, (4,), 1 << 16, (8, 600), ("batched",)
    else:
        width, size, batch, pops, numel, evo_shape, backends = 64, 32, 128, (8, 32), 1 << 28, (64, 60000), \
            ("triton", "batched")
    k = 0.5
    import triton

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    result = {"meta": {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                       "date": datetime.date.today().isoformat(), "k": k, "smoke": args.smoke,
                       "precision": "fp32, TF32 allowed in every path"},
              "copy_GB_per_s": copy_bandwidth(device, numel),
              "update": update_bandwidth(device, width, size, k),
              "evolution": evolution_time(device, *evo_shape),
              "iteration": iteration_overhead(device, width, size, batch, pops, k, backends)}
    slug = "smoke" if args.smoke else device_name.lower().replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gpu_iteration_{slug}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
