"""The EDropout training step, finalize, checkpoint/resume, and clear errors for bad input."""
import copy

import pytest
import torch

from edropout import EDropout
from nets import randomise_bn, small_net
from tolerances import assert_close, tol

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5),
}


def _pruner(name="resnet18", x=None, **kw):
    model = randomise_bn(small_net(name)).train()
    return model, EDropout(model, x[:2], population_size=6, seed=0, **kw)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_step_leaves_pruned_weights_and_state_unchanged(opt, batch):
    x, y = batch
    model, pruner = _pruner(x=x, min_iterations=1000)
    optimizer = OPTIMIZERS[opt](model.parameters())
    for i in range(4):
        # the best state (and so the mask) may change between steps; check each step against its own mask
        params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = copy.deepcopy(optimizer.state_dict()["state"])
        pruner.step(x, y, optimizer)
        masks = pruner.best_view.parameter_keeps
        names = {p: n for n, p in model.named_parameters()}
        positions = {p: i for i, p in enumerate(model.parameters())}
        assert not pruner.best_state.all()
        for param, keep in masks.items():
            frozen = ~keep.expand_as(param)
            before = params_before[names[param]]
            assert torch.equal(param.detach()[frozen], before[frozen]), names[param]
            if (~frozen).any():
                assert not torch.equal(param.detach()[~frozen], before[~frozen]), names[param]
            idx = positions[param]
            for key, value in optimizer.state_dict()["state"].get(idx, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    old = state_before.get(idx, {}).get(key)
                    expected = torch.zeros_like(value) if old is None else old
                    assert torch.equal(value[frozen], expected[frozen]), (names[param], key)


def test_finalize_zeroes_pruned_weights_and_stops_evolving(batch):
    x, y = batch
    model, pruner = _pruner(x=x, min_iterations=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.step(x, y, optimizer)
    pruner.finalize()
    population = pruner.population.clone()
    for _ in range(2):
        pruner.step(x, y, optimizer)
    assert torch.equal(population, pruner.population)
    for param, keep in pruner.best_view.parameter_keeps.items():
        assert torch.count_nonzero(param.detach()[~keep.expand_as(param)]) == 0


def test_converges_after_min_iterations_and_patience(batch):
    x, y = batch
    model, pruner = _pruner("lenet", x=x, min_iterations=3, patience=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    infos = [pruner.step(x, y, optimizer) for _ in range(40)]
    assert pruner.converged
    first = next(i.iteration for i in infos if i.converged)
    assert first >= 3
    assert 0.0 < infos[-1].pruning_rate < 1.0
    assert infos[-1].pruning_rate == pytest.approx(float(pruner.units.pruning_rate(pruner.best_state[None])[0]))


def test_best_state_has_the_lowest_stored_energy(batch):
    x, y = batch
    model, pruner = _pruner("lenet", x=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    previous = None
    for _ in range(5):
        info = pruner.step(x, y, optimizer)
        best = int(pruner.stored_energies.argmin())
        assert torch.equal(pruner.best_state, pruner.population[best])
        assert info.best_energy == pytest.approx(float(pruner.stored_energies.min()))
        if previous is not None:
            assert info.best_energy <= previous + 1e-7  # stored energies never rise without re-scoring
        previous = info.best_energy


def _run(steps, x, y, resume_from=None):
    model, pruner = _pruner("resnet18", x=x, min_iterations=1000)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, weight_decay=1e-5)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        pruner.load_state_dict(resume_from["pruner"])
    for _ in range(steps):
        pruner.step(x, y, optimizer)
    return model, pruner, optimizer


def test_same_seed_same_run(batch):
    x, y = batch
    m1, p1, _ = _run(3, x, y)
    m2, p2, _ = _run(3, x, y)
    assert torch.equal(p1.population, p2.population) and torch.equal(p1.stored_energies, p2.stored_energies)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_state_dict_round_trip_resumes_identically(batch):
    x, y = batch
    full_model, full_pruner, _ = _run(6, x, y)
    model, pruner, optimizer = _run(3, x, y)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "pruner": pruner.state_dict()})
    resumed_model, resumed_pruner, _ = _run(3, x, y, resume_from=saved)
    assert torch.equal(full_pruner.population, resumed_pruner.population)
    assert torch.equal(full_pruner.stored_energies, resumed_pruner.stored_energies)
    assert full_pruner.iteration == resumed_pruner.iteration == 6
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert_close(a.float(), b.float(), rtol=0.0)


def test_load_state_dict_from_a_different_model_is_rejected(batch):
    x, _ = batch
    _, lenet = _pruner("lenet", x=x)
    _, resnet = _pruner("resnet18", x=x)
    with pytest.raises(ValueError, match="same model"):
        resnet.load_state_dict(lenet.state_dict())


def test_rescoring_parents_scores_both(batch):
    x, y = batch
    model, pruner = _pruner("lenet", x=x, rescore_parents=True)
    pruner.evolve(x, y)
    pruner.evolve(x[:6], y[:6])
    # every stored energy is the energy on the latest batch (parents re-scored, or the child that beat them)
    assert_close(pruner.stored_energies, pruner.energies(x[:6], y[:6]))
    without = _pruner("lenet", x=x)[1]
    without.evolve(x, y)
    without.evolve(x[:6], y[:6])
    assert not torch.allclose(without.stored_energies, without.energies(x[:6], y[:6]), **tol(torch.float32))


@pytest.mark.parametrize("kwargs, match", [
    ({"population_size": 3}, ">= 4"),
    ({"init_keep": 1.2}, r"\[0, 1\]"),
    ({"mutation_factor": -0.1}, r"\[0, 1\]"),
    ({"crossover_rate": 2.0}, r"\[0, 1\]"),
    ({"energy": "entropy"}, "unknown energy"),
    ({"backend": "cuda-magic"}, "unknown backend"),
])
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, match, batch):
    with pytest.raises(ValueError, match=match):
        EDropout(small_net("lenet"), batch[0][:2], **kwargs)


def test_bad_batches_are_rejected_with_a_clear_message(batch):
    x, y = batch
    model, pruner = _pruner("lenet", x=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="same batch size"):
        pruner.step(x, y[:-1], optimizer)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        pruner.energies(x, y + 10)
    with pytest.raises(ValueError, match="integer class labels"):
        pruner.energies(x, y.float())
    with pytest.raises(TypeError, match="example_inputs"):
        EDropout(model, None)


def test_full_network_restores_frozen_weights_only_inside_the_context(batch):
    x, y = batch
    model, pruner = _pruner("lenet", x=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.step(x, y, optimizer)
    model.eval()
    with torch.no_grad():
        before = model(x)  # every unit kept, pruned weights at their frozen values
        pruner.finalize()
        with pruner.full_network():
            full = model(x)
        with pruner.apply():
            pruned = model(x)
        zeroed = model(x)
    assert_close(full, before, atol=1e-8)
    assert not torch.allclose(full, pruned)
    assert_close(zeroed, pruned)  # weights zeroed again: all-kept equals the pruned network
    restored = EDropout(small_net("lenet"), x[:2], population_size=6)
    restored.load_state_dict(pruner.state_dict())
    assert restored.pruned_values.keys() == pruner.pruned_values.keys()
