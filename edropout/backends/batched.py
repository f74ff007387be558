"""The batched backend: the whole population as one forward of S·B rows, with per-member masks and per-member
BatchNorm statistics. Costs S dense forwards of work, but in one pass."""
from __future__ import annotations

import torch

from ..energy import member_energies
from ..masking import scoring


def member_chunks(states, x, max_members=None):
    """(states, member count, input repeated member-major) for forwards of up to ``max_members`` members."""
    chunk = max_members or states.shape[0]
    for start in range(0, states.shape[0], chunk):
        part = states[start:start + chunk]
        members = part.shape[0]
        yield part, members, x.repeat((members,) + (1,) * (x.dim() - 1))


def score(model, units, states, x, y, energy_fn, batch_statistics=True, max_members=None):
    """Energies [S]: the population in forwards of up to ``max_members`` members (all at once by default)."""
    out = []
    for part, members, xs in member_chunks(states, x, max_members):
        with scoring(model, units, part, batch_statistics):
            out.append(member_energies(energy_fn, model(xs), y.repeat(members), members))
    return torch.cat(out)
