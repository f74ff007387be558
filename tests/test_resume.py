"""A run is never lost and resumes exactly: Dropout nets killed (SIGKILL, a crash, SIGINT, SIGTERM) mid-epoch end
bit-equal to an uninterrupted run; existing runs are refused without --resume/--overwrite; --resume checks the
run's settings."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from edropout.app.cli import main
from edropout.pruner import EDropout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits, 128 images in batches of 32: 4 iterations per epoch; the state freezes during the run, so resumed runs
# cover both the evolving and the exported-network training phase
TINY = ["prune", "--width", "4", "--batch-size", "32", "--limit", "128", "--population-size", "4",
        "--min-iterations", "5", "--patience", "2", "--no-progress", "--epochs", "3"]
STOP_AT = 6  # the 6th step: epoch 2, batch 2


def _final(out):
    """What must be bit-equal between two runs: weights and buffers, evolution state, history, accuracies."""
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    report = json.loads(open(os.path.join(out, "report.json")).read())
    return (saved["model"], saved["pruner"]["population"], saved["pruner"]["best_state"], saved["history"],
            {k: report[k] for k in ("iterations", "top1_F", "top1_P", "percent_removed", "converged_at_iteration")})


def _assert_bit_equal(a, b):
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[3] == b[3]  # every iteration's loss and energies, exactly
    assert a[4] == b[4]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference runs of the Dropout nets with the default checkpointing (once per epoch)."""
    runs = {}
    for model in ("alexnet", "squeezenet"):
        out = str(tmp_path_factory.mktemp(model))
        assert main(TINY + ["--model", model, "--out", out]) == 0
        runs[model] = _final(out)
    return runs


def _stop_at(monkeypatch, action):
    """Run ``action`` at the start of the STOP_AT-th ``EDropout.step`` call."""
    original, calls = EDropout.step, []

    def step(self, x, y, optimizer):
        calls.append(1)
        if len(calls) == STOP_AT:
            action()
        return original(self, x, y, optimizer)

    monkeypatch.setattr(EDropout, "step", step)


class _Crash(Exception):
    pass


def _crash():
    raise _Crash()


def test_a_crash_mid_epoch_resumes_from_the_last_periodic_checkpoint(uninterrupted, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    _stop_at(monkeypatch, _crash)
    with pytest.raises(_Crash):
        main(TINY + ["--model", "alexnet", "--out", out, "--checkpoint-every", "0"])
    monkeypatch.undo()
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (saved["epoch"], saved["position"], saved["pruner"]["iteration"]) == (1, 1, STOP_AT - 1)
    assert main(TINY + ["--model", "alexnet", "--out", out, "--resume"]) == 0
    _assert_bit_equal(_final(out), uninterrupted["alexnet"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_current_iteration_and_exits_with_one_line(signum, uninterrupted, tmp_path,
                                                                        monkeypatch, capsys):
    out = str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest itself runs in the background
    _stop_at(monkeypatch, lambda: os.kill(os.getpid(), signum))
    assert main(TINY + ["--model", "alexnet", "--out", out]) == 128 + signum
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(signum).name
    assert err == [f"edropout: interrupted by {name} at iteration {STOP_AT} (epoch 2, batch 2 of 4); checkpoint "
                   f"saved to {out}/checkpoint.pt; continue with --resume"]
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (saved["epoch"], saved["position"], saved["pruner"]["iteration"]) == (1, 2, STOP_AT)
    if signum == signal.SIGINT:  # the same checkpoint either way: one resume shows it continues exactly
        assert main(TINY + ["--model", "alexnet", "--out", out, "--resume"]) == 0
        _assert_bit_equal(_final(out), uninterrupted["alexnet"])


def test_sigkill_mid_epoch_resumes_bit_equal(uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    # a real SIGKILL in a real process, right after the 6th iteration's checkpoint (--checkpoint-every 0)
    # the killed process sums with as many CPU threads as this one: another count rounds differently
    script = (f"import os, signal, sys, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
              f"from edropout.app import training\noriginal = training.Run.save\n"
              f"def save(self):\n    original(self)\n    if self.pruner.iteration == {STOP_AT}:\n"
              f"        os.kill(os.getpid(), signal.SIGKILL)\ntraining.Run.save = save\n"
              f"from edropout.app.cli import main\nsys.exit(main({TINY + ['--model', 'squeezenet', '--out', out]!r}"
              f" + ['--checkpoint-every', '0']))\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(os.path.join(out, "report.json"))
    assert main(TINY + ["--model", "squeezenet", "--out", out, "--resume"]) == 0
    _assert_bit_equal(_final(out), uninterrupted["squeezenet"])


def test_resuming_with_another_thread_count_says_it_will_not_be_bit_equal(tmp_path, capsys):
    assert _run(tmp_path, "--epochs", "1", "--threads", "1") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--epochs", "2", "--resume", "--threads", "2") == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "warning: the run was written with 1 CPU threads and continues with 2; CPU sums then round differently, so "
        "it will not end bit-equal to an uninterrupted run (pass --threads 1 for that)")
    assert _run(tmp_path, "--epochs", "3", "--resume", "--threads", "2") == 0
    assert "warning" not in capsys.readouterr().err  # the last checkpoint was written with 2


def _run(tmp_path, *extra):
    return main(TINY + ["--model", "lenet", "--epochs", "2", "--out", str(tmp_path / "run"), *extra])


def test_an_existing_run_is_never_replaced_silently(tmp_path, capsys):
    assert _run(tmp_path) == 0
    report = (tmp_path / "run" / "report.json").read_text()
    capsys.readouterr()
    assert _run(tmp_path) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"edropout: error: {tmp_path}/run already holds a run (checkpoint.pt, report.json, history.json, "
        f"pruned_model.pt, energy.png, pruning.png); pass --resume to continue it or --overwrite to replace it, or "
        f"choose another --out"]
    assert (tmp_path / "run" / "report.json").read_text() == report
    (tmp_path / "run" / ".tmp-stale.pt").write_bytes(b"left by a kill")
    assert _run(tmp_path, "--overwrite", "--seed", "1") == 0
    assert (tmp_path / "run" / "report.json").read_text() != report
    assert not (tmp_path / "run" / ".tmp-stale.pt").exists()


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert _run(tmp_path, "--resume") == 2
    assert capsys.readouterr().err.strip() == (f"edropout: error: --resume: there is no checkpoint at "
                                               f"{tmp_path}/run/checkpoint.pt; run without --resume to start")


def test_resume_refuses_other_settings_listing_them(tmp_path, capsys):
    assert _run(tmp_path) == 0
    capsys.readouterr()
    assert _run(tmp_path, "--resume", "--lr", "0.5", "--seed", "3", "--optimizer", "sgd", "--batch-size", "16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edropout: error: --resume: these options differ from the run in "
                                               f"{tmp_path}/run: --batch-size 32 (checkpoint) vs 16; --lr None "
                                               f"(checkpoint) vs 0.5; --optimizer 'adadelta' (checkpoint) vs 'sgd'; "
                                               f"--seed 0 (checkpoint) vs 3."), err
    assert main(TINY + ["--model", "mlp", "--epochs", "2", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "--model 'lenet' (checkpoint) vs 'mlp'" in capsys.readouterr().err
    assert _run(tmp_path, "--resume", "--energy", "cross_entropy", "--population-size", "5") == 2
    assert "--energy 'margin' (checkpoint) vs 'cross_entropy'; --population-size 4 (checkpoint) vs 5" in \
        capsys.readouterr().err


def test_resume_extends_with_more_epochs_and_reports_truthfully(tmp_path, capsys):
    assert _run(tmp_path) == 0
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    assert main(TINY + ["--model", "lenet", "--epochs", "1", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "has reached epoch 2; pass --epochs 2 or more" in capsys.readouterr().err
    assert main(TINY[:-1] + ["4", "--model", "lenet", "--out", str(tmp_path / "run"), "--resume"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["epochs"] == 4 and len(report["seconds_per_epoch"]) == 4 and report["iterations"] == 16
    assert report["seconds_per_epoch"][:2] == first["seconds_per_epoch"]
    assert report["resumed"] == [{"iteration": 8, "epochs": 4}]
    assert report["min_iterations"] == first["min_iterations"] == 5
