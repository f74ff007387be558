"""The model-zoo benchmark's runner (the benchmark itself needs torchvision and timm, which CI does not install):
each model runs in its own capped subprocess, and one that writes no row is recorded as a crash with its limits."""
import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "model_zoo.py")


@pytest.fixture()
def zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_model_whose_subprocess_writes_no_row_is_a_crash_row_with_its_limits(zoo, tmp_path, monkeypatch):
    calls = []

    def fails(source, name, path, extra, cap, timeout):
        calls.append((source, name, extra, cap, timeout))
        return "exit 1: RuntimeError: boom"

    monkeypatch.setattr(zoo, "_rerun", fails)
    rows = zoo.run_all(["resnet18d"], tmp_path, timeout=7, triton_seconds=3, memory_cap=2 * 2 ** 30)
    assert calls == [("timm", "resnet18d", ["--triton-seconds", "3"], 2 * 2 ** 30, 7)]
    assert rows == [{"model": "timm/resnet18d", "crash": "exit 1: RuntimeError: boom (memory cap 2 GiB, 7 s)"}]
    assert zoo.run_all(["resnet18d"], tmp_path, timeout=7) == rows  # cached: not run again
    assert len(calls) == 1


def test_a_row_written_under_another_memory_cap_records_the_cap(zoo, tmp_path, monkeypatch):
    def writes(source, name, path, extra, cap, timeout):
        path.write_text(json.dumps({"model": f"{source}/{name}", "units": 3}))
        return ""

    monkeypatch.setattr(zoo, "_rerun", writes)
    assert zoo.run_all(["timm__resnet18d"], tmp_path, memory_cap=zoo.MEMORY_CAP) == \
        [{"model": "timm/resnet18d", "units": 3}]
    (tmp_path / "timm__resnet18d.json").unlink()
    assert zoo.run_all(["timm__resnet18d"], tmp_path, memory_cap=4 * 2 ** 30) == \
        [{"model": "timm/resnet18d", "units": 3, "memory_cap_gib": 4.0}]
    assert zoo.run_all(["resnet50"], tmp_path, run=False) == []  # not cached and not asked to run


def test_the_real_subprocess_under_a_cap_too_small_for_torch_is_a_crash_row(zoo, tmp_path):
    rows = zoo.run_all(["resnet18d"], tmp_path, timeout=120, memory_cap=256 * 2 ** 20)
    assert len(rows) == 1 and rows[0]["model"] == "timm/resnet18d"
    assert rows[0]["crash"].startswith("exit ") and rows[0]["crash"].endswith("(memory cap 0.25 GiB, 120 s)")
