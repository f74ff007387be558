"""Binary differential evolution (METHOD.md §3): initial population, children, greedy selection, convergence.

Operators take their random draws as arguments so that any implementation fed the same draws (the Triton
kernel, a resumed run) produces identical children; ``draw_randoms`` makes those draws from a seeded generator.
Everything is vectorised over the whole population.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import host


def check_probability(name: str, value: float) -> float:
    """A probability must lie in [0, 1]."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def check_population_size(members: int) -> int:
    """Differential evolution needs a member and three distinct others."""
    if int(members) != members or members < 4:
        raise ValueError(f"population_size must be an integer >= 4 (each child needs three other distinct members), "
                         f"got {members}")
    return int(members)


def initial_population(members: int, num_units: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """Bits ~ Bernoulli(keep), True = keep the unit."""
    return torch.rand(members, num_units, generator=generator) < keep


@dataclass
class Draws:
    """The random numbers one generation consumes: parent triples [S, 3], mutation and crossover uniforms [S, D]."""

    parents: torch.Tensor
    mutation: torch.Tensor
    crossover: torch.Tensor


def distinct_others(members: int, generator: torch.Generator) -> torch.Tensor:
    """Parent triples [S, 3]: for each member i three distinct indices other than i, uniformly over ordered
    triples, in O(S) time and memory: the k-th index is a uniform draw among the S - 1 - k values not yet
    excluded, mapped past the excluded ones in ascending order."""
    excluded = torch.arange(members).unsqueeze(1)
    for k in range(3):
        pick = torch.randint(0, members - 1 - k, (members,), generator=generator)
        for column in excluded.sort(dim=1).values.unbind(1):
            pick = pick + (pick >= column).long()
        excluded = torch.cat([excluded, pick.unsqueeze(1)], dim=1)
    return excluded[:, 1:]


def draw_randoms(members: int, num_units: int, generator: torch.Generator) -> Draws:
    """One generation's draws: distinct parents a, b, c != i (``distinct_others``), then the uniforms."""
    parents = distinct_others(members, generator)
    mutation = torch.rand(members, num_units, generator=generator)
    crossover = torch.rand(members, num_units, generator=generator)
    return Draws(parents, mutation, crossover)


# bytes per bit of the population that one generation holds at once: population and children (bool), mutation,
# crossover and group-repair uniforms (float32), masks and the mutant (bool)
BYTES_PER_BIT = 20


def _available_memory(device: torch.device):
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: MemAvailable), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_population_memory(members: int, num_units: int, device) -> None:
    """Refuse, before allocating anything, a population whose generation cannot fit in the device's free memory."""
    need = members * num_units * BYTES_PER_BIT
    available = _available_memory(device)
    if available is not None and need > available:
        raise ValueError(f"population_size={members} with {num_units} units per state needs about "
                         f"{need / 2 ** 30:.1f} GiB for one generation, but {device} has "
                         f"{available / 2 ** 30:.1f} GiB free; use a smaller population_size")


def mutate(population: torch.Tensor, parents: torch.Tensor, u: torch.Tensor, factor: float) -> torch.Tensor:
    """v = s_a where u <= F; elsewhere 1 - s_a when s_b == s_c, and 0 when they differ."""
    a, b, c = (population[parents[:, k]] for k in range(3))
    return torch.where(u <= factor, a, (b == c) & ~a)


def crossover(population: torch.Tensor, mutant: torch.Tensor, r: torch.Tensor, rate: float) -> torch.Tensor:
    """Child takes the mutant's gene with probability C, else the parent's."""
    return torch.where(r < rate, mutant, population)


def make_children(population: torch.Tensor, draws: Draws, factor: float, rate: float) -> torch.Tensor:
    """One generation of children for every member at once."""
    parents, u, r = host.upload([draws.parents, draws.mutation, draws.crossover], population.device)
    return crossover(population, mutate(population, parents, u, factor), r, rate)


def keep_one_per_group(states: torch.Tensor, group_of_unit: torch.Tensor, generator: torch.Generator,
                       groups: int | None = None):
    """(ours) A state that empties a whole group keeps one random unit of it, so every state can be exported.
    ``group_of_unit`` is best on the states' device and ``groups`` (its maximum + 1) given: then nothing waits on
    the device (the random keys come from the CPU ``generator`` and are uploaded without blocking)."""
    members, num_units = states.shape
    if groups is None:
        groups = int(group_of_unit.max()) + 1
    group_of_unit = group_of_unit.to(states.device)
    index = group_of_unit.expand(members, num_units)
    keys, = host.upload([torch.rand(members, num_units, generator=generator)], states.device)
    # a kept unit scores 2 + key and a pruned one its key in [0, 1): a group's best score is below 2 exactly when
    # the group is empty, and then it is the group's largest key, which picks the unit to keep
    scores = torch.add(keys, states, alpha=2)
    best = torch.full((members, groups), -1.0, device=states.device).scatter_reduce(1, index, scores, "amax")
    best = best.gather(1, index)
    return states | ((scores == best) & (best < 2))


def select(population, energies, children, child_energies):
    """Greedy selection: a child replaces its parent only if strictly better (ties keep the parent)."""
    better = child_energies < energies
    return (torch.where(better.unsqueeze(1), children, population), torch.where(better, child_energies, energies))


@dataclass
class Convergence:
    """Freeze the best state once it is unchanged for ``patience`` iterations, after ``min_iterations`` (METHOD §5)."""

    min_iterations: int
    patience: int
    unchanged: int = 0

    def update(self, iteration: int, changed: bool) -> bool:
        """Record one iteration; True when the best state is to be frozen now."""
        self.unchanged = 0 if changed else self.unchanged + 1
        return iteration >= self.min_iterations and self.unchanged >= self.patience
