"""Putting a whole model in train or eval mode for a while and then giving every module its own mode back: a
user's frozen BatchNorm or switched-off dropout inside a training model must survive tracing, scoring, export
and evaluation (``model.train(was_training)`` would reset them all)."""
from __future__ import annotations

import contextlib

import torch.nn as nn


@contextlib.contextmanager
def all_modules_in(model: nn.Module, training: bool):
    """Within the block every module of ``model`` has ``training``; on exit each module's previous mode."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
