"""Ways to score a population, behind one ``backend=`` argument; every backend returns the same energies
(to float tolerance) for the same states. Each backend module exposes
``score(model, units, states, x, y, energy_fn, batch_statistics, max_members) -> Tensor[S]``.
"""
from __future__ import annotations

import importlib.util

import torch

from . import auto, batched, compact, reference, triton

SCORERS = {"reference": reference.score, "batched": batched.score, "compact": compact.score,
           "triton": triton.score}
BACKENDS = tuple(SCORERS) + ("auto",)


def resolve_backend(name: str, device: torch.device, *, model=None, units=None, states=None, x=None) -> str:
    """Validate a backend name and resolve ``auto`` for the device. On CPU, given the ``model``, its ``units``,
    the ``states`` to score and the batch ``x``, auto picks "compact" or "batched" by the measured cost rule of
    ``backends/auto.py``; without them it picks "compact" (the rule's choice for the engine's nets at batch 128)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {BACKENDS}")
    if name == "auto" and torch.device(device).type == "cuda" and importlib.util.find_spec("triton"):
        return "triton"  # kept-channel kernels on CUDA when Triton is installed
    if name == "auto" and torch.device(device).type == "cpu":
        if model is None or units is None or states is None or x is None:
            return "compact"
        return auto.choose(model, units, states, x)
    return "batched" if name == "auto" else name


def score(backend, model, units, states, x, y, energy_fn, batch_statistics=True, max_members=None):
    """Energies [S] of ``states`` on the batch, with the resolved backend."""
    return SCORERS[backend](model, units, states, x, y, energy_fn, batch_statistics, max_members)
