"""backend="triton" against the reference backend: same energies, same best state, any model, model untouched.

Runs in Triton's CPU interpreter when there is no GPU (tests/kernels/conftest.py sets TRITON_INTERPRET), which
is slow: nets are width 4 on 8×8 inputs, batch 6, S = 4. On a GPU, TF32 is switched off so that both paths
compute exact float32 and the fp32 tolerance (1e-4) applies.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before edropout_kernels is imported

import edropout_kernels
from edropout import EDropout
from edropout.backends import TritonBackend, auto, make_backend
from nets import randomise_bn, small_net
from kernel_helpers import DEVICE
from tolerances import assert_close

NO_TF32 = dict(rtol=1e-4, atol=1e-4)  # tf32 is off in these tests (conftest): the interpreter's bound holds on a GPU


def _all_kept(keep) -> bool:
    """Whether a keep-mask, or kept-first orders, keep every channel of every member."""
    if isinstance(keep, edropout_kernels.KeptFirstOrder):
        return bool((keep.count == keep.channels).all())
    return bool(keep.all())


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (kernel, in_keep.all(), out_keep.all(), folded) for every conv/linear kernel launch."""
    calls = []

    def spy(name):
        fn = getattr(edropout_kernels, name)

        def wrapped(x, weight, bias, in_keep, out_keep, **kw):
            calls.append((name, _all_kept(in_keep), _all_kept(out_keep), kw.get("scale") is not None))
            return fn(x, weight, bias, in_keep, out_keep, **kw)

        return wrapped

    for name in ("population_conv2d", "population_linear"):
        monkeypatch.setattr(edropout_kernels, name, spy(name))
    return calls


def _data(batch=6, channels=1, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    return x.to(DEVICE), torch.randint(0, classes, (batch,), generator=g).to(DEVICE)


def _population(units, seed=3):
    """S = 4: all kept, then random states keeping about 70%, 50% and 35% of the units, each keeping at least
    one unit of every group. (A state that prunes a whole group, e.g. every stem channel of a ResNet, makes the
    logits independent of the input: per-member BatchNorm variances are then exactly 0 and the energy is
    rounding noise amplified by 1/sqrt(eps) per BatchNorm, which no two summation orders reproduce.)"""
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(4, units.num_units, generator=g) < torch.tensor([[1.0], [0.7], [0.5], [0.35]])
    for group in units.groups:
        bits = states[:, group.first_bit:group.first_bit + group.size]
        bits[~bits.any(dim=1), 0] = True
    return states.to(DEVICE)


def _both(pruner, x, y):
    """(reference energies, triton energies) of the pruner's population."""
    pruner.backend = "reference"
    ref = pruner.energies(x, y)
    pruner.backend = "triton"
    return ref, pruner.energies(x, y)


def _pruner(model, x, **kw):
    pruner = EDropout(model.to(DEVICE), x[:2], population_size=4, backend="triton", **kw)
    pruner.population = _population(pruner.units)
    return pruner


@pytest.mark.parametrize("eval_mode", [False, True], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("name", ["resnet18", "alexnet", "squeezenet", "lenet", "mlp", "concat"])
def test_triton_equals_reference(name, eval_mode, kernel_calls):
    x, y = _data(classes=4 if name == "concat" else 10)
    pruner = _pruner(randomise_bn(small_net(name)), x, score_in_eval_mode=eval_mode)
    ref, fast = _both(pruner, x, y)
    assert torch.isfinite(ref).all() and len(set(ref.tolist())) == 4  # the states really differ
    assert_close(fast, ref, path="kernel", **NO_TF32)
    assert int(fast.argmin()) == int(ref.argmin())
    # the kernels did only kept work: some launches skip pruned inputs and some pruned outputs
    assert any(not all_in for _, all_in, _, _ in kernel_calls)
    assert any(not all_out for _, _, all_out, _ in kernel_calls)
    if name == "resnet18":  # every conv feeds one BatchNorm: eval-mode scoring folds it into the conv epilogue
        assert any(folded for *_, folded in kernel_calls) == eval_mode


@pytest.mark.parametrize("energy", ["cross_entropy", "callable"])
def test_other_energies(energy):
    x, y = _data()

    def negative_target_logit(logits, targets):
        return -logits.gather(1, targets[:, None]).squeeze(1)

    pruner = _pruner(small_net("lenet"), x, energy=negative_target_logit if energy == "callable" else energy)
    ref, fast = _both(pruner, x, y)
    assert_close(fast, ref, path="kernel", **NO_TF32)
    assert int(fast.argmin()) == int(ref.argmin())


class SigmoidNet(nn.Module):
    """sigmoid(0) = 0.5: a pruned channel is not zero at the next conv, so that conv must read all inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.sigmoid(self.bn(self.a(x))))).mean(dim=(2, 3)))


def test_input_skipping_only_where_pruned_inputs_are_zero():
    x, y = _data(classes=4)
    model = randomise_bn(SigmoidNet())
    pruner = _pruner(model, x)
    ref, fast = _both(pruner, x, y)
    assert_close(fast, ref, path="kernel", **NO_TF32)
    plan = pruner.backend.plan(x)
    assert "b" not in plan.skip_inputs and "fc" in plan.skip_inputs


class MixedNet(nn.Module):
    """Layers without a kernel (grouped, dilated, Conv1d, avg-pool) between layers with one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding="same")
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(6, 4, 3, padding=2, dilation=2)
        self.pool = nn.AvgPool2d(2)
        self.line = nn.Conv1d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.dilated(torch.relu(self.grouped(torch.relu(self.a(x)))))))
        return self.fc(torch.relu(self.line(h.flatten(2))).flatten(1))


@pytest.mark.filterwarnings("ignore:group rooted at")  # the grouped conv makes two groups unprunable
def test_modules_without_kernels_fall_back_to_pytorch():
    x, y = _data(classes=4)
    pruner = _pruner(MixedNet(), x)
    ref, fast = _both(pruner, x, y)
    assert_close(fast, ref, path="kernel", **NO_TF32)
    pruner.max_members_per_pass = 3  # chunks of 3 and 1 members
    assert_close(pruner.energies(x, y), ref, path="kernel", **NO_TF32)


class ConvBnNet(nn.Module):
    """conv -> BatchNorm pairs: in eval-mode scoring each BatchNorm folds into its conv's epilogue."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("eval_mode", [False, True], ids=["batch_stats", "running_stats"])
def test_user_hooks_see_what_pytorch_computes(eval_mode, kernel_calls):
    x, y = _data(classes=4)
    model = randomise_bn(ConvBnNet())
    pruner = _pruner(model, x, score_in_eval_mode=eval_mode)
    ref, fast = _both(pruner, x, y)
    assert_close(fast, ref, path="kernel", **NO_TF32)
    assert any(folded for *_, folded in kernel_calls) == eval_mode
    kernel_calls.clear()
    handle = model.a.register_forward_hook(lambda module, inputs, output: output * 2 + 0.5)  # seen before bn_a
    try:
        ref, fast = _both(pruner, x, y)
    finally:
        handle.remove()
    assert_close(fast, ref, path="kernel", **NO_TF32)
    first = kernel_calls[0]  # conv a: its hook must see the plain conv output, so a is never folded
    assert first[0] == "population_conv2d" and not first[3]


class SharedNormNet(nn.Module):
    """One BatchNorm called twice: on conv a's output (read by conv b too) and on conv b's output, which feeds
    that BatchNorm alone. Folding it into b would skip it on a's output as well."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        return self.fc(torch.relu(self.bn(h) + self.bn(self.b(h))).mean(dim=(2, 3)))


def test_a_batchnorm_called_twice_is_not_folded(kernel_calls):
    x, y = _data(classes=4)
    pruner = _pruner(randomise_bn(SharedNormNet()), x, score_in_eval_mode=True)
    ref, fast = _both(pruner, x, y)
    assert_close(fast, ref, path="kernel", **NO_TF32)
    assert kernel_calls and not any(folded for *_, folded in kernel_calls)


class BatchMixingNet(nn.Module):
    """Centres features over the whole batch: rows of different members would mix in one S·B forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1)))
        return self.fc(h - h.mean(dim=0, keepdim=True))


def test_model_that_mixes_rows_raises_instead_of_answering():
    x, y = _data(classes=4)
    pruner = _pruner(BatchMixingNet(), x)
    with pytest.raises(RuntimeError, match="mixes rows"):
        pruner.energies(x, y)


def test_scoring_leaves_model_untouched():
    x, y = _data(classes=4)
    model = randomise_bn(small_net("concat")).to(DEVICE).train()
    before = copy.deepcopy(model.state_dict())
    _pruner(model, x).energies(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_auto_picks_triton_on_cuda():
    assert auto.main_backend_for(torch.device("cuda")) is TritonBackend
    assert isinstance(make_backend("triton"), TritonBackend)
