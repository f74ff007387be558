"""population_energies (margin and cross-entropy per member, one launch) against float64 references."""

import warnings

import pytest
import torch

from edropout_kernels import population_energies
from kernel_helpers import DEVICE
from tolerances import assert_close, tol

NO_DOT = dict(rtol=1e-4, atol=1e-4)  # no tl.dot here, so no tf32 on a GPU either: the interpreter's fp32 bound


def reference(logits, targets, members):
    """float64 margin (max_{j != y} z_j - z_y) and cross-entropy, each averaged per member."""
    batch = targets.shape[0]
    z = logits.double().view(members, batch, -1)
    idx = targets.view(1, batch, 1).expand(members, batch, 1)
    z_y = z.gather(2, idx).squeeze(2)
    others = z.scatter(2, idx, float("-inf")).amax(2)
    ce = torch.logsumexp(z, 2) - z_y
    return (others - z_y).mean(1), ce.mean(1)


@pytest.mark.parametrize("members,batch,classes,scale", [
    (4, 5, 10, 3.0),
    (1, 1, 37, 3.0),
    (4, 33, 1000, 3.0),
    (4, 3, 2500, 1.0),     # more classes than one tile: the streaming path
    (4, 5, 10, 3e4),       # huge logits: logsumexp must stay finite
])
def test_population_energies_match_reference(members, batch, classes, scale):
    gen = torch.Generator().manual_seed(members + batch + classes)
    logits = (torch.randn(members * batch, classes, generator=gen) * scale).to(DEVICE)
    targets = torch.randint(0, classes, (batch,), generator=gen).to(DEVICE)
    margin, ce = population_energies(logits, targets, members)
    assert margin.shape == ce.shape == (members,)
    assert margin.dtype == ce.dtype == torch.float32
    ref_margin, ref_ce = reference(logits, targets, members)
    assert torch.isfinite(margin).all() and torch.isfinite(ce).all()
    assert_close(margin, ref_margin, path="kernel", scaled=True, **NO_DOT)
    assert_close(ce, ref_ce, path="kernel", scaled=True, **NO_DOT)
    # Negative control: other targets give other energies.
    other_m, other_ce = reference(logits, (targets + 1) % classes, members)
    bound = tol(torch.float32, DEVICE, "kernel", **NO_DOT)
    assert not torch.allclose(other_m, ref_margin, rtol=bound["rtol"], atol=bound["atol"] * max(1.0, scale))


def test_population_energies_half_precision_logits():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(4 * 6, 37, generator=gen) * 3).to(DEVICE).to(torch.bfloat16)
    targets = torch.randint(0, 37, (6,), generator=gen).to(DEVICE)
    margin, ce = population_energies(logits, targets, 4)
    ref_margin, ref_ce = reference(logits.float(), targets, 4)
    assert_close(margin, ref_margin, path="kernel", **NO_DOT)  # float32 math on bfloat16 inputs
    assert_close(ce, ref_ce, path="kernel", **NO_DOT)


def test_population_energies_non_finite_members_are_plus_inf():
    gen = torch.Generator().manual_seed(9)
    members, batch, classes = 5, 3, 10
    logits = torch.randn(members * batch, classes, generator=gen)
    targets = torch.tensor([2, 7, 0])
    logits[1, 5] = float("nan")             # member 0: NaN in a non-target logit
    logits[batch + 2, 0] = float("nan")     # member 1: NaN target logit
    logits[2 * batch, 4] = float("inf")     # member 2: +inf logit
    logits[3 * batch + 1, :] = float("-inf")
    logits[3 * batch + 1, 7] = 0.0          # member 3: every other logit -inf, margin -inf
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy sees log(0) etc.
        margin, ce = population_energies(logits, targets, members)
    assert not torch.isnan(margin).any() and not torch.isnan(ce).any()
    assert torch.isinf(margin[:4]).all() and (margin[:4] > 0).all()
    assert torch.isinf(ce[:3]).all() and (ce[:3] > 0).all()
    ref_margin, ref_ce = reference(logits, targets, members)
    assert_close(ce[3:], ref_ce[3:], path="kernel", **NO_DOT)
    assert_close(margin[4:], ref_margin[4:], path="kernel", **NO_DOT)


def test_population_energies_rejects_bad_shapes():
    logits = torch.randn(6, 4, device=DEVICE)
    with pytest.raises(ValueError):
        population_energies(logits, torch.zeros(3, dtype=torch.long, device=DEVICE), 4)
    with pytest.raises(ValueError):
        population_energies(logits, torch.zeros(2, dtype=torch.long, device=DEVICE), 2)
    with pytest.raises(ValueError):
        population_energies(logits, torch.zeros(3, device=DEVICE), 2)
