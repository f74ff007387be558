"""The main job's report (``report.json``, plots of energy and pruning rate per iteration) and the run metadata
that the benchmarks' tables state (machine, torch version, date)."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_description(device) -> str:
    """The accelerator's name (or the CPU's model name) and the CPU core count, for benchmark tables."""
    import torch

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return f"{name} ({os.cpu_count()} CPU cores)"


def benchmark_setup(argv, description: str, results_dir: str):
    """The shared command line of the config-driven benchmarks: (args, config, config name, device)."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=results_dir)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    name = os.path.splitext(os.path.basename(args.config))[0]
    return args, config, name, torch.device(args.device)


def run_metadata(config_name: str, device) -> dict:
    """What a benchmark table states about its run: config name, machine, torch version and date."""
    import torch

    return {"config": config_name, "machine": machine_description(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def write_json(report: dict, out_dir: str) -> str:
    """Write ``report.json`` (atomically) and return its path."""
    path = os.path.join(out_dir, "report.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def figure(path: str, figsize):
    """``(fig, ax)`` on matplotlib's file-only Agg backend; on exit laid out, saved to ``path`` at 120 dpi and
    closed (closed on errors too, so a failing plot leaks no figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_history(history: list, out_dir: str, converged_at=None, prefix: str = "", energy: str = "margin") -> list:
    """``energy.png`` (best and mean stored ``energy`` per iteration) and ``pruning.png`` (share of parameters
    removed, on a fixed 0–100 % axis so that noise does not look like swings), each with a title."""
    it = [h["iteration"] for h in history]
    paths = []
    for name, title, series, ylabel in (
            ("energy.png", f"EDropout: {energy} energy of the population",
             (("best energy", "best_energy"), ("mean energy", "mean_energy")), f"{energy} energy"),
            ("pruning.png", "EDropout: parameters removed by the best state",
             (("parameters removed (%)", "pruning_rate"),), "% of parameters removed")):
        path = os.path.join(out_dir, prefix + name)
        with figure(path, (6, 3.5)) as (fig, ax):
            for label, key in series:
                scale = 100.0 if key == "pruning_rate" else 1.0
                ax.plot(it, [scale * h[key] for h in history], label=label)
            if converged_at:
                ax.axvline(converged_at, color="grey", linestyle="--", label="state frozen")
            if name == "pruning.png":
                ax.set_ylim(0, 100)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
            ax.legend()
        paths.append(path)
    return paths
