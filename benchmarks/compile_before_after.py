"""Before/after table of issue 15's kernel fixes, from two compile reports (``gpu_compile_report.py``).

For each variant of the "before" report on one target, the kernel that did the main work (the GEMM for conv and
linear variants) before and after: registers, spill bytes, main-loop instructions, tensor-core instructions and
async copies in the loop, bytes per lane of its global loads, whether it is pipelined; plus the launches per
variant (the fixes add two gather launches to each GEMM), and the share of wasted N-tile columns at k = 0.5.

    python benchmarks/compile_before_after.py    # reads results/gpu_compile_report{_before,}.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAIN = ("_population_gemm_kernel", "_population_linear_kernel", "_population_conv2d_kernel",
        "_population_batchnorm_kernel", "_population_energies_kernel", "_masked_step_kernel")


def _main_rows(report, arch):
    """{variant: (main kernel row, launches)}, counting kernels reported under other variants' names too."""
    by_variant = {}
    for row in report["rows"]:
        if row["arch"] != arch or row.get("error"):
            continue
        for name in [row["variant"]] + row.get("also_launched_by", []):
            by_variant.setdefault(name, []).append(row)
    out = {}
    for name, rows in by_variant.items():
        main = [r for r in rows if r["kernel"] in MAIN]
        if main:
            out[name] = (main[0], len(rows))
    return out


def wasted_columns(n_outputs: int, block_n: int, keep: float = 0.5, samples: int = 20000) -> float:
    """Expected share of computed output columns that are pruned when each member keeps Binomial(O, k) outputs
    and a member computes whole BLOCK_N tiles up to its kept count."""
    g = torch.Generator().manual_seed(0)
    kept = (torch.rand(samples, n_outputs, generator=g) < keep).sum(1).clamp(min=1).double()
    tiles = torch.ceil(kept / block_n) * block_n
    return float(1 - kept.sum() / tiles.sum())


def _cell(row, launches):
    loop = row.get("main_loop") or {}
    mma = f"{loop.get('mma', 0)} MMA" if loop.get("mma") else (f"{loop.get('ffma', 0)} FFMA" if loop else "-")
    widths = "/".join(str(w) for w in loop.get("load_bytes_per_lane", [])) or "-"
    spill = (row.get("spill_store_bytes") or 0) + (row.get("spill_load_bytes") or 0)
    return (f"{row['registers']} | {spill} | {loop.get('instructions', '-')} | {mma}, "
            f"{loop.get('async_copies', 0)} async | {widths} | {row['pipelined']} | {launches}")


def markdown(before, after, arch) -> str:
    b, a = _main_rows(before, arch), _main_rows(after, arch)
    lines = [f"# Kernel fixes of issue 15: before / after (sm_{arch}, compiled on CPU)", "",
             f"Before: `{before['info']['command']}` ({before['info']['date_utc']}, triton {before['info']['triton']});"
             f" after: `{after['info']['command']}` ({after['info']['date_utc']}, triton {after['info']['triton']}). "
             "Per variant the main kernel (the GEMM of a conv or linear layer): registers, spill bytes (stores + "
             "loads), main-loop instructions, tensor-core (MMA) or FFMA instructions and async copies in the loop, "
             "bytes per lane of its global loads, pipelined, and kernel launches of the variant (after: two "
             "gathers + the GEMM). No GPU timing exists: these are properties of the compiled code.", "",
             "| variant | before: regs | spill B | loop instrs | loop | B/lane | pipelined | launches "
             "| after: regs | spill B | loop instrs | loop | B/lane | pipelined | launches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (row, n) in b.items():
        if name not in a:
            continue
        lines.append(f"| {name} | {_cell(row, n)} | {_cell(*a[name])} |")
    lines += ["", "Wasted N-tile columns at k = 0.5 (expected share of computed output columns that are pruned; "
              "BLOCK_N before = next power of two of O in [16, 64], after = `default_tiles`):", "",
              "| outputs O | BLOCK_N before | wasted | BLOCK_N after | wasted |", "|---|---|---|---|---|"]
    from edropout_kernels._population_gemm import default_tiles

    for o in (64, 128, 256, 512):
        old = max(16, min(64, 1 << (o - 1).bit_length()))
        new = default_tiles(4096, o, 64, torch.float32)[1]
        lines.append(f"| {o} | {old} | {100 * wasted_columns(o, old):.0f} % | {new} | "
                     f"{100 * wasted_columns(o, new):.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=os.path.join(RESULTS, "gpu_compile_report_before.json"))
    parser.add_argument("--after", default=os.path.join(RESULTS, "gpu_compile_report.json"))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", default=os.path.join(RESULTS, "gpu_compile_before_after.md"))
    args = parser.parse_args(argv)
    with open(args.before) as f:
        before = json.load(f)
    with open(args.after) as f:
        after = json.load(f)
    text = markdown(before, after, args.arch)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
