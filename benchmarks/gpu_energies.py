"""GPU benchmark of population scoring (``energies``): reference loop, batched PyTorch, compact PyTorch, Triton.

One run measures the device's ceilings (device-to-device copy bandwidth from a large clone; fp32, tf32 and bf16
matmul rates from large ``torch.matmul``) and then times every scoring path on the same states, so results are
reported as fractions of measured ceilings and as ratios between paths of the same run. Work is counted on kept
channels only (per member: the sum over Conv/Linear layers of 2·B·H_out·W_out·k_in·k_out·kh·kw with that
member's actual kept counts): the useful work of a member, whatever a path really executes. Every path's
energies are compared with the reference path's in the same precision mode. Nothing is estimated or made up:
the script reports only what it measured.

    python benchmarks/gpu_energies.py                      # on a CUDA machine: full grid, writes results/
    TRITON_INTERPRET=1 python benchmarks/gpu_energies.py --smoke   # CPU: tiny sizes, proves the script runs

Precision modes: "tf32" (float32 model, TF32 allowed in cuBLAS/cuDNN and in the Triton kernels) and "bf16"
(``torch.autocast`` bfloat16 around every path). On CUDA, times are ``triton.testing.do_bench`` medians; on CPU
(smoke only) wall-clock medians of ``time.perf_counter``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

from edropout.backends import BACKENDS, make_backend
from edropout.energy import margin_energy
from edropout.app.models import build_model
from edropout.units import discover_units

PATHS = ("reference", "batched", "compact", "triton")
MODES = ("tf32", "bf16")
FULL = {"members": (8, 32, 64), "keep": (1.0, 0.75, 0.5, 0.25), "batch": 128,
        "models": {"resnet18": dict(name="resnet18", in_channels=3, input_size=32, width=64),
                   "mlp": dict(name="mlp", in_channels=1, input_size=28, width=256)}}
SMOKE = {"members": (4,), "keep": (0.5,), "batch": 4,
         "models": {"resnet18": dict(name="resnet18", in_channels=3, input_size=8, width=4),
                    "mlp": dict(name="mlp", in_channels=1, input_size=8, width=16)}}
PATH_NOTES = {
    "reference": "one masked PyTorch forward per member (dense work)",
    "batched": "one masked PyTorch forward of S·B rows (dense work)",
    "compact": "edropout backend 'compact': per-member gathered weights through cuBLAS/cuDNN",
    "triton": "edropout backend 'triton': kept-channel Triton kernels; bf16 inputs supported by every kernel "
              "(conv, linear, batchnorm, energy)",
}


# ----- timing and ceilings ------------------------------------------------------------------------------------
def timer(device):
    """``fn -> median ms``: do_bench on CUDA; perf_counter on CPU (smoke runs only)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=50, rep=200, return_mode="median"))

    def wall(fn, reps=2):  # callers warm up first; the interpreter is too slow for more repetitions
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall


def set_precision(mode: str) -> None:
    """"fp32": exact float32 everywhere; "tf32" (and "bf16", for its float32 parts): TF32 allowed everywhere."""
    tf32 = mode != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def measure_ceilings(device, time_ms, smoke: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) of a large clone and matmul TFLOP/s in fp32, tf32 and bf16."""
    copy_bytes = (64 if smoke else 2048) * 2 ** 20
    src = torch.empty(copy_bytes // 4, device=device)
    src.clone()  # warm-up (do_bench warms up by itself; the CPU timer does not)
    copy_ms = time_ms(lambda: src.clone())
    out = {"copy_bytes": copy_bytes, "copy_GBps": 2 * copy_bytes / copy_ms / 1e6}
    del src
    n = 512 if smoke else 8192
    for mode, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16)):
        set_precision(mode)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        out[f"matmul_{mode}_TFLOPs"] = 2 * n ** 3 / time_ms(lambda: torch.matmul(a, b)) / 1e9
    out["matmul_n"] = n
    set_precision("tf32")
    return out


# ----- workload ---------------------------------------------------------------------------------------------
def make_states(units, members: int, keep: float, seed: int = 0) -> torch.Tensor:
    """Bernoulli(keep) per unit, at least one unit kept per group (a state that prunes a whole group makes the
    logits input-independent, which no one scores in practice); keep = 1 gives all-kept states."""
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(members, units.num_units, generator=g) < keep
    for group in units.groups:
        bits = states[:, group.first_bit:group.first_bit + group.size]
        bits[~bits.any(dim=1), 0] = True
    return states


def layer_shapes(model, x) -> list:
    """(name, module, rows per sample-batch, kernel taps) of every Conv2d/Linear in one forward on ``x``."""
    found = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            rows, taps = output.shape[0] * output.shape[2] * output.shape[3], module.weight[0, 0].numel()
        else:
            rows, taps = output.numel() // output.shape[-1], 1
        found.append((names[module], module, rows, taps))

    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found


def kept_flops(units, shapes, states) -> torch.Tensor:
    """FLOPs [S] on kept channels: sum over layers of 2·rows·k_in·k_out·taps with each member's kept counts."""
    ext = units.extended(states.cpu()).double()
    axes = {pa.name: pa.axes for pa in units.param_axes}
    total = torch.zeros(states.shape[0], dtype=torch.float64)
    for name, module, rows, taps in shapes:
        weight_axes = axes.get(f"{name}.weight", {})
        c_out, c_in = module.weight.shape[0], module.weight.shape[1]
        k_in = ext[:, weight_axes[1]].sum(1) if 1 in weight_axes else torch.full_like(total, c_in)
        k_out = ext[:, weight_axes[0]].sum(1) if 0 in weight_axes else torch.full_like(total, c_out)
        total += 2.0 * rows * k_in * k_out * taps
    return total


# ----- one measurement --------------------------------------------------------------------------------------
def score_fn(path, model, units, states, x, y, mode):
    """A no-argument call scoring ``states`` with ``path`` in precision ``mode``."""
    backend = make_backend(path).bind(model, units, margin_energy)

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            return backend.score(states, x, y)

    return run


def compact_note(model, units, x) -> str:
    """Whether the compact backend really ran its compact interpreter on this model."""
    ran = make_backend("compact").bind(model, units, margin_energy).runs_compact(x)
    return "" if ran else "compact backend fell back to batched for this model"


def bench_model(key, spec, cfg, device, time_ms, ceilings, paths) -> list:
    """Rows of results for one model over the (mode, S, k, path) grid."""
    torch.manual_seed(0)
    model = build_model(spec["name"], spec["in_channels"], spec["input_size"], 10, spec["width"]).to(device)
    g = torch.Generator().manual_seed(1)
    shape = (cfg["batch"], spec["in_channels"], spec["input_size"], spec["input_size"])
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g).to(device)
    units = discover_units(model, x[:2])
    shapes = layer_shapes(model, x)
    rows = []
    for mode in MODES:
        set_precision(mode)
        ceiling = ceilings[f"matmul_{mode}_TFLOPs"]
        for members in cfg["members"]:
            for keep in cfg["keep"]:
                states = make_states(units, members, keep).to(device)
                flops = float(kept_flops(units, shapes, states).sum())
                reference = None
                for path in paths:
                    fn = score_fn(path, model, units, states, x, y, mode)
                    energies = fn().float()  # also compiles kernels and builds plans before timing
                    reference = energies if path == "reference" else reference
                    ms = time_ms(fn)
                    note = compact_note(model, units, x) if path == "compact" else ""
                    rows.append({
                        "model": key, "mode": mode, "members": members, "keep_target": keep,
                        "keep_actual": round(float(states.float().mean()), 4), "batch": cfg["batch"], "path": path,
                        "ms": ms, "member_evals_per_s": members / ms * 1e3,
                        "kept_TFLOPs": flops / ms / 1e9, "kept_GFLOP": flops / 1e9,
                        "fraction_of_matmul_ceiling": flops / ms / 1e9 / ceiling,
                        "max_abs_energy_diff_vs_reference":
                            None if reference is None else float((energies - reference).abs().max()),
                        "note": note})
                    print(_row_line(rows[-1]), flush=True)
    return rows


# ----- reporting --------------------------------------------------------------------------------------------
def device_info(device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        " ".join(filter(None, ["CPU", platform.processor()]))
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def slug(info) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    return base + ("-interpreter" if info["interpreter"] else "")


def _row_line(r) -> str:
    diff = r["max_abs_energy_diff_vs_reference"]
    return (f"| {r['model']} | {r['mode']} | {r['members']} | {r['keep_target']:.2f} ({r['keep_actual']:.2f}) "
            f"| {r['path']} | {r['ms']:.4g} | {r['member_evals_per_s']:.4g} | {r['kept_TFLOPs']:.4g} "
            f"| {100 * r['fraction_of_matmul_ceiling']:.1f}% | {r.get('speedup_vs_batched', float('nan')):.2f} "
            f"| {'-' if diff is None else f'{diff:.2e}'} | {r['note']} |")


def add_speedups(rows) -> None:
    """Each row's speed-up over the batched PyTorch path of the same (model, mode, S, k)."""
    batched = {(r["model"], r["mode"], r["members"], r["keep_target"]): r["ms"] for r in rows if r["path"] == "batched"}
    for r in rows:
        base = batched.get((r["model"], r["mode"], r["members"], r["keep_target"]))
        r["speedup_vs_batched"] = base / r["ms"] if base else float("nan")


def markdown(info, ceilings, rows, smoke) -> str:
    lines = [f"# Population scoring (`energies`) on {info['device']}", "",
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, {info['date_utc']}"
             + (" — **smoke run (tiny sizes, Triton interpreter on CPU): not a performance result**" if smoke else ""),
             "", f"Command: `{info['command']}`", "",
             "## Measured ceilings", "",
             f"- device-to-device copy (clone of {ceilings['copy_bytes'] / 2 ** 20:.0f} MiB, read + write): "
             f"{ceilings['copy_GBps']:.1f} GB/s",
             *(f"- matmul {m} ({ceilings['matmul_n']}³): {ceilings[f'matmul_{m}_TFLOPs']:.4g} TFLOP/s"
               for m in ("fp32", "tf32", "bf16")),
             *(["- (on CPU the TF32 switches do nothing: tf32 mode is float32)"] if info["cuda"] is None else []),
             "", "## Scoring (train-mode scoring: per-member batch statistics; margin energy)", "",
             "Kept TFLOP/s counts only kept-channel work (2·B·H·W·k_in·k_out·kh·kw per member); % of ceiling is "
             "against the measured matmul rate of the same precision (tf32 or bf16). k: target (actual kept share "
             "of units). ΔE: max |energy − reference energy| in the same precision mode.", "",
             "| model | mode | S | k | path | ms | member-evals/s | kept TFLOP/s | % ceiling | × batched | ΔE | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_line(r) for r in rows]
    lines += ["", "Paths:", *(f"- {p}: {n}" for p, n in PATH_NOTES.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one S and one k (CPU interpreter ok)")
    parser.add_argument("--out-dir", help="where to write the .json and .md (default benchmarks/results, "
                                          "or a temporary directory for --smoke)")
    parser.add_argument("--models", nargs="+", choices=tuple(FULL["models"]), help="subset of models")
    parser.add_argument("--members", nargs="+", type=int, help="override the S values")
    parser.add_argument("--keep", nargs="+", type=float, help="override the kept fractions")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="subset of paths")
    parser.add_argument("--tag", default="", help="suffix of the output file names, for runs split by --models "
                                                   "or --members")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    cfg["members"] = tuple(args.members or cfg["members"])
    cfg["keep"] = tuple(args.keep or cfg["keep"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: the full benchmark needs a GPU; use --smoke (with TRITON_INTERPRET=1) on CPU")
    paths = [p for p in args.paths if p in BACKENDS]
    missing = sorted(set(args.paths) - set(paths))
    time_ms = timer(device)
    ceilings = measure_ceilings(device, time_ms, args.smoke)
    print(json.dumps(ceilings, indent=1), flush=True)
    rows = []
    for key in args.models or tuple(cfg["models"]):
        rows += bench_model(key, cfg["models"][key], cfg, device, time_ms, ceilings, paths)
    add_speedups(rows)
    info = device_info(device)
    info["paths_missing_from_this_checkout"] = missing
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="gpu_energies_smoke_") if args.smoke else
                               os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"gpu_energies_{slug(info)}" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"info": info, "config": {k: v for k, v in cfg.items()}, "ceilings": ceilings, "rows": rows,
                   "paths": PATH_NOTES, "smoke": args.smoke}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(info, ceilings, rows, args.smoke))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
