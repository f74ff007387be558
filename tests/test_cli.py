"""The main job end to end on a tiny configuration, resume, the pruned-model file, and the data loaders."""
import json
import os

import numpy as np
import pytest
import torch

from edropout.app.checkpoint import load_pruned_model
from edropout.app.cli import main
from edropout.app.data import load_dataset, load_fashion_mnist
from edropout.app.errors import DataError
from edropout.app.models import build_model
from edropout.app.training import evaluate
from idx_files import write_idx

TINY = ["prune", "--model", "lenet", "--width", "4", "--batch-size", "32", "--limit", "256",
        "--population-size", "4", "--min-iterations", "4", "--patience", "2", "--no-progress"]


def test_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("energy.png", "pruning.png", "pruned_model.pt", "checkpoint.pt", "history.json"):
        assert (out / name).stat().st_size > 0, name
    assert report["iterations"] == 2 * (256 // 32)
    assert 0 < report["percent_removed"] < 100
    assert report["R_percent_kept"] == pytest.approx(100 - report["percent_removed"])
    assert report["top1_exported"] == pytest.approx(report["top1_P"])
    assert len(report["seconds_per_epoch"]) == 2
    raw = torch.load(out / "pruned_model.pt", weights_only=True)
    assert raw["model"] == "lenet"
    small = load_pruned_model(str(out / "pruned_model.pt"))
    assert sum(p.numel() for p in small.parameters()) == report["parameters_pruned"] < report["parameters_dense"]
    data = load_dataset("digits", limit=256)
    assert evaluate(small, data.test_x, data.test_y)[0] == pytest.approx(report["top1_P"])


def test_target_rate_is_met_and_reported(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "2", "--out", str(out), "--target-rate", "0.5"]) == 0
    report = json.loads((out / "report.json").read_text())
    small = load_pruned_model(str(out / "pruned_model.pt"))
    removed = 1 - sum(p.numel() for p in small.parameters()) / report["parameters_dense"]
    assert abs(removed - 0.5) <= 0.02
    assert report["target_percent_removed"] == 50.0 and report["target_metric"] == "params"
    assert report["achieved_percent_removed"] == pytest.approx(100 * removed)
    assert report["percent_units_kept"] == pytest.approx(100 * report["units_kept"] / report["units_total"])
    assert "F_meaning" in report
    line = capsys.readouterr().out.strip()
    assert line.index("Top-1 (P)") < line.index("removed") and "(F)" not in line
    assert f"removed {100 * removed:.1f}% of parameters" in line and "(target 50.0% of params)" in line
    assert f"{report['percent_units_kept']:.1f}% of units kept" in line


def test_target_rate_outside_zero_one_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--target-rate", "1.5"])
    assert "--target-rate: 1.5 is not a share in [0, 1)" in capsys.readouterr().err


def test_unreachable_target_rate_is_a_one_line_error(tmp_path, capsys):
    assert main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run"), "--target-rate", "0.99"]) == 2
    err = capsys.readouterr().err.strip()
    assert "beyond what pruning can remove" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_resume_continues_where_the_run_stopped(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(TINY + ["--epochs", "3", "--out", str(straight)])
    main(TINY + ["--epochs", "1", "--out", str(split)])
    os.remove(split / "report.json")
    main(TINY + ["--epochs", "3", "--out", str(split), "--resume"])
    a = json.loads((straight / "report.json").read_text())
    b = json.loads((split / "report.json").read_text())
    for key in ("iterations", "top1_F", "top1_P", "percent_removed", "converged_at_iteration"):
        assert a[key] == b[key], key
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((split / "history.json").read_text())
    assert [h["best_energy"] for h in ha] == pytest.approx([h["best_energy"] for h in hb], abs=1e-6)


def test_fashion_mnist_loader_reads_any_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (20,)))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7))
    data = load_fashion_mnist(str(tmp_path))
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_x.shape == (7, 1, 28, 28)
    assert data.test_y.tolist() == list(range(7))
    assert abs(float(data.train_x.mean())) < 1e-5


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))


def test_unknown_names_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg99")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(SystemExit):
        main(["prune", "--model", "vgg99"])


class _Payload:
    """Pickles as a call of ``open(marker, "w")``: loading it with weights_only=False would create the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_checkpoint_is_refused_and_never_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "payload_ran"
    torch.save({"model": _Payload(str(marker)), "epoch": 0}, out / "checkpoint.pt")
    assert main(TINY + ["--epochs", "1", "--out", str(out), "--resume"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0] and "io.open" in err[0], err
    assert "Traceback" not in err[0]
