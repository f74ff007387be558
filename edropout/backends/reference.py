"""The reference backend: one masked forward per state. Slow, but the readable definition of an energy."""
from __future__ import annotations

import torch

from ..energy import member_energies
from ..masking import scoring


def score(model, units, states, x, y, energy_fn, batch_statistics=True, max_members=None):
    """Energies [S]: one masked forward per state."""
    out = []
    for state in states:
        with scoring(model, units, state.unsqueeze(0), batch_statistics):
            out.append(member_energies(energy_fn, model(x), y, 1))
    return torch.cat(out)
