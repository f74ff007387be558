"""Ways to score a population: ``reference`` (one masked forward per state, the readable definition) and
``batched`` (the whole population as one forward of S·B rows with per-member masks and BatchNorm statistics).

Both return the same energies for the same states (to float tolerance). ``auto`` resolves per device.
"""
from __future__ import annotations

import torch

from .energy import member_energies
from .masking import scoring

BACKENDS = ("reference", "batched", "auto")


def resolve_backend(name: str, device: torch.device) -> str:
    """Validate a backend name and resolve ``auto``."""
    if name == "triton":
        raise ValueError("backend='triton' is not available yet (it comes with the Triton kernels); "
                         "use 'batched' or 'reference'")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {BACKENDS}")
    return "batched" if name == "auto" else name


def score_reference(model, units, states, x, y, energy_fn, batch_statistics=True):
    """Energies [S]: one masked forward per state."""
    out = []
    for state in states:
        with scoring(model, units, state.unsqueeze(0), batch_statistics):
            out.append(member_energies(energy_fn, model(x), y, 1))
    return torch.cat(out)


def score_batched(model, units, states, x, y, energy_fn, batch_statistics=True, max_members=None):
    """Energies [S]: the population in forwards of up to ``max_members`` members (all at once by default)."""
    chunk = max_members or states.shape[0]
    out = []
    for start in range(0, states.shape[0], chunk):
        part = states[start:start + chunk]
        members = part.shape[0]
        xs = x.repeat((members,) + (1,) * (x.dim() - 1))
        with scoring(model, units, part, batch_statistics):
            out.append(member_energies(energy_fn, model(xs), y.repeat(members), members))
    return torch.cat(out)


def score(backend, model, units, states, x, y, energy_fn, batch_statistics=True, max_members=None):
    """Dispatch to the resolved backend."""
    if backend == "reference":
        return score_reference(model, units, states, x, y, energy_fn, batch_statistics)
    return score_batched(model, units, states, x, y, energy_fn, batch_statistics, max_members)
