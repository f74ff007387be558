"""Scoring keeps what a BatchNorm subclass does besides normalising (timm's ``BatchNormAct2d`` pattern: BatchNorm,
then a drop and an activation inside one module's forward). Every backend's energies must equal an independent
masked forward written here: BatchNorm with each state's own batch statistics, every other op in eval mode, each
pruned channel zero after its module's output."""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before edropout_kernels is imported (triton backend)

from edropout import EDropout
from edropout.backends import CompactBackend
from edropout.energy import margin_energy
from edropout.state_view import StateView
from nets import randomise_bn


class NormAct(nn.BatchNorm2d):
    """BatchNorm2d with a dropout and an activation inside its forward, written as timm writes it (its own call to
    F.batch_norm, the running statistics passed unless training without tracking), plus an eval-gated functional
    dropout: in eval mode both drops are the identity."""

    def __init__(self, channels, act):
        super().__init__(channels)
        self.drop = nn.Dropout(0.25)
        self.act = act

    def forward(self, x):
        track = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                         self.weight, self.bias, self.training or self.running_mean is None,
                         0.0 if self.momentum is None else self.momentum, self.eps)
        x = F.dropout(x, 0.3, self.training)
        return self.act(self.drop(x))


class NormActNet(nn.Module):
    """conv -> NormAct(SiLU) -> conv -> NormAct(sigmoid: not zero-preserving) -> conv -> stock BatchNorm -> ReLU
    -> pool -> Linear: the module's activation and the position of the mask (after the module's output) both
    change the energies."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = NormAct(6, nn.SiLU())
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.bn2 = NormAct(5, nn.Sigmoid())
        self.conv3 = nn.Conv2d(5, 7, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        h = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        h = torch.relu(self.bn3(self.conv3(h)))
        return self.fc(h.mean(dim=(2, 3)))


def _batch_stat_norm(h, bn):
    """BatchNorm of ``h`` with its own batch statistics (biased variance), written out."""
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _independent_energy(model, masks, x, y):
    """Margin energy of the masked network: convs, BatchNorm with batch statistics, the modules' activations in
    eval mode (drops off), each mask applied to the module's output; nothing from edropout."""
    conv = lambda c, h: F.conv2d(h, c.weight, c.bias, c.stride, c.padding)
    h = F.silu(_batch_stat_norm(conv(model.conv1, x), model.bn1)) * masks["bn1"].view(1, -1, 1, 1)
    h = torch.sigmoid(_batch_stat_norm(conv(model.conv2, h), model.bn2)) * masks["bn2"].view(1, -1, 1, 1)
    h = torch.relu(_batch_stat_norm(conv(model.conv3, h), model.bn3) * masks["bn3"].view(1, -1, 1, 1))
    z = h.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (others - true).mean()


def _states(num_units, seed=3):
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(5, num_units, generator=g) < 0.6
    states[0] = True
    return states


@pytest.mark.parametrize("backend", ["reference", "batched", "compact", "triton"])
def test_every_backend_scores_batchnorm_subclasses_with_their_own_forward(backend, batch):
    x, y = batch
    torch.manual_seed(0)
    model = randomise_bn(NormActNet()).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere: the kept-channel backend handles the subclass
        pruner = EDropout(model, x[:2], backend=backend, population_size=5)
        if backend == "compact":
            assert pruner.backend.runs_compact(x)
        groups = {g.module_name: slice(g.first_bit, g.first_bit + g.size) for g in pruner.units.groups}
        assert {k: v.stop - v.start for k, v in groups.items()} == {"conv1": 6, "conv2": 5, "conv3": 7}
        states = _states(pruner.num_units)
        got = pruner.score_states(states, x, y)
    bits = {f"bn{i}": groups[f"conv{i}"] for i in (1, 2, 3)}
    with torch.no_grad():
        want = torch.stack([_independent_energy(model, {k: s[b].float() for k, b in bits.items()}, x, y)
                            for s in states])
    assert len(set(want.tolist())) == len(states)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
    assert model.training and all(m.training for m in model.modules())  # modes untouched


def test_kept_channel_training_runs_batchnorm_subclasses_as_the_dense_forward(batch):
    """float64: the interpreter's training forward (the subclass's own forward in train mode, its drops drawing the
    dense forward's random numbers) gives the masked dense forward's logits, gradients and statistics."""
    import copy

    from edropout.masked_update import frozen_statistics
    from edropout.masking import masked

    x, y = batch
    torch.manual_seed(0)
    model = randomise_bn(NormActNet()).train().double()
    x = x.double()
    pruner = EDropout(model, x[:2], backend="compact")
    state = _states(pruner.num_units)[2]
    results = []
    for kept_only, net in ((True, model), (False, copy.deepcopy(model))):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with frozen_statistics(StateView(net, pruner.units, state).statistics_keeps):
            if kept_only:
                logits = CompactBackend().bind(net, pruner.units, margin_energy).kept_channel_logits(state, x)
                assert logits is not None
            else:
                with masked(net, pruner.units, state):
                    logits = net(x)
            F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {n: p.grad for n, p in net.named_parameters()},
                        dict(net.named_buffers()), torch.get_rng_state()))
    (out_c, grads_c, bufs_c, rng_c), (out_d, grads_d, bufs_d, rng_d) = results
    assert (out_c - out_d).abs().max() <= 1e-10 * (1 + out_d.abs().max())
    for key in grads_d:
        assert (grads_c[key] - grads_d[key]).abs().max() <= 1e-10 * (1 + grads_d[key].abs().max()), key
    for key in bufs_d:
        assert torch.allclose(bufs_c[key], bufs_d[key], rtol=1e-10, atol=1e-12), key
    assert torch.equal(rng_c, rng_d)


class ManualNorm(nn.BatchNorm2d):
    """A BatchNorm subclass that normalises by hand with its running statistics, without F.batch_norm: per-member
    statistics cannot be fed to it, so it is scored with its own statistics, with a warning."""

    def forward(self, x):
        scale = (self.weight / torch.sqrt(self.running_var + self.eps)).view(1, -1, 1, 1)
        return torch.relu((x - self.running_mean.view(1, -1, 1, 1)) * scale + self.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("backend", ["reference", "batched", "compact"])
def test_a_subclass_without_batch_norm_call_is_scored_with_its_own_statistics_and_a_warning(backend, batch):
    from edropout import masking

    x, y = batch
    torch.manual_seed(0)
    model = randomise_bn(NormActNet())
    model.bn2 = ManualNorm(5)
    randomise_bn(model, seed=1)
    masking._WARNED.discard(ManualNorm)
    pruner = EDropout(model, x[:2], backend=backend, population_size=5)
    groups = {g.module_name: slice(g.first_bit, g.first_bit + g.size) for g in pruner.units.groups}
    states = _states(pruner.num_units)
    with pytest.warns(RuntimeWarning, match="ManualNorm .* does not call torch.nn.functional.batch_norm"):
        got = pruner.score_states(states, x, y)
    conv = lambda c, h: F.conv2d(h, c.weight, c.bias, c.stride, c.padding)
    want = []
    with torch.no_grad():
        for s in states:
            m = {f"bn{i}": s[groups[f"conv{i}"]].float().view(1, -1, 1, 1) for i in (1, 2, 3)}
            h = F.silu(_batch_stat_norm(conv(model.conv1, x), model.bn1)) * m["bn1"]
            bn = model.bn2
            h = conv(model.conv2, h)
            h = torch.relu((h - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var + bn.eps).view(
                1, -1, 1, 1) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * m["bn2"]
            h = torch.relu(_batch_stat_norm(conv(model.conv3, h), model.bn3) * m["bn3"])
            z = h.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
            true = z.gather(1, y[:, None]).squeeze(1)
            want.append((z.scatter(1, y[:, None], float("-inf")).amax(dim=1) - true).mean())
    assert torch.allclose(got, torch.stack(want), rtol=1e-4, atol=1e-5)
