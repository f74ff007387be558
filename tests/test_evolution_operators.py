"""Binary differential evolution: operator statistics, distinct parents, greedy selection, reproducibility."""
import math

import pytest
import torch

from edropout import evolution as evo


def _population(s=16, d=4096, seed=0):
    return torch.rand(s, d, generator=torch.Generator().manual_seed(seed)) < 0.5


def test_parents_are_distinct_and_not_self():
    g = torch.Generator().manual_seed(0)
    for size in (4, 5, 8, 33):
        for _ in range(50):
            p = evo.draw_randoms(size, 3, g).parents
            own = torch.arange(size)[:, None]
            assert (p != own).all()
            assert (p[:, 0] != p[:, 1]).all() and (p[:, 1] != p[:, 2]).all() and (p[:, 0] != p[:, 2]).all()


def test_parents_are_uniform():
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(5, 5)
    for _ in range(2000):
        p = evo.draw_randoms(5, 1, g).parents
        counts[torch.arange(5), p[:, 0]] += 1
    off = counts[~torch.eye(5, dtype=torch.bool)]
    # each of the 4 others is drawn with probability 1/4: 500 ± 19.4 (binomial sd); allow 5 sd
    assert ((off - 500).abs() < 5 * math.sqrt(2000 * 0.25 * 0.75)).all()


@pytest.mark.parametrize("factor", [0.9, 0.5])
def test_mutation_touches_about_one_minus_f_of_genes(factor):
    pop = _population()
    draws = evo.draw_randoms(16, 4096, torch.Generator().manual_seed(2))
    a = pop[draws.parents[:, 0]]
    mutant = evo.mutate(pop, draws.parents, draws.mutation, factor)
    touched = (draws.mutation > factor).double().mean().item()
    n = pop.numel()
    assert abs(touched - (1 - factor)) < 5 * math.sqrt(factor * (1 - factor) / n)
    # where u <= F the mutant copies s_a exactly; elsewhere it follows the b/c rule
    copy = draws.mutation <= factor
    assert torch.equal(mutant[copy], a[copy])
    b, c = pop[draws.parents[:, 1]], pop[draws.parents[:, 2]]
    rule = torch.where(b == c, ~a, torch.zeros_like(a))
    assert torch.equal(mutant[~copy], rule[~copy])


def test_crossover_takes_mutant_with_rate_c():
    pop = _population()
    mutant = ~pop
    r = torch.rand(pop.shape, generator=torch.Generator().manual_seed(3))
    child = evo.crossover(pop, mutant, r, 0.9)
    share = (child != pop).double().mean().item()
    assert abs(share - 0.9) < 5 * math.sqrt(0.09 / pop.numel())


def test_make_children_is_a_function_of_the_draws():
    pop = _population(8, 100)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    c1 = evo.make_children(pop, evo.draw_randoms(8, 100, g1), 0.9, 0.9)
    c2 = evo.make_children(pop, evo.draw_randoms(8, 100, g2), 0.9, 0.9)
    c3 = evo.make_children(pop, evo.draw_randoms(8, 100, g2), 0.9, 0.9)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)


def test_selection_never_raises_a_stored_energy():
    g = torch.Generator().manual_seed(5)
    pop = _population(8, 50)
    energies = torch.rand(8, generator=g)
    for _ in range(20):
        children = evo.make_children(pop, evo.draw_randoms(8, 50, g), 0.9, 0.9)
        child_e = torch.rand(8, generator=g)
        child_e[0] = energies[0]  # a tie keeps the parent
        child_e[1] = float("inf")
        new_pop, new_e = evo.select(pop, energies, children, child_e)
        assert (new_e <= energies).all()
        assert torch.equal(new_pop[0], pop[0]) and torch.equal(new_pop[1], pop[1])
        took = child_e < energies
        assert torch.equal(new_pop[took], children[took])
        pop, energies = new_pop, new_e


def test_convergence_waits_for_min_iterations_and_patience():
    conv = evo.Convergence(min_iterations=5, patience=3)
    fired = [conv.update(i, changed=(i in (1, 2))) for i in range(1, 10)]
    assert fired.index(True) == 4  # iteration 5: unchanged since iteration 2 for 3 iterations and >= 5


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_probabilities_must_be_in_unit_interval(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evo.check_probability("init_keep", bad)


def test_population_needs_four_members():
    with pytest.raises(ValueError, match=">= 4"):
        evo.check_population_size(3)


def test_no_state_empties_a_whole_group():
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    states = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    repaired = evo.keep_one_per_group(states, groups, torch.Generator().manual_seed(0))
    assert torch.equal(repaired[1], states[1])  # nothing to repair
    assert (repaired >= states).all()  # only ever adds units
    for row in repaired:
        for g in range(3):
            assert row[groups == g].sum() >= 1
    # exactly one unit added to each emptied group
    assert repaired[0].sum() == 3 and repaired[2].sum() == 5
