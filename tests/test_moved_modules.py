"""Modules that moved to ``edropout.app`` keep their old import paths, with a deprecation warning."""
import subprocess
import sys

import pytest


def test_old_path_warns_and_gives_the_same_module():
    sys.modules.pop("edropout.training", None)
    with pytest.warns(DeprecationWarning, match="edropout.training moved to edropout.app.training"):
        import edropout.training as old
    import edropout.app.training as new
    assert old is new and old.evaluate is new.evaluate


def test_python_dash_m_edropout_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "edropout", "prune", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--population-size" in out.stdout
