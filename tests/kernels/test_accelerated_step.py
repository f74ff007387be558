"""The whole EDropout iteration on backend="triton": one-launch evolution and the fused masked update,
checked against the reference path (runs in Triton's interpreter on CPU)."""
import copy

import pytest
import torch

from edropout import EDropout
from nets import randomise_bn, small_net


def _pair(name, x, **kw):
    model = randomise_bn(small_net(name)).train()
    pruners = []
    for backend in ("triton", "batched"):
        pruners.append(EDropout(copy.deepcopy(model), x[:2], population_size=4, seed=3, backend=backend, **kw))
    return pruners


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    # Adam turns noise-level gradients into ±lr steps; a larger eps keeps the network-level comparison
    # well-conditioned (the kernel's exactness for default eps is tested on fixed gradients)
    lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-3, amsgrad=True),
], ids=["adadelta", "sgd_nesterov", "adamw_amsgrad"])
def test_fused_update_equals_reference_masked_update(make, batch):
    x, y = batch
    fast, ref = _pair("resnet18", x, train_exported_after_convergence=False)
    state = torch.rand(fast.num_units, generator=torch.Generator().manual_seed(0)) < 0.6
    opts = []
    for pruner in (fast, ref):
        pruner.best_state = state.clone()
        pruner.converged = True  # train with this fixed state: no evolution, masked steps only
        opts.append(make(pruner.model.parameters()))
    for i in range(3):
        for pruner, opt in zip((fast, ref), opts):
            pruner.step(x[i:i + 8], y[i:i + 8], opt)
    # the update itself matches torch.optim to 1e-6 given identical gradients (test_masked_optimizer.py); through
    # a BatchNorm network, 1-ulp differences after one step change the next gradients slightly, so compare to
    # the tensor's scale (measured: up to 6e-6 after three steps)
    close = lambda a, b: (a - b).abs().max() <= 2e-5 * b.abs().max() + 1e-12
    for (name, a), b in zip(fast.model.named_parameters(), ref.model.parameters()):
        assert close(a.detach(), b.detach()), name
    # optimizer state: elements of pruned units exactly equal (both frozen); kept elements, which accumulate the
    # (network-amplified) gradient differences, to 1e-3 of the tensor's scale
    masks = ref.best_view.parameter_keeps
    for a, b in zip(fast.model.parameters(), ref.model.parameters()):
        frozen = ~masks[b].expand_as(b) if b in masks else torch.zeros_like(b, dtype=torch.bool)
        for key, value in opts[1].state[b].items():
            if torch.is_tensor(value) and value.shape == b.shape:
                mine = opts[0].state[a][key]
                assert torch.equal(mine[frozen], value[frozen]), key
                assert (mine - value)[~frozen].abs().max() <= 1e-3 * value.abs().max() + 1e-12, key


def test_triton_iteration_is_reproducible_resumable_and_freezes_pruned_weights(batch):
    x, y = batch
    runs = []
    for _ in range(2):
        model = randomise_bn(small_net("lenet")).train()
        pruner = EDropout(model, x[:2], population_size=4, seed=5, backend="triton")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        for _ in range(2):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            pruner.step(x, y, opt)
            names = {p: n for n, p in model.named_parameters()}
            for param, keep in pruner.best_view.parameter_keeps.items():
                frozen = ~keep.expand_as(param)
                assert torch.equal(param.detach()[frozen], before[names[param]][frozen])
        runs.append((model, pruner, opt))
    (m1, p1, o1), (m2, p2, o2) = runs
    assert torch.equal(p1.population, p2.population) and torch.equal(p1.stored_energies, p2.stored_energies)
    # resume: a fresh pruner loaded from the state dict continues exactly like the original
    saved = copy.deepcopy((m1.state_dict(), o1.state_dict(), p1.state_dict()))
    m3 = small_net("lenet").train()
    m3.load_state_dict(saved[0])
    p3 = EDropout(m3, x[:2], population_size=4, seed=5, backend="triton")
    o3 = torch.optim.SGD(m3.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    o3.load_state_dict(saved[1])
    p3.load_state_dict(saved[2])
    p1.step(x, y, o1)
    p3.step(x, y, o3)
    assert torch.equal(p1.population, p3.population)
    assert torch.allclose(p1.stored_energies, p3.stored_energies)
