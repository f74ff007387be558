"""The compact backend gives the reference energies (train- and eval-mode scoring, extreme states, odd ops), the
auto rule never changes energies, and a model fx cannot trace falls back to the batched backend with one warning."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edropout import EDropout
from edropout.backends import (AutoBackend, BatchedBackend, CompactBackend, ReferenceBackend, TritonBackend, auto,
                               compact, make_backend)
from nets import NETS, randomise_bn, small_net
from tolerances import assert_close



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread gives the same numbers and avoids OpenMP barrier stalls on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _states(pruner, seed=3, members=6, keep=0.6):
    """Random states plus all-kept, all-pruned, and one state per group (first few) with that whole group pruned."""
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(members, pruner.num_units, generator=g) < keep
    states[0] = True
    states[1] = False
    whole = []
    for group in pruner.units.groups[:4]:
        s = torch.rand(pruner.num_units, generator=g) < keep
        s[group.first_bit:group.first_bit + group.size] = False
        whole.append(s)
    return torch.cat([states, torch.stack(whole)])


def _score(backend, pruner, states, x, y):
    """Energies of ``states`` from a fresh ``backend`` (a name) bound to the pruner's model and options."""
    bound = make_backend(backend).bind(pruner.model, pruner.units, pruner.energy_fn,
                                       batch_statistics=pruner.batch_statistics)
    return bound.score(states, x, y)


def _pair(pruner, states, x, y):
    return _score("reference", pruner, states, x, y), _score("compact", pruner, states, x, y)


@pytest.mark.parametrize("name", NETS + ("concat",))
@pytest.mark.parametrize("eval_mode", [False, True])
def test_compact_equals_reference(name, eval_mode, batch):
    x, y = batch
    model = randomise_bn(small_net(name))
    pruner = EDropout(model, x[:2], backend="compact", score_in_eval_mode=eval_mode)
    assert pruner.backend.runs_compact(x)  # really the compact path
    states = _states(pruner)
    ref, fast = _pair(pruner, states, x, y)
    assert torch.isfinite(ref).all()
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers
    assert len(set(ref.tolist())) > 2


def test_duplicate_states_scored_once_and_in_order(batch, monkeypatch):
    x, y = batch
    pruner = EDropout(randomise_bn(small_net("resnet18")), x[:2], backend="compact")
    base = _states(pruner)
    states = torch.cat([base, base.flip(0), base[:3]])
    scored = []  # members the interpreter ran: dedup is visible only inside the backend module
    run = compact.run
    monkeypatch.setattr(compact, "run", lambda plan, model, s, *a: scored.append(len(s)) or run(plan, model, s, *a))
    ref, fast = _pair(pruner, states, x, y)
    assert scored == [len(torch.unique(base, dim=0))]
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers


class OddNet(nn.Module):
    """Ops the compact interpreter does not carry channels through (sigmoid, a depthwise conv), channel gating by
    a dense tensor, a concat with a dense branch, size queries and a view, a residual add, Linear→BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.gate = nn.Linear(16, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.side = nn.Conv2d(1, 3, 1)
        self.fc = nn.Linear(19 * 4 * 4, 12)
        self.bn1d = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.gate(h.mean((2, 3))))
        h = h * s.view(h.size(0), h.shape[1], 1, 1)
        h = h + torch.sigmoid(h) * h  # sigmoid alone would revive pruned channels (0 -> 0.5): not removable
        h = self.conv2(self.dw(h)) + h
        h = torch.cat([h, torch.tanh(self.side(x))], dim=1)
        h = F.max_pool2d(h, 2)
        z = F.relu(self.bn1d(self.fc(h.view(h.size(0), -1))))
        return self.out(z * 2.0)


def _planned(net_class, x, eval_mode):
    """A seeded ``net_class`` with random BatchNorm, its compact pruner, and its compact plan."""
    torch.manual_seed(0)
    model = randomise_bn(net_class())
    pruner = EDropout(model, x[:2], backend="compact", score_in_eval_mode=eval_mode)
    return model, pruner, pruner.backend.plan(x)


@pytest.mark.parametrize("eval_mode", [False, True])
def test_unusual_ops_fall_back_to_dense_exactly(eval_mode, batch):
    x, y = batch
    model, pruner, plan = _planned(OddNet, x, eval_mode)
    kinds = {s.kind for s in plan.member}
    assert {"function", "module", "cat", "view", "select", "binary"} <= kinds  # the dense paths are exercised
    assert pruner.backend.runs_compact(x)
    ref, fast = _pair(pruner, _states(pruner), x, y)
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers


class StemNet(nn.Module):
    """A stem whose masked output is activated and pooled, then read by a conv, a residual add and a pooled head:
    the per-channel ops run once at full width and each member slices the pooled value."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        z = h + self.bn2(self.conv(h))
        return self.fc(torch.cat([z.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


@pytest.mark.parametrize("eval_mode", [False, True])
def test_per_channel_ops_of_a_shared_stem_run_once_at_full_width(eval_mode, batch):
    x, y = batch
    model, pruner, plan = _planned(StemNet, x, eval_mode)
    shared_kinds = [s.kind for s in plan.shared]
    member_kinds = [s.kind for s in plan.member]
    assert "zero" in shared_kinds and "pool" in shared_kinds  # relu and max-pool of the stem: once per call
    assert "zero" not in member_kinds and "pool" not in member_kinds
    assert member_kinds.count("select") == 1  # one slice, read by the conv, the add and the head
    ref, fast = _pair(pruner, _states(pruner), x, y)
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers
    assert len(set(ref.tolist())) > 2


def test_compact_leaves_model_untouched(batch):
    x, y = batch
    model = randomise_bn(small_net("resnet18")).train()
    before = copy.deepcopy(model.state_dict())
    pruner = EDropout(model, x[:2], backend="compact")
    pruner.energies(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_fallback_when_fx_cannot_trace(batch, monkeypatch):
    x, y = batch
    model = randomise_bn(small_net("resnet18"))

    def fail(_tracer, _model, *args, **kwargs):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(torch.fx.Tracer, "trace", fail)
    pruner = EDropout(model, x[:2], backend="compact")
    states = _states(pruner)
    with pytest.warns(RuntimeWarning, match="batched backend"):
        fast = pruner.score_states(states, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model
        again = pruner.score_states(states, x, y)
    assert not pruner.backend.runs_compact(x)
    ref, _ = _pair(pruner, states, x, y)
    assert_close(fast, ref, path="net")
    assert_close(again, ref, path="net")


def test_fallback_when_model_has_hooks(batch):
    x, y = batch
    model = randomise_bn(small_net("lenet"))
    pruner = EDropout(model, x[:2], backend="compact")
    seen = []
    model.features[0].register_forward_hook(lambda m, i, o: seen.append(1))
    states = _states(pruner)
    with pytest.warns(RuntimeWarning, match="hooks"):
        fast = pruner.score_states(states, x, y)
    assert seen  # the user's hook ran, as it does for the reference
    ref, _ = _pair(pruner, states, x, y)
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers


@pytest.mark.parametrize("name", ["mlp", "resnet18", "concat"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 1.0])
def test_auto_never_changes_energies(name, keep, batch):
    x, y = batch
    model = randomise_bn(small_net(name))
    pruner = EDropout(model, x[:2], backend="reference")
    g = torch.Generator().manual_seed(5)
    states = torch.rand(8, pruner.num_units, generator=g) < keep
    chooser = AutoBackend().bind(model, pruner.units, pruner.energy_fn)
    choice = chooser.scorer(states, x)
    assert choice in (chooser.main, chooser.batched)
    ref, _ = _pair(pruner, states, x, y)
    assert_close(choice.score(states, x, y), ref, path="net")
    pruner.backend = "auto"
    assert_close(pruner.score_states(states, x, y), ref, path="net")


def test_auto_rule_follows_work_and_kept_fraction(batch):
    x, y = batch
    model = small_net("resnet18")
    pruner = EDropout(model, x[:2], backend="compact")
    full = torch.ones(8, pruner.num_units, dtype=torch.bool)
    half = torch.rand(8, pruner.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    work, rho, steps = auto.features(model, pruner.units, half, x)
    assert work == x.shape[0] * sum(pruner.backend.plan(x).layer_macs.values())
    assert 0.1 < rho < 0.5 and auto.features(model, pruner.units, full, x)[1] == 1.0
    # with a step cost of exactly the work this batch does per member, only a small enough kept share wins
    costs = dict(ratio=1.5, step_macs=work / steps)
    assert auto.choose(model, pruner.units, half, x, **costs) is CompactBackend
    assert auto.choose(model, pruner.units, full, x, **costs) is BatchedBackend
    assert auto.choose(model, pruner.units, full, x.repeat(8, 1, 1, 1), **costs) is CompactBackend  # 8× the work


def test_auto_composes_backends_by_device(batch):
    assert auto.main_backend_for(torch.device("cpu")) is CompactBackend
    assert auto.main_backend_for(torch.device("cuda")) in (BatchedBackend, TritonBackend)  # not this rule's business
    assert auto.main_backend_for(torch.device("meta")) is BatchedBackend
    assert isinstance(make_backend("compact"), CompactBackend) and isinstance(make_backend("reference"),
                                                                              ReferenceBackend)
    pruner = EDropout(small_net("lenet"), batch[0][:2], backend="auto")
    assert isinstance(pruner.backend.main, CompactBackend) and isinstance(pruner.backend.batched, BatchedBackend)
    assert pruner.trains_kept_channels
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("fast")


@pytest.mark.parametrize("name", ["resnet18", "squeezenet"])
def test_compact_without_channel_padding(name, batch, monkeypatch):
    from edropout.backends import _compact_values

    monkeypatch.setattr(_compact_values, "CHANNEL_MULTIPLE", 1)
    x, y = batch
    pruner = EDropout(randomise_bn(small_net(name)), x[:2], backend="compact")
    ref, fast = _pair(pruner, _states(pruner), x, y)
    assert_close(fast, ref, path="net")  # fp32 through up to 20 BatchNorm layers
