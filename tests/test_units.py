"""Unit discovery: coupled channels share a bit, every state is physically removable, counts are exact."""
import pytest
import torch
import torch.nn as nn

from edropout import EDropout, discover_units
from nets import NETS, randomise_bn, small_net


def _random_states(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(n, d, generator=g) < torch.rand(n, 1, generator=g).clamp(0.3, 0.9)
    states[0] = True
    return states


@pytest.mark.parametrize("name", NETS + ("concat",))
def test_masked_equals_exported(name, batch):
    x, _ = batch
    model = randomise_bn(small_net(name)).eval()
    pruner = EDropout(model, x[:2])
    for state in _random_states(4, pruner.num_units, seed=len(name)):
        # a state that empties a whole group cannot be exported; keep one unit per group
        for g in pruner.units.groups:
            state[g.first_bit] = True
        pruner.best_state = state
        small = pruner.export().eval()
        with torch.no_grad(), pruner.apply():
            masked = model(x)
        with torch.no_grad():
            exported = small(x)
        assert (masked - exported).abs().max() <= 1e-5
        assert sum(p.numel() for p in small.parameters()) == int(pruner.units.kept_parameters(state[None])[0])
        if not state.all():
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_residual_channels_share_one_bit(batch):
    model = small_net("resnet18")
    units = discover_units(model, batch[0][:2])
    stem_group = next(g for g in units.groups if "stem.0" in g.members)
    # the stem's channels are added to the first stage's residual outputs: one group, one bit per channel
    assert {"layers.0.conv2", "layers.1.conv2"} <= set(stem_group.members)
    assert stem_group.size == 4
    assert "fc" not in {g.module_name for g in units.groups}


def test_concat_branches_are_separate_groups(batch):
    units = discover_units(small_net("concat"), batch[0][:2])
    roots = {g.module_name: g.size for g in units.groups}
    assert roots == {"a": 5, "b": 3, "c": 6}


def test_unit_parameters_match_single_removals(batch):
    model = small_net("lenet")
    units = discover_units(model, batch[0][:2])
    conv1 = model.features[0]
    bit = next(g for g in units.groups if g.module_name == "features.0").first_bit
    # one conv1 filter: its 5x5 weights and bias, and conv2's input slice
    expected = conv1.weight[0].numel() + 1 + model.features[3].weight[:, 0].numel()
    assert int(units.unit_parameters[bit]) == expected
    assert units.total_parameters == sum(p.numel() for p in model.parameters())


def test_no_prunable_units_is_a_rejected_with_a_clear_message(batch):
    with pytest.raises(ValueError, match="no prunable units"):
        EDropout(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), batch[0][:2])


def test_unknown_ignored_layer_is_a_rejected_with_a_clear_message(batch):
    with pytest.raises(ValueError, match="not a module of this model"):
        discover_units(small_net("mlp"), batch[0][:2], ignored_layers=["nope"])


def test_ignored_layers_keep_their_outputs(batch):
    units = discover_units(small_net("mlp"), batch[0][:2], ignored_layers=["net.1"])
    assert [g.module_name for g in units.groups] == ["net.3"]


def test_tracing_failure_falls_back_to_per_layer_bits(batch, monkeypatch):
    import torch_pruning as tp

    def fail(*args, **kwargs):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fail)
    model = small_net("lenet")
    with pytest.warns(RuntimeWarning, match="falling back"):
        pruner = EDropout(model, batch[0][:2])
    assert not pruner.units.traced
    assert pruner.num_units == 4 + 8 + 32 + 16
    with pytest.raises(RuntimeError, match="export"):
        pruner.export()
