"""The reference backend: one masked forward per state, the evolution's operators in PyTorch and the masked
optimizer step that restores pruned elements. Slow, but the readable definition of every part; the other
backends subclass it and override what they do faster."""
from __future__ import annotations

import torch

from .. import evolution as evo
from ..energy import member_energies
from ..masked_update import masked_step
from ..masking import masked, scoring
from .base import Backend


class ReferenceBackend(Backend):
    """Every part of an iteration in plain PyTorch (``evolution``, ``masking``, ``masked_update``)."""

    name = "reference"

    def score(self, states, x, y):
        """Energies [S]: one masked forward per state."""
        out = []
        for state in states:
            with scoring(self.model, self.units, state.unsqueeze(0), self.batch_statistics):
                out.append(member_energies(self.energy_fn, self.model(x), y, 1))
        return torch.cat(out)

    def children(self, population, mutation_factor, crossover_rate, *, generator, seed, iteration):
        """Children from draws of the seeded ``generator`` (its state is saved with the pruner's)."""
        draws = evo.draw_randoms(population.shape[0], population.shape[1], generator)
        return evo.make_children(population, draws, mutation_factor, crossover_rate)

    def select(self, population, energies, children, child_energies):
        """Greedy selection, then the best member by stored energy."""
        population, energies = evo.select(population, energies, children, child_energies)
        return population, energies, energies.argmin()

    def training_logits(self, state, x):
        """The masked dense forward."""
        with masked(self.model, self.units, state):
            return self.model(x)

    def optimizer_step(self, optimizer, view):
        """The ordinary step, then pruned elements restored (``masked_update.masked_step``)."""
        masked_step(optimizer, view.parameter_keeps)
