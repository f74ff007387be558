"""The Fashion-MNIST accuracy benchmark end to end on a tiny configuration (the real table is a benchmark, not a
test): every method runs, done cells are skipped, and a cell killed mid-run resumes to the same result."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from idx_files import write_fashion_like

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")

CONFIG = {"data": "fashion-mnist", "validation_images": 96, "train_images": 256, "test_images": 128, "epochs": 2,
          "prune_epoch": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
          "edropout": {"population_size": 4, "energy": "margin", "patience": 1, "min_iterations_fraction": 0.5},
          "methods": {"dense": {"kind": "dense"}, "l1": {"kind": "l1", "share": 0.5},
                      "torch_pruning": {"kind": "torch_pruning", "share": 0.5},
                      "edropout_paper": {"kind": "edropout", "init_keep": 0.5, "lr": 0.02},
                      "edropout_target": {"kind": "edropout", "target": 0.5, "target_metric": "params"},
                      "edropout_future": {"kind": "edropout", "an_argument_edropout_lacks": 1}},
          "networks": {"resnet18": {"width": 4, "seeds": [0]},
                       "squeezenet": {"width": 4, "seeds": [0], "optimizer": "adadelta", "lr": 1.0,
                                      "edropout": {"energy": "cross_entropy"}}},
          "floors": [{"what": "top1", "net": "resnet18", "method": "dense", "at_least": 91}]}


def _load(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, config, cells="*:*:*"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    config = {**config, "data_dir": str(write_fashion_like(data_dir, n_train=400, n_test=128))}  # the real loader
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(config))
    bench = _load("accuracy_fashion_mnist")
    return bench.main(["--config", str(path), "--out", str(tmp_path / "out"), "--checkpoints",
                       str(tmp_path / "ckpt"), "--device", "cpu", "--cells", cells])


def test_accuracy_benchmark_runs_every_method_and_skips_done_cells(tmp_path):
    table = _run(tmp_path, CONFIG)
    out = tmp_path / "out"
    assert set(table) == {"resnet18", "squeezenet"}
    for net, row in table.items():
        assert set(row) == {"dense", "l1", "torch_pruning", "edropout_paper", "edropout_target"}
        assert abs(row["edropout_target"]["params_removed"][0] - 50) <= 2
        assert row["dense"]["params_removed"][0] == 0
        # both baselines are matched to the asked share of parameters removed (coarse at width 4)
        for method in ("l1", "torch_pruning"):
            assert abs(row[method]["params_removed"][0] - 50) < 8
        record = json.loads((out / "cells" / f"{net}_l1_s0.json").read_text())
        assert record["prune_epoch"] == 1 and len(record["val_curve"]) == 1
        # the exported size is counted independently of the benchmark's own arithmetic
        assert record["params"] == round(record["params_dense"] * (1 - record["params_removed"] / 100))
    # a method's own schedule setting applies to that method only
    assert json.loads((out / "cells" / "resnet18_edropout_paper_s0.json").read_text())["schedule"]["lr"] == 0.02
    assert json.loads((out / "cells" / "resnet18_l1_s0.json").read_text())["schedule"]["lr"] == 0.05
    # a network's own settings apply to every method of that network (a method's own still win)
    squeeze = json.loads((out / "cells" / "squeezenet_edropout_paper_s0.json").read_text())
    assert squeeze["settings"]["energy"] == "cross_entropy" and squeeze["schedule"]["optimizer"] == "adadelta"
    assert squeeze["schedule"]["lr"] == 0.02
    assert json.loads((out / "cells" / "squeezenet_dense_s0.json").read_text())["schedule"]["lr"] == 1.0
    assert json.loads((out / "cells" / "resnet18_edropout_paper_s0.json").read_text())["settings"]["energy"] == "margin"
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["cells"]["resnet18_edropout_future_s0"].startswith("waiting")
    assert "PARTIAL: 10 of 12 cells done" in (out / "smoke.md").read_text()
    for name in ("smoke_accuracy_vs_params.png", "smoke_resnet18_val_curves.png",
                 "smoke_resnet18_edropout_paper_energy.png"):
        assert (out / name).stat().st_size > 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    _run(tmp_path, CONFIG)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before
    # a cell done with other settings than the config now asks is listed as stale and left out of the table
    methods = {**CONFIG["methods"], "edropout_target": {**CONFIG["methods"]["edropout_target"], "lr_scale": 0.5},
               "edropout_paper": {**CONFIG["methods"]["edropout_paper"], "energy": "cross_entropy"}}
    table = _run(tmp_path, {**CONFIG, "methods": methods}, cells="none:none:0")
    assert "edropout_target" not in table["resnet18"] and "edropout_paper" not in table["resnet18"]
    assert set(table["squeezenet"]) == {"dense", "l1", "torch_pruning", "edropout_paper"}
    text = (out / "smoke.md").read_text()
    assert "| resnet18_edropout_target_s0 | stale: schedule lr 0.05 (config: 0.025);" in text
    assert "| resnet18_edropout_paper_s0 | stale: settings energy 'margin' (config: 'cross_entropy');" in text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["edropout_paper", "l1"])
def test_a_killed_cell_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method):
    config = {**CONFIG, "epochs": 3, "networks": {"squeezenet": {"width": 4, "seeds": [0]}}}
    cells = f"squeezenet:dense:0,squeezenet:{method}:0"
    whole = _run(tmp_path / "whole", config, cells)
    cells_module = sys.modules["accuracy_cells"]
    real = cells_module.atomic_save
    saves = []

    def save_then_die(obj, path):  # killed right after the first checkpoint of the cell under test
        real(obj, path)
        if os.path.basename(os.path.dirname(path)) == f"squeezenet_{method}_s0":
            saves.append(path)
            if len(saves) == 1:
                raise _Killed

    monkeypatch.setattr(cells_module, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        _run(tmp_path / "killed", config, cells)
    monkeypatch.setattr(cells_module, "atomic_save", real)
    resumed = _run(tmp_path / "killed", config, cells)
    for split in ("test", "val"):
        a = json.loads((tmp_path / "whole" / "out" / "cells" / f"squeezenet_{method}_s0.json").read_text())
        b = json.loads((tmp_path / "killed" / "out" / "cells" / f"squeezenet_{method}_s0.json").read_text())
        assert a[split] == b[split]
    assert a["val_curve"] == b["val_curve"] and len(b["epoch_seconds"]) == len(a["epoch_seconds"])
    assert whole["squeezenet"][method]["top1"] == resumed["squeezenet"][method]["top1"]
    final = torch.load(tmp_path / "killed" / "ckpt" / f"squeezenet_{method}_s0" / "checkpoint.pt",
                       weights_only=True)
    reference = torch.load(tmp_path / "whole" / "ckpt" / f"squeezenet_{method}_s0" / "checkpoint.pt",
                           weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, final["model"][name]), name


def test_accuracy_plot_takes_any_number_of_methods(tmp_path):
    # the 13-method ablation crashed the table rebuild: one marker per method ran out after 8
    methods = {f"m{i}": {"kind": "edropout", "label": f"method {i}"} for i in range(15)}
    table = {"resnet18": {m: {"params_removed": [50.0 + i, 0.0], "top1": [90.0 - i, 0.5]}
                          for i, m in enumerate(methods)}}
    path = tmp_path / "plot.png"
    _load("accuracy_table").plot_accuracy({"methods": methods}, table, str(path))
    assert path.stat().st_size > 0


def test_ablation_view_gives_each_change_against_the_reference():
    config = {"compare_to": "base", "networks": {"a": {"width": 8}, "b": {"width": 16}},
              "methods": {"base": {"label": "the base"}, "x": {"label": "change x"}, "y": {},
                          "z": {"networks": ["b"]}}}
    table = {"a": {"base": {"top1": (80.0, 0.0)}, "x": {"top1": (81.25, 0.5)}, "y": {"top1": (79.5, 0.0)}},
             "b": {"base": {"top1": (70.0, 0.0)}, "y": {"top1": (72.0, 0.0)}}}
    lines = _load("accuracy_table").comparison(config, table, "val")
    assert "validation Top-1" in lines[0] and "`base`" in lines[0]
    assert lines[2:8] == ["| method | a w8 | b w16 |", "|---|---|---|", "| the base | 80.00 | 70.00 |",
                          "| change x | 81.25 (+1.25) | – |", "| y | 79.50 (-0.50) | 72.00 (+2.00) |",
                          "| z | not run | – |"]
    assert _load("accuracy_table").comparison({**config, "compare_to": None}, table, "val") == []


def _cells_module():
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    return importlib.import_module("accuracy_cells")


def _bench(config, train_images=256, results_dir="unused"):
    train = type("Splits", (), {"train_x": torch.zeros(2, 1, 28, 28), "train_y": torch.zeros(train_images)})()
    return _cells_module().Bench(config, train, None, None, "cpu", results_dir, "unused")


def test_a_method_can_scale_each_networks_lr_and_run_on_some_networks_only():
    config = {**CONFIG, "methods": {"dense": {"kind": "dense"},
                                    "half": {"kind": "edropout", "target": 0.5, "lr_scale": 0.5},
                                    "adadelta": {"kind": "edropout", "optimizer": "adadelta", "lr": 1.0,
                                                 "networks": ["resnet18"]}}}
    bench = _bench(config)
    assert [c.name for c in bench.cells()] == ["resnet18_dense_s0", "resnet18_half_s0", "resnet18_adadelta_s0",
                                               "squeezenet_dense_s0", "squeezenet_half_s0"]
    half = config["methods"]["half"]
    assert bench.schedule("resnet18", half)["lr"] == pytest.approx(0.025)  # SGD's 0.05, halved
    assert bench.schedule("squeezenet", half)["lr"] == pytest.approx(0.5)  # Adadelta's 1.0, halved
    assert bench.schedule("squeezenet")["lr"] == 1.0
    settings = _cells_module().edropout_settings(bench, half, "squeezenet")
    assert "lr_scale" not in settings and "networks" not in settings and settings["target"] == 0.5


def test_a_method_naming_a_network_the_config_lacks_is_refused():
    config = {**CONFIG, "methods": {"x": {"kind": "dense", "networks": ["resnet18", "resnet50"]}}}
    with pytest.raises(ValueError, match=r"method 'x' names networks \['resnet50'\]"):
        _bench(config)


@pytest.mark.parametrize("name", ["accuracy_cpu_full", "accuracy_ablation_cpu"])
def test_the_committed_tables_hold_every_cell_of_their_config_with_its_settings(name):
    # the README quotes these tables: a config changed after its cells ran would make them stale
    with open(os.path.join(BENCH_DIR, "configs", name + ".json")) as f:
        config = json.load(f)
    fashion_mnist_train = 60000
    bench = _bench(config, config.get("train_images", fashion_mnist_train - config["validation_images"]),
                   os.path.join(BENCH_DIR, "results", name))
    statuses = {cell.name: _cells_module().cell_status(bench, cell) for cell in bench.cells()}
    assert statuses and all(status == "done" for status in statuses.values()), statuses
