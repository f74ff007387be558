"""While evolving on CPU, the training forward and backward run on the best state's kept channels only
(``CompactBackend.kept_channel_logits``): they give the masked dense forward's logits, gradients and BatchNorm
statistics, draw dropout's random numbers as it does, and a whole run equals one on the reference backend."""
import copy

import pytest
import torch
import torch.nn as nn

from edropout import EDropout
from edropout.masking import masked
from edropout.state_view import StateView
from kept_channel_pass import training_pass
from nets import NETS, ConcatNet, randomise_bn, small_net
from tolerances import assert_close


class DropoutNet(nn.Module):
    """Dropout on a 4-D activation (whose layout the interpreter changes) and on features, in train mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop2d = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.fc = nn.Linear(5 * 3 * 3, 12)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = self.drop2d(torch.relu(self.bn(self.conv(x))))
        h = torch.relu(self.conv2(h)).flatten(1)
        return self.out(self.drop(torch.relu(self.fc(h))))


def _net(name):
    if name == "dropout":
        torch.manual_seed(0)
        return DropoutNet()
    if name == "frozen_bn":  # every other BatchNorm in eval mode inside a training model: running statistics
        model = randomise_bn(small_net("resnet18"))
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            m.train(i % 2 == 0)
        return model
    return small_net(name) if name != "concat" else ConcatNet()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NETS + ("concat", "dropout", "frozen_bn"))
def test_kept_channel_training_step_equals_masked_dense(name, dtype, batch):
    x, y = batch
    model = _net(name)
    if name != "frozen_bn":
        model = randomise_bn(model).train()
    model = model.to(dtype)
    x = x.to(dtype)
    pruner = EDropout(model, x[:2], backend="compact")
    g = torch.Generator().manual_seed(3)
    state = torch.rand(pruner.num_units, generator=g) < 0.6
    dense_model = copy.deepcopy(model)
    before = {k: b.clone() for k, b in model.named_buffers() if "running" in k}
    torch.manual_seed(7)  # the same dropout draws for both paths
    out_c, grads_c, bufs_c, _ = training_pass(model, pruner.units, state, x, y, True)
    torch.manual_seed(7)
    out_d, grads_d, bufs_d, _ = training_pass(dense_model, pruner.units, state, x, y, False)
    # float32: the two paths sum in different orders; gradients through BatchNorm on 12 samples differ by up to
    # ~1e-5 of a tensor's scale (measured); float64 pins the arithmetic itself
    rel = 1e-10 if dtype == torch.float64 else 2e-4
    close = lambda a, b: bool((a.double() - b.double()).abs().max() <= rel * (1 + b.double().abs().max()))
    assert close(out_c, out_d)
    assert grads_c.keys() == grads_d.keys() and len(grads_d) == len(list(model.parameters()))
    for key in grads_d:
        assert close(grads_c[key], grads_d[key]), key
    for key in bufs_d:
        assert close(bufs_c[key], bufs_d[key]), key
    assert not before or any(not torch.equal(bufs_c[k], b) for k, b in before.items())  # statistics did move


def test_pruned_channels_keep_their_running_statistics(batch):
    x, y = batch
    model = randomise_bn(small_net("resnet18")).train()
    pruner = EDropout(model, x[:2], backend="compact")
    state = torch.rand(pruner.num_units, generator=torch.Generator().manual_seed(2)) < 0.5
    keeps = StateView(model, pruner.units, state).statistics_keeps
    before = {m: (m.running_mean.clone(), m.running_var.clone()) for m in keeps}
    for kept_only in (True, False):
        training_pass(model, pruner.units, state, x, y, kept_only)
    moved = 0
    for m, keep in keeps.items():
        mean, var = before[m]
        assert torch.equal(m.running_mean[~keep], mean[~keep]) and torch.equal(m.running_var[~keep], var[~keep])
        moved += int((m.running_mean[keep] != mean[keep]).sum())
    assert moved > 0


@pytest.mark.parametrize("name", ["resnet18", "lenet", "concat"])
def test_evolving_run_equals_the_reference_backend(name, batch):
    """float64, so that energies tie-break alike: same states, weights and statistics step after step.
    (Some states make this run ill-conditioned: BatchNorm over 8 samples at 1x1 spatial size amplifies float64
    rounding to about 1e-7 within five steps, e.g. seed 1 under the O(S) parent draw; seed 0 stays at 1e-11.)"""
    x, y = batch
    x = x.double()
    base = randomise_bn(_net(name)).train().double()
    runs = []
    for backend in ("compact", "reference"):
        model = copy.deepcopy(base)
        pruner = EDropout(model, x[:2], population_size=6, seed=0, backend=backend, min_iterations=10 ** 6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        runs.append((pruner, model, opt))
    assert runs[0][0].trains_kept_channels and not runs[1][0].trains_kept_channels
    for i in range(5):
        xb, yb = x[i:i + 8], y[i:i + 8]
        infos = [p.step(xb, yb, o) for p, _, o in runs]
        assert torch.equal(runs[0][0].best_state, runs[1][0].best_state)
        assert infos[0].loss == pytest.approx(infos[1].loss, rel=1e-10)
    assert not runs[0][0].best_state.all()
    (_, model_c, _), (_, model_d, _) = runs
    for (key, a), b in zip(model_c.state_dict().items(), model_d.state_dict().values()):
        assert_close(a, b, path="net", dtype=torch.float64, msg=key)


def test_hooked_models_train_through_the_masked_dense_forward(batch):
    x, y = batch
    model = small_net("lenet").train()
    pruner = EDropout(model, x[:2], backend="compact")
    calls = []
    model.classifier[1].register_forward_hook(lambda m, i, o: calls.append(o.shape))  # the interpreter skips it
    with pytest.warns(RuntimeWarning, match="hooks"):
        pruner.step(x, y, torch.optim.SGD(model.parameters(), lr=0.01))
    assert calls and calls[-1][0] == x.shape[0]  # the training forward ran the real module


def test_a_failing_training_forward_falls_back_once_with_the_model_untouched(batch, monkeypatch):
    x, y = batch
    model = randomise_bn(small_net("resnet18")).train()
    pruner = EDropout(model, x[:2], backend="compact")
    reference = copy.deepcopy(model)
    from edropout.backends import _compact_exec

    calls = []

    def failing_linear(step, ctx, args, kwargs):  # the last layer: BatchNorm statistics have already moved
        calls.append(1)
        raise RuntimeError("unsupported op")

    monkeypatch.setitem(_compact_exec.HANDLERS, "linear", failing_linear)
    state = torch.rand(pruner.num_units, generator=torch.Generator().manual_seed(2)) < 0.6
    backend = pruner.backend
    with pytest.warns(RuntimeWarning, match="unsupported op"):
        assert backend.kept_channel_logits(state, x) is None
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key
    assert backend.kept_channel_logits(state, x) is None and len(calls) == 1  # not retried
    # the training forward is then the masked dense one, exactly: same logits and statistics as on a copy
    logits = backend.training_logits(state, x)
    with masked(reference, pruner.units, state):
        expected = reference(x)
    assert torch.equal(logits, expected) and len(calls) == 1
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key


def test_user_module_modes_survive_construction_scoring_and_steps(batch):
    x, y = batch
    model = randomise_bn(small_net("alexnet")).train()
    frozen = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.BatchNorm2d))]
    for m in frozen:
        m.eval()  # a user's switched-off dropout and frozen BatchNorm
    pruner = EDropout(model, x[:2])
    pruner.step(x, y, torch.optim.SGD(model.parameters(), lr=0.01))
    pruner.energies(x, y)
    assert frozen and all(not m.training for m in frozen)
    assert model.training
