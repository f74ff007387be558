"""Magnitude filter pruning over EDropout's unit groups, removed through the same export path."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edropout.export import export_pruned
from edropout.magnitude_pruning import magnitude_state, magnitude_state_for_rate, unit_norms
from edropout.regularizers import apply_batch_bridgeout, remove_bridgeout
from edropout.units import discover_units
from tolerances import assert_close


class ResNetLike(nn.Module):
    """conv1/bn1 and conv3/bn3 meet in a residual add (coupled); conv2 and conv4 are not coupled."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(a)))))
        c = torch.relu(a + b)
        return self.fc(torch.relu(self.bn4(self.conv4(c))).mean((2, 3)))


def _resnet_like():
    torch.manual_seed(0)
    model = ResNetLike()
    g = torch.Generator().manual_seed(1)
    for bn in (model.bn1, model.bn2, model.bn3, model.bn4):  # non-trivial BN so masking bugs show
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
            bn.running_mean.normal_(generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def _units(model):
    return discover_units(model, torch.randn(2, 3, 8, 8))


def _bits(units, name):
    group = next(g for g in units.groups if g.module_name == name)
    return slice(group.first_bit, group.first_bit + group.size)


def test_magnitude_state_keeps_the_largest_filters_of_each_group():
    model = _resnet_like()
    units = _units(model)
    state = magnitude_state(model, units, 0.25, norm="l2")
    norms = model.conv2.weight.detach().flatten(1).norm(dim=1)
    keep = state[_bits(units, "conv2")]
    assert keep.sum() == 6 and norms[keep].min() >= norms[~keep].max()
    assert state[_bits(units, "conv4")].sum() == 9  # round(0.25 * 12) = 3 removed
    assert all(state[g.first_bit:g.first_bit + g.size].sum() == 1
               for g in units.groups for state in [magnitude_state(model, units, 1.0)])
    l1 = unit_norms(model, units, "l1")[_bits(units, "conv2")]
    assert_close(l1, model.conv2.weight.detach().abs().flatten(1).sum(1).double(), dtype=torch.float32, atol=1e-8)
    with pytest.raises(ValueError, match="norm"):
        unit_norms(model, units, "linf")
    with pytest.raises(ValueError, match="fraction"):
        magnitude_state(model, units, 1.5)


def test_coupled_layers_are_ranked_by_joint_l2_norm():
    """(n_conv1, n_conv3) per channel: ch0 (3, 0.1) has joint L2 3.0 but summed norm 3.1; ch1 (2, 2)
    has joint L2 2.83 but sum 4.0. Removing 4 of 8 must drop ch1 (not ch0) besides ch2-4."""
    model = _resnet_like()
    pairs = [(3.0, 0.1), (2.0, 2.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (4.0, 4.0), (4.0, 4.0), (4.0, 4.0)]
    with torch.no_grad():
        for c, (n1, n3) in enumerate(pairs):
            model.conv1.weight[c] *= n1 / model.conv1.weight[c].norm()
            model.conv3.weight[c] *= n3 / model.conv3.weight[c].norm()
    units = _units(model)
    group = next(g for g in units.groups if "conv1" in g.members and "bn1" in g.members)
    assert {"conv3", "bn3"} <= set(group.members)  # one shared decision across the residual add
    state = magnitude_state(model, units, 0.5, norm="l2")
    assert state[group.first_bit:group.first_bit + group.size].tolist() == [True, False, False, False, False, True, True, True]


def test_magnitude_pruning_is_physically_removed_and_matches_the_masked_model():
    model = _resnet_like()
    units = _units(model)
    x = torch.randn(4, 3, 8, 8)
    state = magnitude_state(model, units, 0.5)
    pruned = export_pruned(model, units, state, x[:2]).eval()
    assert sum(p.numel() for p in pruned.parameters()) == int(units.kept_parameters(state[None])[0])
    assert pruned.conv2.out_channels == 4 and model.conv2.out_channels == 8  # the original is untouched
    from edropout.masking import masked
    with torch.no_grad(), masked(model, units, state):
        want = model(x)
    with torch.no_grad():
        assert_close(pruned(x), want)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.7])
def test_state_for_rate_matches_the_requested_share(rate):
    model = _resnet_like()
    units = _units(model)
    state = magnitude_state_for_rate(model, units, rate)
    assert abs(float(units.pruning_rate(state[None])[0]) - rate) < 0.1


def test_batch_bridgeout_then_magnitude_pruning_pipeline():
    model = _resnet_like().train()
    apply_batch_bridgeout(model)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    remove_bridgeout(model)
    units = discover_units(model, torch.randn(2, 3, 8, 8), ignored_layers=["conv4"])
    pruned = export_pruned(model.eval(), units, magnitude_state(model, units, 0.25, "l2"), torch.randn(2, 3, 8, 8))
    assert pruned.conv4.out_channels == 12 and pruned.conv2.out_channels == 6
    assert pruned.fc.out_features == 5
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_conv_filter_units_prune_conv_filters_only():
    from edropout.magnitude_pruning import conv_filter_count, conv_filter_units
    from edropout.app.models import build_model

    torch.manual_seed(0)
    model = build_model("alexnet", width=2).eval()
    example = torch.randn(2, 1, 28, 28)
    units = conv_filter_units(model, example)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {g.module_name for g in units.groups} == convs
    small = export_pruned(model, units, magnitude_state(model, units, 0.5, norm="l2"), example)
    linears = [(m.out_features) for m in small.modules() if isinstance(m, nn.Linear)]
    assert linears == [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]  # fc widths kept
    assert conv_filter_count(small) == sum(c.out_channels - int(0.5 * c.out_channels + 0.5)
                                           for c in model.modules() if isinstance(c, nn.Conv2d))
