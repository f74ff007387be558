"""The command line explains itself: every user error is one line on stderr and exit status 2, never a traceback;
--help gives every option's meaning and default; the plots say what they show."""
import argparse
import re

import pytest

from edropout.app import report
from edropout.app.cli import build_parser, main

TINY = ["prune", "--model", "lenet", "--width", "4", "--batch-size", "32", "--limit", "64", "--epochs", "1",
        "--population-size", "4", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--epochs", "-2"], "argument --epochs: expected a positive integer, got -2"),
    (["--limit", "0"], "argument --limit: expected a positive integer, got 0"),
    (["--limit", "-5"], "argument --limit: expected a positive integer, got -5"),
    (["--width", "0"], "argument --width: expected a positive integer, got 0"),
    (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["--population-size", "3"], "argument --population-size: expected an integer >= 4"),
    (["--init-keep", "1.5"], r"argument --init-keep: expected a probability in \[0, 1\], got 1.5"),
    (["--crossover-rate", "x"], r"argument --crossover-rate: expected a probability in \[0, 1\], got 'x'"),
    (["--lr", "0"], "argument --lr: expected a positive number, got 0"),
    (["--min-iterations", "-1"], "argument --min-iterations: expected an integer >= 0, got -1"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: expected a number >= 0, got -1"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_options_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(TINY + args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("edropout prune: error: ") and err[0].endswith("(see edropout prune --help)")
    assert re.search(message, err[0]), err[0]


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: torch.cuda.is_available() is False"),
    (["--backend", "triton"], "--backend triton needs a CUDA GPU, and this run is on the CPU; use --backend auto, "
                              "or set TRITON_INTERPRET=1"),
    (["--batch-size", "100"], "--batch-size 100 exceeds the 64 training images"),
    (["--data", "fashion-mnist"], "Fashion-MNIST directory /nonexistent/edropout-tests/fashion-mnist does not "
                                  "exist. Install the data with 'apt-get install dataset-fashion-mnist'"),
])
def test_environment_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(TINY + args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edropout: error: ") and message in err[0], err


def test_help_gives_every_option_a_meaning_and_its_default(capsys):
    parser = build_parser()
    prune = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    options = [a for a in prune._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 29  # every one of them, whatever is added, has a meaning below
    for action in options:
        assert action.help and len(action.help) > 10, action.dest
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--batch-size BATCH_SIZE images per iteration (default: 64)", "(default: adadelta)",
                  "--checkpoint-every CHECKPOINT_EVERY minutes between checkpoints inside an epoch",
                  "default half of the run", "compact (kept channels only, CPU), triton (GPU kernels)"):
        assert shown in text, shown


def test_plots_have_titles_the_energy_name_and_a_full_percentage_axis(tmp_path, monkeypatch):
    axes = {}
    real = report.figure

    def spy(path, figsize):
        context = real(path, figsize)
        fig, ax = context.__enter__()
        axes[path.rsplit("/", 1)[-1]] = ax

        class _Spy:
            def __enter__(self):
                return fig, ax

            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return _Spy()

    monkeypatch.setattr(report, "figure", spy)
    history = [{"iteration": i + 1, "best_energy": -1.0 - 0.01 * i, "mean_energy": -0.5,
                "pruning_rate": 0.78 + 0.001 * i} for i in range(20)]
    report.plot_history(history, str(tmp_path), converged_at=10, energy="cross_entropy")
    energy, pruning = axes["energy.png"], axes["pruning.png"]
    assert "cross_entropy energy" in energy.get_title() and energy.get_ylabel() == "cross_entropy energy"
    assert pruning.get_title() and pruning.get_ylim() == (0.0, 100.0)
    assert (tmp_path / "energy.png").stat().st_size > 0 and (tmp_path / "pruning.png").stat().st_size > 0


def test_a_diverging_run_stops_with_one_line_and_status_1(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--optimizer", "sgd", "--lr", "1e30", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edropout: error: training stopped: the training loss is nan at "
                                               "iteration 2; no weight was changed."), err
    assert not (out / "report.json").exists()
