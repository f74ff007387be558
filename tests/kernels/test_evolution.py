"""Evolution kernels vs. a plain PyTorch DE operator fed the kernel's own draws, plus the statistics.

Statistical tolerances are 5 binomial standard deviations; every draw is a pure function of
(seed, step), so these tests are deterministic (no flakiness), and a wrong rate still fails them.
"""
import math

import pytest
import torch

from edropout_kernels.evolution import draw_evolution_randoms, make_children, select_and_best
from kernel_helpers import DEVICE

BIG_BLOCK = 4096  # fewer, larger programs: faster in the interpreter, same numbers (block-independent)


def reference_children(population, abc, u, r, F, C):
    """METHOD.md section 3, written plainly: the operator the kernel must reproduce exactly."""
    F32, C32 = torch.tensor(F, dtype=torch.float32), torch.tensor(C, dtype=torch.float32)
    s_a, s_b, s_c = population[abc[:, 0]], population[abc[:, 1]], population[abc[:, 2]]
    v = torch.where(u <= F32.to(u.device), s_a, (s_b == s_c) & ~s_a)
    return torch.where(r < C32.to(r.device), v, population)


def random_population(S, D, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(S, D, generator=g) < p).to(DEVICE)


@pytest.mark.parametrize("S,D,F,C,block", [(8, 1000, 0.9, 0.9, 256), (5, 77, 0.5, 0.7, 32),
                                           (4, 3000, 0.0, 1.0, 1024), (13, 2049, 1.0, 0.3, 2048)])
def test_children_equal_reference_with_same_draws(S, D, F, C, block):
    pop = random_population(S, D, seed=S * D)
    seed, step = 1234, 7
    abc, u, r = draw_evolution_randoms(S, D, seed, step, device=DEVICE, block_size=block)
    assert torch.isfinite(u).all() and torch.isfinite(r).all() and (abc >= 0).all()
    kids = make_children(pop, F, C, seed, step, block_size=block)
    assert kids.dtype == torch.bool and kids.shape == pop.shape
    assert torch.equal(kids, reference_children(pop, abc, u, r, F, C))
    # block size is not part of the function
    assert torch.equal(kids, make_children(pop, F, C, seed, step, block_size=BIG_BLOCK))
    # negative control: the reference with another member's draws differs
    assert not torch.equal(kids, reference_children(pop, abc.roll(1, 0), u, r, F, C))


def test_parents_distinct_and_uniform():
    S, steps = 4, 150
    counts = torch.zeros(S, S, S, S, dtype=torch.int64)
    for step in range(steps):
        abc, _, _ = draw_evolution_randoms(S, 1, seed=99, step=step, device=DEVICE, block_size=4)
        abc = abc.cpu()
        i = torch.arange(S)
        assert ((abc >= 0) & (abc < S)).all()
        a, b, c = abc.unbind(1)
        assert ((a != i) & (b != i) & (c != i) & (a != b) & (a != c) & (b != c)).all(), step
        counts[i, a, b, c] += 1
    # for S = 4 every member has 3! = 6 ordered triples: chi-square over 4 * 6 cells, 20 dof
    cells = counts[counts > 0].double()
    assert cells.numel() == S * 6
    expected = steps / 6
    chi2 = ((cells - expected) ** 2 / expected).sum().item()
    assert chi2 < 65.0, chi2  # P(chi2_20 > 65) < 1e-6
    # negative control: a sampler stuck on two of the six triples fails the same statistic
    biased = torch.tensor([steps / 2] * 2 + [0.0] * 4)
    assert ((biased - expected) ** 2 / expected).sum().item() > 65.0


def test_parents_distinct_many_steps_larger_population():
    S = 9
    for step in range(0, 2**40, 2**36 + 12345):  # also exercises the high step counter bits
        abc, _, _ = draw_evolution_randoms(S, 1, seed=5, step=step, device=DEVICE, block_size=4)
        full = torch.cat([torch.arange(S, device=abc.device)[:, None], abc], 1)
        assert all(len(set(row.tolist())) == 4 for row in full), step


def test_mutation_and_crossover_rates():
    S, D, F, C = 16, 4096, 0.9, 0.9
    n = S * D
    sigma = lambda p: math.sqrt(p * (1 - p) / n)
    abc, u, r = draw_evolution_randoms(S, D, seed=2024, step=3, device=DEVICE, block_size=BIG_BLOCK)
    assert ((u >= 0) & (u < 1) & (r >= 0) & (r < 1)).all()
    not_copied = (u > F).double().mean().item()  # genes where mutation did not copy s_a
    crossed = (r < C).double().mean().item()
    assert abs(not_copied - (1 - F)) < 5 * sigma(1 - F), not_copied
    assert abs(crossed - C) < 5 * sigma(C), crossed
    # output-only check: with identical members s_b == s_c always, so a gene flips iff u > F and r < C
    row = torch.rand(D, generator=torch.Generator().manual_seed(1)) < 0.5
    pop = row.expand(S, D).contiguous().to(DEVICE)
    kids = make_children(pop, F, C, seed=2024, step=3, block_size=BIG_BLOCK)
    flipped = (kids != pop).double().mean().item()
    p = (1 - F) * C
    assert abs(flipped - p) < 5 * sigma(p), flipped
    assert torch.equal(kids != pop, (u > F) & (r < C))


def test_deterministic_and_step_dependent():
    pop = random_population(6, 500, seed=3)
    a = make_children(pop, 0.9, 0.9, seed=11, step=40)
    b = make_children(pop, 0.9, 0.9, seed=11, step=40)
    c = make_children(pop, 0.9, 0.9, seed=11, step=41)
    d = make_children(pop, 0.9, 0.9, seed=12, step=40)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    out = torch.zeros_like(pop)
    assert make_children(pop, 0.9, 0.9, seed=11, step=40, out=out) is out and torch.equal(out, a)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_children(random_population(3, 10, 0), 0.9, 0.9, 0, 0)  # S < 4
    with pytest.raises(ValueError):
        make_children(random_population(5, 10, 0).int(), 0.9, 0.9, 0, 0)
    with pytest.raises(ValueError):
        make_children(random_population(5, 10, 0), 1.5, 0.9, 0, 0)


def _ref_select(pop, e, kids, ke):
    inf = torch.tensor(float("inf"), dtype=e.dtype, device=e.device)
    e_, ke_ = torch.where(torch.isnan(e), inf, e), torch.where(torch.isnan(ke), inf, ke)
    take = ke_ < e_
    return torch.where(take[:, None], kids, pop), torch.where(take, ke_, e_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_and_best(dtype):
    S, D = 11, 1500
    pop = random_population(S, D, seed=21)
    kids = random_population(S, D, seed=22)
    g = torch.Generator().manual_seed(23)
    e = torch.randn(S, generator=g, dtype=torch.float64).to(dtype)
    ke = torch.randn(S, generator=g, dtype=torch.float64).to(dtype)
    ke[1] = float("nan")          # NaN child: never taken
    e[2] = float("nan")           # NaN parent counts as +inf: a finite child replaces it
    ke[4] = e[4]                  # tie keeps the parent
    ke[5] = float("-inf")
    ke[6] = e.nan_to_num(nan=0.0).min() - 1   # ... but -inf at 5 is the unique best
    e, ke = e.to(DEVICE), ke.to(DEVICE)
    e0, pop0 = e.clone(), pop.clone()
    want_pop, want_e = _ref_select(pop, e, kids, ke)
    out_pop, new_e, best = select_and_best(pop, e, kids, ke, block_size=512)
    assert out_pop is pop and torch.equal(pop, want_pop)
    assert torch.equal(e.nan_to_num(), e0.nan_to_num()) and torch.equal(e.isnan(), e0.isnan())  # untouched
    assert new_e.dtype == dtype and torch.equal(new_e, want_e)
    assert best.dim() == 0 and best.dtype == torch.int64 and best.item() == 5
    assert not torch.isnan(new_e).any()
    old = torch.where(torch.isnan(e0), torch.full_like(e0, float("inf")), e0)
    assert (new_e <= old).all()  # selection never raises a stored energy
    assert torch.equal(pop[1], pop0[1]) and torch.equal(pop[4], pop0[4]) and torch.equal(pop[2], kids[2])


def test_best_ties_and_all_nan():
    S, D = 6, 40
    pop, kids = random_population(S, D, 1), random_population(S, D, 2)
    e = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0], device=DEVICE)
    ke = torch.full((S,), float("nan"), device=DEVICE)
    pop0 = pop.clone()
    _, new_e, best = select_and_best(pop, e, kids, ke)
    assert best.item() == 1 and torch.equal(pop, pop0) and torch.equal(new_e, e)
    _, new_e, best = select_and_best(pop, torch.full_like(e, float("nan")), kids, ke)
    assert best.item() == 0 and torch.isinf(new_e).all() and torch.equal(pop, pop0)
