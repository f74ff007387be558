"""The pruning-curves benchmark end to end on one tiny epoch (the real curves are a benchmark, not a test)."""
import importlib.util
import json
import os

from idx_files import write_fashion_like

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "pruning_curves.py")
FRACTIONS = [round(0.1 * i, 1) for i in range(10)]


def _bench():
    spec = importlib.util.spec_from_file_location("pruning_curves", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pruning_curves_benchmark_runs_end_to_end(tmp_path):
    bench = _bench()
    config = {"data": "fashion-mnist", "train_images": 128, "test_images": 64, "net": "alexnet", "width": 4,
              "epochs": 1, "batch_size": 64, "optimizer": "adadelta", "fractions": FRACTIONS, "seeds": [0],
              "threads": 1,
              "methods": {"batch_bridgeout": {"p": 0.3, "q": 1.5, "tau": 0.75},
                          "dropout": {"p": 0.3}, "weight_decay": {"weight_decay": 5e-4},
                          "edropout": {"population_size": 4, "energy": "margin", "patience": 1,
                                       "min_iterations_fraction": 0.5}}}
    config["data_dir"] = str(write_fashion_like(tmp_path, n_train=128, n_test=64))  # read through the real loader
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(config))
    table = bench.main(["--config", str(path), "--out", str(tmp_path), "--device", "cpu"])
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"pruning_curves_smoke{suffix}").stat().st_size > 0

    saved = json.loads((tmp_path / "pruning_curves_smoke.json").read_text())
    assert saved["meta"]["config"] == "smoke" and saved["meta"]["torch"]
    curves = saved["table"]["curves"]
    assert set(curves) == {"batch_bridgeout", "dropout", "weight_decay"}
    for method, curve in curves.items():
        points = curve["points"]
        assert [p["fraction"] for p in points] == FRACTIONS
        removed = [p["filters_removed"][0] for p in points]
        assert removed[0] == 0 and removed == sorted(removed) and removed[-1] > 50  # physically removed
        assert all(0 <= p["top1"][0] <= 100 for p in points)
        # same architecture, same shares removed whichever way the net was trained
        assert removed == [p["filters_removed"][0] for p in curves["dropout"]["points"]]
    point = table["edropout"]
    assert 0 <= point["filters_removed"][0] < 100 and 0 <= point["top1"][0] <= 100

    # the table: 10 fraction rows x 3 curve columns, then one EDropout row
    lines = (tmp_path / "pruning_curves_smoke.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| f |"))
    rows = [line for line in lines[header + 2:header + 12]]
    assert [float(r.split("|")[1]) for r in rows] == FRACTIONS
    assert all(len(r.strip("|").split("|")) == 6 for r in rows)  # f, filters, params, 3 methods
    assert lines[header + 12] == ""
    assert sum(line.startswith("| EDropout (P) |") for line in lines) == 2  # its point and its training time
