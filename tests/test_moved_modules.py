"""Modules and names that moved keep their old import paths and spellings, with a deprecation warning."""
import subprocess
import sys

import pytest


def test_old_path_warns_and_gives_the_same_module():
    sys.modules.pop("edropout.training", None)
    with pytest.warns(DeprecationWarning, match="edropout.training moved to edropout.app.training"):
        import edropout.training as old
    import edropout.app.training as new
    assert old is new and old.evaluate is new.evaluate


def test_renamed_names_warn_and_give_the_new_ones(batch):
    from edropout import EDropout
    from nets import small_net

    sys.modules.pop("edropout.compact_training", None)
    with pytest.warns(DeprecationWarning, match="edropout.compact_training moved to edropout.exported_training"):
        import edropout.compact_training as old
    import edropout.exported_training as new
    assert old is new
    with pytest.warns(DeprecationWarning, match="train_exported_after_convergence"):
        pruner = EDropout(small_net("lenet"), batch[0][:2], compact_after_convergence=False)
    assert pruner.train_exported_after_convergence is False
    with pytest.warns(DeprecationWarning, match="train_exported_after_convergence"):
        assert pruner.compact_after_convergence is False
    import edropout_kernels
    with pytest.warns(DeprecationWarning, match="kept_first_order"):
        assert edropout_kernels.compact_keep is edropout_kernels.kept_first_order


def test_python_dash_m_edropout_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "edropout", "prune", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--population-size" in out.stdout
