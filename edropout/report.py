"""The main job's report: ``report.json`` and the plots of energy and pruning rate per iteration."""
from __future__ import annotations

import json
import os


def write_json(report: dict, out_dir: str) -> str:
    """Write ``report.json`` (atomically) and return its path."""
    path = os.path.join(out_dir, "report.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    return path


def plot_history(history: list, out_dir: str, converged_at=None, prefix: str = "") -> list:
    """``energy.png`` (best and mean stored energy) and ``pruning.png`` (pruning rate) per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    paths = []
    for name, series, ylabel in (
            ("energy.png", (("best energy", "best_energy"), ("mean energy", "mean_energy")), "energy"),
            ("pruning.png", (("parameters removed (%)", "pruning_rate"),), "% of parameters removed")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, key in series:
            scale = 100.0 if key == "pruning_rate" else 1.0
            ax.plot(it, [scale * h[key] for h in history], label=label)
        if converged_at:
            ax.axvline(converged_at, color="grey", linestyle="--", label="state frozen")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, prefix + name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
