"""The Fashion-MNIST accuracy benchmark end to end on one tiny epoch (the real table is a benchmark, not a test)."""
import importlib.util
import json
import os

from idx_files import write_fashion_like

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accuracy_fashion_mnist.py")


def test_accuracy_benchmark_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_fashion_mnist", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = {"data": "fashion-mnist", "train_images": 256, "test_images": 128, "epochs": 1, "batch_size": 64,
              "optimizer": "adadelta", "population_size": 4, "energy": "margin", "patience": 1,
              "min_iterations_fraction": 0.5, "networks": {"resnet18": 4, "alexnet": 4, "squeezenet": 4},
              "seeds": [0]}
    config["data_dir"] = str(write_fashion_like(tmp_path, n_train=256, n_test=128))  # read through the real loader
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(config))
    table = bench.main(["--config", str(path), "--out", str(tmp_path), "--device", "cpu"])
    saved = json.loads((tmp_path / "accuracy_smoke.json").read_text())
    assert set(saved["table"]) == {"resnet18", "alexnet", "squeezenet"}
    for net, row in table.items():
        # L1 pruning is matched to EDropout's share of parameters removed
        assert abs(row["l1"]["params_removed"][0] - row["edropout"]["params_removed"][0]) < 5
        assert row["dense"]["params_removed"][0] == 0
    for name in ("accuracy_smoke.md", "accuracy_smoke_accuracy_vs_params.png", "accuracy_smoke_resnet18_energy.png",
                 "accuracy_smoke_resnet18_pruning.png"):
        assert (tmp_path / name).stat().st_size > 0
