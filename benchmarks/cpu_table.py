"""Run the CPU scoring benchmark (``test_bench_cpu``'s cases) and write ``results/cpu_energies.{json,md}``.

For every net, population size S and keep fraction k, the three backends are timed in interleaved rounds (so
that load from other jobs on the machine hits all of them alike) after one warm-up call each, which also checks
that batched and compact give the reference energies. Reported: median and min ms, speed-ups over the reference
loop (median / median), what ``backend="auto"`` picks and whether that was the faster of batched and compact.
A small calibration fit re-measures the two constants of the auto rule (``edropout/backends/auto.py``).

    python benchmarks/cpu_table.py [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_cpu import (BACKENDS, KEEPS, MEMBERS, NETS, THREADS, make_case, make_model,  # noqa: E402
                            rounds_for, score)

from edropout.backends import auto  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR = dict(net="resnet18", members=16, keep=0.5, speedup=2.0)  # compact vs the reference loop


def machine() -> dict:
    """CPU model, cores, torch version, date and load: enough to tell whether two tables are comparable."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "simd": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other",
            "torch": torch.__version__, "python": platform.python_version(), "threads": THREADS,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg_start": os.getloadavg()}


def time_case(case: dict, rounds_cap: int) -> tuple:
    """Warm-up (and correctness) call per backend, then interleaved timed rounds: {backend: [seconds]}, diffs."""
    times, out, warm = {b: [] for b in BACKENDS}, {}, {}
    for b in BACKENDS:
        start = time.perf_counter()
        out[b] = score(case, b)
        warm[b] = time.perf_counter() - start
    rounds = min(rounds_cap, rounds_for(max(warm.values())))
    for r in range(rounds):
        order = BACKENDS[r % len(BACKENDS):] + BACKENDS[:r % len(BACKENDS)]
        for b in order:
            start = time.perf_counter()
            score(case, b)
            times[b].append(time.perf_counter() - start)
    diffs = {b: float((out[b] - out["reference"]).abs().max()) for b in BACKENDS}
    return times, diffs


def grid(quick: bool) -> list:
    rows = []
    members = MEMBERS[:1] if quick else MEMBERS
    for net in NETS:
        for s in members:
            for keep in KEEPS:
                case = make_case(net, s, keep)
                times, diffs = time_case(case, 1 if quick else 3)
                med = {b: statistics.median(v) * 1e3 for b, v in times.items()}
                pick = auto.choose(case["model"], case["units"], case["states"], case["x"]).name
                work, rho, steps = auto.features(case["model"], case["units"], case["states"], case["x"])
                row = dict(net=net, members=s, keep=keep, batch=case["x"].shape[0], rounds=len(times["reference"]),
                           median_ms=med, min_ms={b: min(v) * 1e3 for b, v in times.items()},
                           speedup_vs_reference={b: med["reference"] / med[b] for b in BACKENDS},
                           max_abs_diff_vs_reference=diffs, auto_pick=pick,
                           auto_pick_was_faster=med[pick] <= min(med["batched"], med["compact"]),
                           work_macs=work, kept_mac_fraction=rho, compact_steps=steps)
                rows.append(row)
                print(f"{net:9s} S={s:2d} k={keep:4.2f}  " + "  ".join(
                    f"{b} {med[b]:8.1f} ms (x{row['speedup_vs_reference'][b]:4.2f})" for b in BACKENDS)
                    + f"  auto={pick}", flush=True)
    return rows


def _ratio_point(case: dict, rounds: int) -> dict:
    """compact time / batched time on one case, median over interleaved pairs, with the rule's features."""
    for b in ("batched", "compact"):
        score(case, b)
    ratios = []
    for r in range(rounds):
        pair = {}
        for b in (("batched", "compact") if r % 2 == 0 else ("compact", "batched")):
            start = time.perf_counter()
            score(case, b)
            pair[b] = time.perf_counter() - start
        ratios.append(pair["compact"] / pair["batched"])
    work, rho, steps = auto.features(case["model"], case["units"], case["states"], case["x"])
    return dict(batch=case["x"].shape[0], work_macs=work, kept_mac_fraction=rho, compact_steps=steps,
                compact_over_batched=statistics.median(ratios))


def calibrate(rows: list, batches=(2, 8, 32), rounds: int = 3) -> dict:
    """Fit the auto rule to measured time ratios q = compact / batched (ratios of interleaved runs cancel most of
    the load from other jobs). The cost model of ``auto.py`` gives q = ρ/r + (τ/r)·n/(B·M); a least-squares fit
    (relative error) of a = 1/r and b = τ/r on small-batch probes plus the grid's cases yields r and τ."""
    points = []
    for net in NETS:
        _, _, x, y = make_model(net)
        for batch in batches:
            for keep in KEEPS:
                case = dict(make_case(net, 8, keep), x=x[:batch], y=y[:batch])
                points.append(dict(net=net, members=8, keep=keep, **_ratio_point(case, rounds)))
    for r in rows:
        points.append(dict(net=r["net"], members=r["members"], keep=r["keep"], batch=r["batch"],
                           work_macs=r["work_macs"], kept_mac_fraction=r["kept_mac_fraction"],
                           compact_steps=r["compact_steps"],
                           compact_over_batched=r["median_ms"]["compact"] / r["median_ms"]["batched"]))
    q = torch.tensor([p["compact_over_batched"] for p in points], dtype=torch.float64)
    features = torch.tensor([[p["kept_mac_fraction"], p["compact_steps"] / p["work_macs"]] for p in points],
                            dtype=torch.float64)
    weights = 1.0 / q.unsqueeze(1)  # relative error: a 2× miss counts the same at q = 0.1 and q = 10
    a, b = torch.linalg.lstsq(features * weights, (q.unsqueeze(1) * weights)).solution.flatten().tolist()
    a, b = max(a, 1e-6), max(b, 0.0)
    ratio, step_macs = 1.0 / a, b / a
    agree = sum((p["kept_mac_fraction"] * a + b * p["compact_steps"] / p["work_macs"] < 1)
                == (p["compact_over_batched"] < 1) for p in points)
    return {"ratio": ratio, "step_macs": step_macs, "points": points, "fit_agrees_with_measurement": agree,
            "in_use": {"ratio": auto.MEASURED_RATIO, "step_macs": auto.MEASURED_STEP_MACS}}


def markdown(info: dict, rows: list, calib: dict) -> str:
    lines = ["# CPU population scoring: reference vs batched vs compact", "",
             f"{info['cpu']}, {info['usable_cores']} usable cores ({info['simd']}), {info['threads']} torch threads, "
             f"torch {info['torch']}, {info['date']}. Load average at start {info['loadavg_start'][0]:.2f}, "
             f"at end {info['loadavg_end'][0]:.2f} (the machine is shared: medians of interleaved rounds).", "",
             "Energies of S members on one batch of 128 28×28 grey images, train-mode scoring; "
             "speed-up = reference median / backend median. Every backend computes all S members (the compact "
             "backend's scoring of identical states once is off here; at k = 1 all members are the same state). "
             f"Whole run: {info['seconds']:.0f} s.", "",
             "| net | S | k | reference ms | batched ms | compact ms | batched × | compact × | auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, x = r["median_ms"], r["speedup_vs_reference"]
        lines.append(f"| {r['net']} | {r['members']} | {r['keep']} | {m['reference']:.1f} | {m['batched']:.1f} | "
                     f"{m['compact']:.1f} | {x['batched']:.2f} | {x['compact']:.2f} | {r['auto_pick']}"
                     f"{'' if r['auto_pick_was_faster'] else ' (slower)'} |")
    floor = next((r for r in rows if r["net"] == FLOOR["net"] and r["members"] == FLOOR["members"]
                  and r["keep"] == FLOOR["keep"]), None)
    if floor is not None:
        got = floor["speedup_vs_reference"]["compact"]
        lines += ["", f"Floor (compact ≥ {FLOOR['speedup']}× the reference loop on {FLOOR['net']} at S = "
                      f"{FLOOR['members']}, k = {FLOOR['keep']}): {got:.2f}× — "
                      f"{'holds' if got >= FLOOR['speedup'] else 'does NOT hold'}."]
    right = sum(r["auto_pick_was_faster"] for r in rows)
    lines += ["", f"auto picked the faster of batched/compact in {right} of {len(rows)} cases.",
              f"Auto-rule fit on this run ({len(calib['points'])} cases: the grid plus small-batch probes): "
              f"r = {calib['ratio']:.2f}, t/c = {calib['step_macs']:.3g} multiply-adds per step; the fitted rule "
              f"agrees with the measured winner in {calib['fit_agrees_with_measurement']} of "
              f"{len(calib['points'])} cases (constants in use: r = {calib['in_use']['ratio']}, "
              f"t/c = {calib['in_use']['step_macs']:.3g}).",
              f"Largest |energy difference| vs reference: batched "
              f"{max(r['max_abs_diff_vs_reference']['batched'] for r in rows):.2e}, compact "
              f"{max(r['max_abs_diff_vs_reference']['compact'] for r in rows):.2e}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="S = 8 only, one round: a smoke run")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only fit the auto rule (small-batch probes and batch 128 at S = 8), print it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    info = machine()
    if args.calibrate_only:
        calib = calibrate([], batches=(2, 8, 32, 128))
        for p in calib["points"]:
            print(p)
        print({k: v for k, v in calib.items() if k != "points"})
        return
    start = time.perf_counter()
    rows = grid(args.quick)
    calib = calibrate(rows)
    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_energies.json").write_text(json.dumps({"machine": info, "cases": rows, "auto_fit": calib},
                                                           indent=1))
    (args.out / "cpu_energies.md").write_text(markdown(info, rows, calib))
    print(markdown(info, rows, calib))


if __name__ == "__main__":
    main()
