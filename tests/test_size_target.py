"""The size target: exact size of exported states, seeded repair of a population to the target, the energy
penalty alternative, and EDropout runs whose exported network removes the requested share."""
import pytest
import torch
import torch.nn as nn

from edropout import EDropout
from edropout import evolution as evo
from edropout.export import export_pruned
from edropout.flops import count_flops
from edropout.magnitude_pruning import magnitude_state_for_rate
from edropout.size_target import TOLERANCE, SizeMeasure, SizeTarget
from edropout.units import discover_units
from nets import randomise_bn, small_net
from tolerances import assert_close


class BranchNet(nn.Module):
    """Residual adds (one around a single conv, so its input and output channels share bits), a depthwise conv,
    a concat of a residual stream with two branches, and a hidden Linear layer after a flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(6)
        self.inner = nn.Conv2d(6, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 3, 3, padding=1)
        self.mix = nn.Conv2d(13, 5, 3, stride=2, padding=1)
        self.hidden = nn.Linear(5 * 4 * 4, 7)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        h = torch.relu(self.stem_bn(self.stem(x)))
        h = h + torch.relu(self.inner(h))
        h = h + self.depthwise(h)
        h = torch.cat([torch.relu(self.left(h)), h, torch.tanh(self.right(h))], dim=1)
        h = torch.relu(self.mix(h)).flatten(1)
        return self.fc(torch.relu(self.hidden(h)))


NETS = ("resnet18", "squeezenet", "branch")


def _net(name, seed=0):
    if name == "branch":
        torch.manual_seed(seed)
        return randomise_bn(BranchNet())
    return randomise_bn(small_net(name, seed))


def _states(units, count, keep, seed):
    g = torch.Generator().manual_seed(seed)
    return evo.keep_one_per_group(evo.initial_population(count, units.num_units, keep, g), units.group_of_unit, g)


def _exported_share(model, small, metric, x):
    """Share of trainable parameters or of FLOPs that the exported copy ``small`` lost: counted on the modules."""
    if metric == "flops":
        return 1.0 - count_flops(small, x) / count_flops(model, x)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return 1.0 - count(small) / count(model)


def test_branch_net_has_the_couplings_it_is_meant_to_have(batch):
    x, _ = batch
    units = discover_units(_net("branch"), x[:2])
    stream = next(g for g in units.groups if "inner" in g.members)
    assert {"stem", "stem_bn", "inner", "depthwise", "left", "right", "mix"} <= set(stream.members)  # adds share bits
    inner = next(pa for pa in units.param_axes if pa.name == "inner.weight")
    assert torch.equal(inner.axes[0], inner.axes[1])  # x + conv(x): one bit on both axes of one weight
    assert any(pa.name == "hidden.weight" and 1 in pa.axes for pa in units.param_axes)


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("name", NETS)
def test_measure_equals_what_export_removes(name, metric, batch):
    x, _ = batch
    model = _net(name)
    units = discover_units(model, x[:2])
    states = _states(units, 4, 0.6, seed=3)
    measure = SizeMeasure(units, metric, model, x[:2])
    shares = measure.share_removed(states)
    for state, share in zip(states, shares):
        small = export_pruned(model, units, state, x[:2])
        assert float(share) == pytest.approx(_exported_share(model, small, metric, x[:1]), abs=1e-12)


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_flip_costs_are_the_exact_change_of_one_flip(metric, batch):
    x, _ = batch
    model = _net("branch")
    units = discover_units(model, x[:2])
    measure = SizeMeasure(units, metric, model, x[:2])
    state = _states(units, 1, 0.5, seed=5)[0]
    costs = measure.flip_costs(state[None])[0]
    dense = count_flops(model, x[:1]) if metric == "flops" else sum(p.numel() for p in model.parameters())
    kept = lambda s: (1 - _exported_share(model, export_pruned(model, units, s, x[:2]), metric, x[:1])) * dense  # noqa
    base = kept(state)
    for bit in torch.randperm(units.num_units, generator=torch.Generator().manual_seed(0))[:12].tolist():
        flipped = state.clone()
        flipped[bit] = ~flipped[bit]
        group = units.groups[int(units.group_of_unit[bit])]
        if not flipped[group.first_bit:group.first_bit + group.size].any():
            continue  # an empty group cannot be exported
        assert float(costs[bit]) == pytest.approx(abs(kept(flipped) - base), abs=1e-6), bit


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("name", NETS)
def test_repair_brings_every_state_to_the_target(name, target, metric, batch):
    x, _ = batch
    model = _net(name)
    units = discover_units(model, x[:2])
    size = SizeTarget(units, target, metric, model=model, example_inputs=x[:2])
    states = torch.cat([_states(units, 6, 0.2, seed=1), _states(units, 6, 0.9, seed=2)])
    repaired = size.repair(states, torch.Generator().manual_seed(7))
    shares = size.measure.share_removed(repaired)
    inside = (shares - target).abs() <= TOLERANCE + 1e-12
    if name != "branch":  # its units are 1-2 % of the net each, so the band is not always reachable
        assert inside.all(), shares
    # outside the band only when no single flip would land closer to the target
    costs = size.measure.flip_costs(repaired) / size.measure.total
    sole = torch.stack([repaired[:, units.group_of_unit == g].sum(1) == 1 for g in units.group_of_unit.tolist()], 1)
    allowed = torch.where((shares > target).unsqueeze(1), ~repaired, repaired & ~sole)
    closer = allowed & (costs < 2 * (shares - target).abs().unsqueeze(1))
    assert (inside | ~closer.any(dim=1)).all(), shares
    small = export_pruned(model, units, repaired[0], x[:2])
    assert _exported_share(model, small, metric, x[:1]) == pytest.approx(float(shares[0]), abs=1e-12)


def test_repair_never_empties_a_group_and_leaves_states_on_target_alone(batch):
    x, _ = batch
    model = _net("resnet18")
    units = discover_units(model, x[:2])
    size = SizeTarget(units, 0.95, model=model, example_inputs=x[:2])
    repaired = size.repair(_states(units, 16, 0.9, seed=4), torch.Generator().manual_seed(0))
    for group in units.groups:
        assert repaired[:, group.first_bit:group.first_bit + group.size].any(dim=1).all(), group.module_name
    again = size.repair(repaired, torch.Generator().manual_seed(1))
    assert torch.equal(again, repaired)


def test_repair_is_a_function_of_the_generator(batch):
    x, _ = batch
    model = _net("squeezenet")
    units = discover_units(model, x[:2])
    size = SizeTarget(units, 0.5, model=model, example_inputs=x[:2])
    states = _states(units, 8, 0.5, seed=0)
    one, two, other = (size.repair(states, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(one, two) and not torch.equal(one, other)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": 1.0}, "must lie in"), ({"target": -0.1}, "must lie in"),
    ({"target": 0.5, "target_metric": "bytes"}, "target_metric must be one of"),
    ({"target_metric": "bytes"}, "target_metric must be one of"),
    ({"target": 0.5, "target_penalty": 0.0}, "positive weight"),
    ({"target": 0.99, "ignored_layers": ["layers.7.conv1"]}, "beyond what pruning can remove"),
])
def test_bad_targets_are_rejected_with_a_clear_message(kwargs, match, batch):
    x, _ = batch
    with pytest.raises(ValueError, match=match):
        EDropout(_net("resnet18"), x[:2], population_size=4, **kwargs)


def test_without_a_target_the_evolution_is_the_papers(batch):
    """The same populations, generation by generation, as the evolution operators driven by a seeded generator."""
    x, y = batch
    model = _net("resnet18")
    pruner = EDropout(model, x[:2], population_size=6, seed=11, min_iterations=1000)
    g = torch.Generator().manual_seed(11)
    group = pruner.units.group_of_unit
    population = evo.keep_one_per_group(evo.initial_population(6, pruner.num_units, 0.5, g), group, g)
    assert torch.equal(pruner.population, population)
    energies = None
    for _ in range(4):
        draws = evo.draw_randoms(6, pruner.num_units, g)
        children = evo.keep_one_per_group(evo.make_children(population, draws, 0.9, 0.9), group, g)
        if energies is None:
            energies = pruner.score_states(population, x, y)
        population, energies = evo.select(population, energies, children, pruner.score_states(children, x, y))
        pruner.evolve(x, y)
        assert torch.equal(pruner.population, population)
    assert pruner.target is None and pruner.size_target is None


def _converged_run(name, target, metric, x, y, **kw):
    model = _net(name).train()
    pruner = EDropout(model, x[:2], population_size=6, seed=2, min_iterations=6, patience=3, target=target,
                      target_metric=metric, **kw)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = [pruner.population.clone()]
    while not pruner.converged and pruner.iteration < 60:
        pruner.step(x, y, optimizer)
        seen.append(pruner.population.clone())
    assert pruner.converged
    return model, pruner, torch.cat(seen)


@pytest.mark.parametrize("name, metric", [("resnet18", "params"), ("squeezenet", "params"), ("branch", "params"),
                                          ("resnet18", "flops")])
def test_converged_pruner_exports_the_target_share(name, metric, batch):
    x, y = batch
    model, pruner, seen = _converged_run(name, 0.5, metric, x, y)
    bound = 0.02 if name == "branch" else TOLERANCE  # the branch net's units are 1-2 % of it each
    assert (pruner.size_target.measure.share_removed(seen) - 0.5).abs().max() <= bound + 1e-12
    achieved = _exported_share(model, pruner.export(), metric, x[:1])
    assert abs(achieved - 0.5) <= 0.02
    assert pruner.removed_share == pytest.approx(achieved, abs=1e-12)
    assert pruner.units_kept_share == pytest.approx(float(pruner.best_state.float().mean()))


def test_resume_with_a_target_is_exact(batch):
    x, y = batch

    def run(split):
        torch.manual_seed(0)
        model = _net("squeezenet").train()
        make = lambda: EDropout(model, x[:2], population_size=5, seed=4, min_iterations=100, target=0.6)  # noqa
        pruner, optimizer = make(), torch.optim.SGD(model.parameters(), lr=0.05)
        populations = []
        for i in range(6):
            if i == split:
                state = pruner.state_dict()
                pruner = make()
                pruner.load_state_dict(state)
            pruner.step(x, y, optimizer)
            populations.append(pruner.population.clone())
        return populations

    for a, b in zip(run(split=None), run(split=3)):
        assert torch.equal(a, b)


def test_a_checkpoint_under_another_target_is_rejected(batch):
    x, _ = batch
    model = _net("squeezenet")
    state = EDropout(model, x[:2], population_size=4, target=0.5).state_dict()
    with pytest.raises(ValueError, match="size target"):
        EDropout(model, x[:2], population_size=4, target=0.4).load_state_dict(state)
    with pytest.raises(ValueError, match="size target"):
        EDropout(model, x[:2], population_size=4).load_state_dict(state)


def test_penalty_adds_the_weighted_distance_outside_the_band_and_does_not_repair(batch):
    x, y = batch
    model = _net("resnet18")
    plain = EDropout(model, x[:2], population_size=6, seed=1)
    penalised = EDropout(model, x[:2], population_size=6, seed=1, target=0.5, target_penalty=3.0)
    assert torch.equal(plain.population, penalised.population)
    states = torch.cat([plain.population, _states(plain.units, 2, 0.72, seed=9)])
    share = plain.units.pruning_rate(states)  # counted by the units, not by the size-target module
    expected = plain.score_states(states, x, y).double() + 3.0 * ((share - 0.5).abs() - TOLERANCE).clamp(min=0)
    assert_close(penalised.score_states(states, x, y), expected)  # float32 energies


def test_magnitude_pruning_matches_a_flops_share(batch):
    x, _ = batch
    model = _net("resnet18")
    units = discover_units(model, x[:2])
    state = magnitude_state_for_rate(model, units, 0.5, metric="flops", example_inputs=x[:2])
    small = export_pruned(model, units, state, x[:2])
    assert abs(_exported_share(model, small, "flops", x[:1]) - 0.5) < 0.05


def test_count_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 2, 8, 8)
    by_hand = 2 * (2 * 9) * 3 * 64 + 2 * 9 * 3 * 16 + 2 * 48 * 5  # 2 × inputs per output × outputs, per layer
    assert count_flops(model, x) == by_hand
