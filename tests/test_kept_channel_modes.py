"""Kept-channel training follows the user's module modes at call time, including an fx-wrapped functional that
takes ``training`` (torchvision's ``stochastic_depth`` pattern), and draws exactly the random numbers of the
masked dense forward, on the first call (which traces and shape-infers the model) and on later ones. float64,
1e-10 on logits, gradients and buffers; the random state after the call must be identical."""
import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

from edropout import EDropout
from edropout.backends import CompactBackend
from edropout.energy import margin_energy
from kept_channel_pass import training_pass
from nets import randomise_bn


@torch.fx.wrap
def drop_rows(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability p in training, identity otherwise (a leaf for fx,
    so ``training`` is an argument of the traced call)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class StochasticDepth(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_rows(x, self.p, self.training)


class ResidualNet(nn.Module):
    """A residual block whose branch goes through stochastic depth, then Dropout before the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.depth = StochasticDepth(0.5)
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.depth(self.bn1(self.conv(h))))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def _close(a, b):
    return bool((a - b).abs().max() <= 1e-10 * (1 + b.abs().max()))


@pytest.mark.parametrize("depth_train", [True, False])
@pytest.mark.parametrize("drop_train", [True, False])
def test_kept_channel_training_follows_module_modes_and_draws_the_dense_random_numbers(depth_train, drop_train,
                                                                                       batch):
    x, y = batch
    x = x.double()
    torch.manual_seed(0)
    model = randomise_bn(ResidualNet()).train().double()
    pruner = EDropout(model, x[:2], backend="compact")
    state = torch.rand(pruner.num_units, generator=torch.Generator().manual_seed(2)) < 0.6
    dense = copy.deepcopy(model)
    for net in (model, dense):
        net.depth.train(depth_train)
        net.drop.train(drop_train)
    outs = []
    for call in range(3):
        if call == 2:  # the user flips both modes between calls: the next call follows them
            for net in (model, dense):
                net.depth.train(not depth_train)
                net.drop.train(not drop_train)
        torch.manual_seed(11 + call)
        got = training_pass(model, pruner.units, state, x, y, True)
        torch.manual_seed(11 + call)
        want = training_pass(dense, pruner.units, state, x, y, False)
        assert _close(got[0], want[0]), call
        for key in want[1]:
            assert _close(got[1][key], want[1][key]), (call, key)
        for key in want[2]:
            assert _close(got[2][key], want[2][key]), (call, key)
        assert torch.equal(got[3], want[3]), call  # the same random numbers were drawn, no more, no fewer
        outs.append(got[0])
    # the modes really act: in train mode the seed changes the output, in eval mode it does not
    torch.manual_seed(99)
    again = training_pass(model, pruner.units, state, x, y, True)[0]
    random_now = (not depth_train) or (not drop_train)
    assert (not _close(again, outs[2])) == random_now


def test_a_model_that_draws_random_numbers_while_traced_trains_through_the_dense_forward(batch):
    """``torch.rand`` with a constant shape runs once while fx traces: its values would be baked into the graph."""

    class NoisyNet(ResidualNet):
        def forward(self, x):
            return super().forward(x) + torch.rand(4) * 0.1

    x, y = batch
    model = NoisyNet().train()
    pruner = EDropout(model, x[:2], backend="compact")
    state = torch.ones(pruner.num_units, dtype=torch.bool)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="draws random numbers while torch.fx traces"):
        assert CompactBackend().bind(model, pruner.units, margin_energy).kept_channel_logits(state, x) is None
    assert torch.equal(torch.get_rng_state(), rng)
