"""Atomic checkpoints and the pruned-model file: nothing a user has is lost if a run is killed mid-write."""
from __future__ import annotations

import os
import pickle
import re
import tempfile

import torch

from .errors import CheckpointError


def atomic_save(obj, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint or pruned-model file with ``weights_only=True``: tensors, numbers, strings and plain
    containers only, so a planted file cannot run code. Anything else is refused with a ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = (f"it calls {found.group(1)}, which is not a tensor or plain value" if found
                  else "it is not a file torch.save wrote, or it is truncated")
        raise CheckpointError(f"refusing to load {path}: {reason}; nothing from it was run. Delete it, or point "
                              f"--out at another directory") from None


def save_pruned_model(path: str, model_name: str, model_kwargs: dict, state: torch.Tensor, small) -> None:
    """Store a pruned model as plain tensors and names (loadable with ``weights_only=True``)."""
    atomic_save({"model": model_name, "kwargs": dict(model_kwargs), "state": state.cpu().bool(),
                 "state_dict": small.state_dict()}, path)


def load_pruned_model(path: str):
    """Rebuild a model saved by ``save_pruned_model``: build the dense model, remove the same units, load weights."""
    from ..export import export_pruned
    from .models import build_model
    from ..units import discover_units

    saved = load_checkpoint(path)
    dense = build_model(saved["model"], **saved["kwargs"])
    example = torch.zeros(2, saved["kwargs"]["in_channels"], saved["kwargs"]["input_size"],
                          saved["kwargs"]["input_size"])
    units = discover_units(dense, example)
    small = export_pruned(dense, units, saved["state"], example)
    small.load_state_dict(saved["state_dict"])
    return small.eval()
