"""Bad input to the API gets a clear error before anything changes: non-finite batches, losses and energies (or a
counted skip), models without parameters, empty batches, batches on another device, foreign optimizers, models
that return something else than logits; and the O(S) parent draw."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from edropout import EDropout
from edropout import evolution as evo
from edropout.checks import NonFiniteError
from nets import randomise_bn, small_net
from tolerances import assert_close


def _setup(x, name="lenet", **kw):
    model = randomise_bn(small_net(name)).train()
    pruner = EDropout(model, x[:2], population_size=5, seed=0, **kw)
    return model, pruner, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _snapshot(model, pruner, optimizer):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), pruner.population.clone(),
            pruner.generator.get_state(), pruner.iteration,
            None if pruner.stored_energies is None else pruner.stored_energies.clone())


def _equal(a, b):
    """Bit-equal, NaN equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _assert_same(a, b):
    for key in a[0]:
        assert _equal(a[0][key], b[0][key]), key
    assert str(a[1]) == str(b[1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and a[4] == b[4]
    assert (a[5] is None and b[5] is None) or torch.equal(a[5], b[5])


def test_a_nan_pixel_raises_before_anything_changes(batch):
    x, y = batch
    model, pruner, optimizer = _setup(x)
    pruner.step(x, y, optimizer)
    optimizer.step()  # creates momentum state so that a change to it would show
    before = _snapshot(model, pruner, optimizer)
    bad = x.clone()
    bad[3, 0, 2, 5] = float("nan")
    bad[7, 0, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"x holds 2 non-finite values \(NaN or infinity\) of 768"):
        pruner.step(bad, y, optimizer)
    with pytest.raises(NonFiniteError, match="x holds 2 non-finite"):
        pruner.energies(bad, y)
    _assert_same(before, _snapshot(model, pruner, optimizer))


def test_skip_mode_skips_counts_and_warns(batch):
    x, y = batch
    model, pruner, optimizer = _setup(x, on_nonfinite="skip")
    pruner.step(x, y, optimizer)
    before = _snapshot(model, pruner, optimizer)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for count in (1, 2):
        with pytest.warns(RuntimeWarning, match=f"skipped a batch at iteration 2: x holds 1 non-finite.*"
                                                f"{count} skipped so far"):
            info = pruner.step(bad, y, optimizer)
        assert info.skipped and math.isnan(info.loss) and pruner.skipped_batches == count
    _assert_same(before, _snapshot(model, pruner, optimizer))
    assert not pruner.step(x, y, optimizer).skipped and pruner.iteration == 2


def test_a_non_finite_loss_raises_before_the_weights_change(batch):
    x, y = batch
    # an energy that ignores the logits stays finite, so the evolution runs and the training loss is what fails
    model, pruner, optimizer = _setup(x, energy=lambda logits, targets: targets.float())
    pruner.step(x, y, optimizer)
    with torch.no_grad():
        model.classifier[-1].bias[2] = float("inf")
    before = _snapshot(model, pruner, optimizer)
    with pytest.raises(NonFiniteError, match="the training loss is nan at iteration 2; no weight was changed"):
        pruner.step(x, y, optimizer)
    after = _snapshot(model, pruner, optimizer)
    for key in before[0]:
        assert _equal(before[0][key], after[0][key]), key
    assert str(before[1]) == str(after[1])


@pytest.mark.parametrize("compact", [True, False])
def test_skip_mode_skips_a_non_finite_loss_after_convergence(compact, batch):
    x, y = batch
    model, pruner, optimizer = _setup(x, "resnet18", on_nonfinite="skip", train_exported_after_convergence=compact)
    pruner.step(x, y, optimizer)
    pruner.finalize()
    pruner.step(x, y, optimizer)
    pruner.sync()
    trained = pruner.training_network
    assert (trained is not model) == compact
    poisoned = dict(trained.named_parameters())["fc.bias"]
    with torch.no_grad():
        poisoned[1] = float("nan")
    params = {n: p.detach().clone() for n, p in trained.named_parameters()}
    buffers = {n: b.clone() for n, b in trained.named_buffers()}
    with pytest.warns(RuntimeWarning, match="the training loss is nan"):
        assert pruner.step(x, y, optimizer).skipped
    for n, p in trained.named_parameters():
        assert _equal(p.detach(), params[n]), n
    for n, b in trained.named_buffers():
        assert torch.equal(b, buffers[n]), n  # the failed forward's BatchNorm statistics were put back


@pytest.mark.parametrize("rescore", [False, True])
def test_every_energy_non_finite_raises_and_keeps_the_population(rescore, batch):
    # on the first batch (or when parents are re-scored) no stored energy is left to compare with: the argmin
    # of all-infinite energies would pick an arbitrary state
    x, y = batch
    model, pruner, optimizer = _setup(x, rescore_parents=rescore)
    if rescore:
        pruner.step(x, y, optimizer)
    with torch.no_grad():
        model.classifier[-1].bias[0] = float("nan")
    before = _snapshot(model, pruner, optimizer)
    with pytest.raises(NonFiniteError, match="every population member's energy is non-finite"):
        pruner.step(x, y, optimizer)
    with pytest.raises(NonFiniteError, match="every population member's energy is non-finite"):
        pruner.energies(x, y)
    _assert_same(before, _snapshot(model, pruner, optimizer))


def test_clear_errors_for_unusable_models_batches_and_optimizers(batch):
    x, y = batch
    with pytest.raises(ValueError, match="has no parameters"):
        EDropout(nn.Sequential(nn.Flatten(), nn.ReLU()), x[:2])
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        EDropout(small_net("lenet"), x[:2], on_nonfinite="ignore")
    model, pruner, optimizer = _setup(x)
    with pytest.raises(ValueError, match="the batch is empty"):
        pruner.step(x[:0], y[:0], optimizer)
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu; move the batch with x.to"):
        pruner.step(x.to("meta"), y, optimizer)
    with pytest.raises(ValueError, match="y is on meta but the model is on cpu"):
        pruner.energies(x, y.to("meta"))
    other = torch.optim.SGD(small_net("lenet").parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
        pruner.step(x, y, other)
    assert pruner.iteration == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_train_like_int64(dtype, batch):
    x, y = batch
    runs = []
    for labels in (y, y.to(dtype)):
        model, pruner, optimizer = _setup(x)
        losses = [pruner.step(x, labels, optimizer).loss for _ in range(2)]
        runs.append((losses, pruner.energies(x, labels), model.state_dict()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    for key, value in runs[0][2].items():
        assert torch.equal(value, runs[1][2][key]), key


class _Wrapped(nn.Module):
    """A net whose forward returns ``kind``: a tuple, a dict or an object with ``.logits``."""

    class Output:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, logits.detach().sum()
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.detach().mean()}
        return self.Output(logits)


UNWRAP = {"tuple": lambda out: out[0], "dict": lambda out: out["logits"], "object": lambda out: out.logits}
HINT = {"tuple": r"out\[0\]", "dict": r"out\['logits'\]", "object": "out.logits"}


@pytest.mark.parametrize("kind", sorted(UNWRAP))
def test_output_to_logits_takes_tuples_dicts_and_logits_objects(kind, batch):
    x, y = batch
    with pytest.raises(TypeError, match=f"pass EDropout\\(..., output_to_logits=lambda out: {HINT[kind]}\\)"):
        EDropout(_Wrapped(small_net("lenet"), kind), x[:2])
    plain, wrapped = small_net("lenet").train(), _Wrapped(small_net("lenet"), kind).train()
    p_plain = EDropout(plain, x[:2], population_size=5, seed=0)
    p_wrapped = EDropout(wrapped, x[:2], population_size=5, seed=0, output_to_logits=UNWRAP[kind])
    o_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    o_wrapped = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(2):
        assert p_plain.step(x, y, o_plain).loss == pytest.approx(p_wrapped.step(x, y, o_wrapped).loss, abs=1e-6)
    assert_close(p_wrapped.energies(x, y), p_plain.energies(x, y))
    assert torch.equal(p_plain.best_state, p_wrapped.best_state)
    wrapped.eval()
    small = p_wrapped.export().eval()
    assert isinstance(small, _Wrapped)  # the user's type, returning the user's kind of output
    with torch.no_grad(), p_wrapped.apply():
        masked = UNWRAP[kind](wrapped(x))
    assert_close(UNWRAP[kind](small(x)), masked)


def test_parents_are_drawn_in_linear_memory_and_distinct():
    g = torch.Generator().manual_seed(0)
    parents = evo.distinct_others(10 ** 6, g)  # an S x S draw would need 4 TB
    own = torch.arange(10 ** 6)
    assert parents.shape == (10 ** 6, 3)
    assert ((parents >= 0) & (parents < 10 ** 6)).all()
    a, b, c = parents.unbind(1)
    assert ((a != own) & (b != own) & (c != own) & (a != b) & (a != c) & (b != c)).all()


def test_parent_triples_are_uniform_over_ordered_triples():
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([evo.distinct_others(5, g) for _ in range(2400)])  # [2400, 5, 3]
    for i in range(5):
        codes = (draws[:, i, 0] * 25 + draws[:, i, 1] * 5 + draws[:, i, 2]).tolist()
        counts = {}
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
        assert len(counts) == 24  # 4 * 3 * 2 ordered triples of the others
        # each with probability 1/24: 100 ± 9.8 (binomial sd); allow 5 sd
        assert all(abs(n - 100) < 5 * math.sqrt(2400 / 24 * 23 / 24) for n in counts.values()), counts


def test_a_population_too_large_for_memory_is_refused_before_allocating(batch):
    x = batch[0]
    with pytest.raises(ValueError, match=r"population_size=1000000000 with \d+ units per state needs about "
                                         r"[\d.]+ GiB for one generation, but cpu has [\d.]+ GiB free"):
        EDropout(small_net("lenet"), x[:2], population_size=10 ** 9)
