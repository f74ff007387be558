"""Masking semantics and the two scoring backends: same energies, model untouched, BatchNorm per member."""
import copy

import pytest
import torch

from edropout import EDropout
from edropout.masking import scoring
from nets import NETS, randomise_bn, small_net
from tolerances import assert_close


def _states(pruner, seed=3):
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(6, pruner.num_units, generator=g) < 0.6
    states[0] = True
    states[1] = False
    return states


@pytest.mark.parametrize("name", NETS + ("concat",))
@pytest.mark.parametrize("eval_mode", [False, True])
def test_reference_equals_batched(name, eval_mode, batch):
    x, y = batch
    model = randomise_bn(small_net(name))
    pruner = EDropout(model, x[:2], backend="reference", score_in_eval_mode=eval_mode)
    states = _states(pruner)
    ref = pruner.score_states(states, x, y)
    pruner.backend = "batched"
    fast = pruner.score_states(states, x, y)
    pruner.max_members_per_pass = 4
    chunked = pruner.score_states(states, x, y)
    assert torch.isfinite(ref).all()
    assert_close(ref, fast)
    assert_close(fast, chunked)
    assert len(set(ref.tolist())) > 2  # different states really score differently


@pytest.mark.parametrize("backend", ["reference", "batched"])
def test_scoring_leaves_model_untouched(backend, batch):
    x, y = batch
    model = randomise_bn(small_net("resnet18")).train()
    before = copy.deepcopy(model.state_dict())
    pruner = EDropout(model, x[:2], backend=backend)
    pruner.energies(x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_pruned_unit_is_exactly_zero_after_its_batchnorm(batch):
    x, _ = batch
    model = randomise_bn(small_net("resnet18"))
    pruner = EDropout(model, x[:2])
    group = next(g for g in pruner.units.groups if g.module_name == "layers.0.conv1")
    state = torch.ones(pruner.num_units, dtype=torch.bool)
    state[group.first_bit + 1] = False
    seen = {}
    # what the next layer reads (hooks registered here run before the masking hook, so look downstream)
    model.layers[0].conv2.register_forward_pre_hook(lambda m, i: seen.setdefault("bn", i[0]))
    with torch.no_grad(), scoring(model, pruner.units, state[None]):
        model(x)
    out = seen["bn"]
    assert torch.count_nonzero(out[:, 1]) == 0  # despite a non-zero BatchNorm bias
    assert torch.count_nonzero(out[:, 0]) > 0


def test_batchnorm_uses_each_members_own_statistics(batch):
    x, y = batch
    model = randomise_bn(small_net("resnet18"))
    pruner = EDropout(model, x[:2], backend="batched")
    states = _states(pruner)
    together = pruner.score_states(states, x, y)
    alone = torch.stack([pruner.score_states(s[None], x, y)[0] for s in states])
    assert_close(together, alone)


def test_scoring_is_deterministic_with_dropout(batch):
    x, y = batch
    pruner = EDropout(small_net("alexnet").train(), x[:2], backend="batched")
    assert torch.equal(pruner.energies(x, y), pruner.energies(x, y))


def test_energy_choices_and_callable(batch):
    x, y = batch
    model = small_net("lenet")
    margin = EDropout(model, x[:2], energy="margin").energies(x, y)
    ce = EDropout(model, x[:2], energy="cross_entropy").energies(x, y)
    assert not torch.allclose(margin, ce)
    assert (ce > 0).all()
    calls = []

    def custom(logits, targets):
        calls.append(logits.shape)
        out = -logits.gather(1, targets[:, None]).squeeze(1)
        out[0] = float("nan")  # a non-finite member energy counts as +inf
        return out

    energies = EDropout(model, x[:2], energy=custom).energies(x, y)
    assert torch.isinf(energies[0]) and energies[0] > 0
    assert torch.isfinite(energies[1:]).all()
    assert calls


def test_margin_energy_formula():
    from edropout.energy import margin_energy

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    assert torch.allclose(margin_energy(logits, torch.tensor([1, 0])), torch.tensor([-1.0, 3.5]))
