"""The batched backend: the whole population as one forward of S·B rows, with per-member masks and per-member
BatchNorm statistics. Costs S dense forwards of work, but in one pass."""
from __future__ import annotations

import torch

from ..energy import member_energies
from ..masking import scoring
from .reference import ReferenceBackend


def member_chunks(states, x, max_members=None):
    """(states, member count, input repeated member-major) for forwards of up to ``max_members`` members."""
    chunk = max_members or states.shape[0]
    for start in range(0, states.shape[0], chunk):
        chunk_states = states[start:start + chunk]
        members = chunk_states.shape[0]
        yield chunk_states, members, x.repeat((members,) + (1,) * (x.dim() - 1))


class BatchedBackend(ReferenceBackend):
    """The reference backend with the population scored in S·B-row forwards."""

    name = "batched"

    def score(self, states, x, y):
        """Energies [S]: the population in forwards of up to ``max_members`` members (all at once by default)."""
        out = []
        for chunk_states, members, xs in member_chunks(states, x, self.max_members):
            with scoring(self.model, self.units, chunk_states, self.batch_statistics):
                out.append(member_energies(self.energy_fn, self.model(xs), y.repeat(members), members))
        return torch.cat(out)
