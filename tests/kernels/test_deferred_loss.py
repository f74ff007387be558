"""A non-finite training loss on the fused update path (backend "triton"): the device judges it, the update writes
nothing, and the host reports it at its next read, for the iteration it belonged to; no weight, BatchNorm statistic
(skip mode) or optimizer state (step counters, lazily created buffers included) keeps a trace of it."""
import math

import pytest
import torch

from edropout import EDropout
from edropout.checks import NonFiniteError
from nets import randomise_bn, small_net


def _setup(name, make_optimizer, **kw):
    model = randomise_bn(small_net(name)).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
    # an energy that ignores the logits stays finite, so the evolution runs and the training loss is what fails
    pruner = EDropout(model, x[:2], population_size=4, seed=0, backend="triton",
                      energy=lambda logits, targets: targets.float(), **kw)
    return model, pruner, make_optimizer(model.parameters()), x, y


def _poison(model):
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[1] = float("inf")  # logits inf and -inf ... : the cross-entropy is NaN
    return last


def _state(model, optimizer):
    """Bit patterns of every weight and buffer, and the optimizer's state as text (step counters and keys)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tensors, str(optimizer.state_dict())


def _assert_unchanged(before, model, optimizer):
    tensors, text = before
    for key, value in model.state_dict().items():
        same = (value == tensors[key]) | (value.isnan() & tensors[key].isnan()) if value.is_floating_point() \
            else value == tensors[key]
        assert bool(same.all()), key
    assert str(optimizer.state_dict()) == text


ADADELTA = lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)  # noqa: E731
SGD_MOMENTUM = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5)  # noqa: E731


@pytest.mark.parametrize("read_by", ["next_step", "step_info", "state_dict"])
def test_raise_mode_reports_the_iteration_at_the_next_read(read_by):
    model, pruner, optimizer, x, y = _setup("lenet", ADADELTA)
    pruner.step(x, y, optimizer)  # Adadelta's step counters and buffers now exist
    _poison(model)
    before = _state(model, optimizer)
    population, generator = pruner.population.clone(), pruner.generator.get_state()
    info = pruner.step(x, y, optimizer)  # the device skips the update; nothing is read yet
    assert info.iteration == 2 and pruner.iteration == 2
    match = "the training loss is nan at iteration 2; no weight was changed"
    with pytest.raises(NonFiniteError, match=match):
        if read_by == "next_step":
            pruner.step(x, y, optimizer)
        elif read_by == "step_info":
            info.loss
        else:
            pruner.state_dict()
    _assert_unchanged(before, model, optimizer)  # the step counters were put back
    if read_by == "next_step":  # the reporting step changed nothing either
        assert torch.equal(pruner.population, population) and pruner.iteration == 2
        assert not torch.equal(pruner.generator.get_state(), generator)  # iteration 2's generation stands
    pruner.step(x, y, optimizer)  # reported once: the next read finds nothing pending ...
    with pytest.raises(NonFiniteError, match="at iteration 3"):  # ... but this step's loss is NaN again
        pruner.step(x, y, optimizer)


def test_skip_mode_skips_counts_and_warns_when_read():
    model, pruner, optimizer, x, y = _setup("concat", SGD_MOMENTUM, on_nonfinite="skip")
    last = _poison(model)
    before = _state(model, optimizer)  # no momentum buffer yet: the skipped first step must not create one
    info = pruner.step(x, y, optimizer)
    with pytest.warns(RuntimeWarning, match=r"skipped a batch at iteration 1: the training loss is nan \(1 skipped"):
        assert info.skipped and math.isnan(info.loss)
    assert pruner.skipped_batches == 1
    _assert_unchanged(before, model, optimizer)  # BatchNorm statistics put back on the device
    second = pruner.step(x, y, optimizer)
    with pytest.warns(RuntimeWarning, match=r"iteration 2: the training loss is nan \(2 skipped so far\)"):
        assert pruner.skipped_batches == 2
    assert second.skipped
    _assert_unchanged(before, model, optimizer)
    with torch.no_grad():
        last.bias[1] = 0.0
    info = pruner.step(x, y, optimizer)
    assert not info.skipped and pruner.skipped_batches == 2 and pruner.iteration == 3
    # the first real step creates the momentum buffer as torch does: buffer = gradient (not (1 - dampening) times
    # it, as a buffer left behind by a skipped step would give), zero for pruned elements
    keeps = pruner.best_view.parameter_keeps
    for name, p in model.named_parameters():
        buffer = optimizer.state[p]["momentum_buffer"]
        kept = keeps[p].expand_as(p) if p in keeps else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(buffer[kept], p.grad[kept]) and bool((buffer[~kept] == 0).all()), name


@pytest.mark.parametrize("name, make_optimizer, on_nonfinite", [("lenet", ADADELTA, "raise"),
                                                                ("concat", SGD_MOMENTUM, "skip")])
def test_after_convergence_the_exported_network_s_update_is_judged_on_the_device(name, make_optimizer, on_nonfinite):
    model, pruner, optimizer, x, y = _setup(name, make_optimizer, min_iterations=2, patience=1,
                                            on_nonfinite=on_nonfinite)
    while not pruner.converged:
        pruner.step(x, y, optimizer)
    pruner.step(x, y, optimizer)  # trains the exported network; its optimizer state exists now
    small, trainer = pruner.training_network, pruner._exported_trainer
    assert small is not model and trainer is not None
    _poison(small)
    before = _state(small, trainer.optimizer)
    iteration = pruner.iteration + 1
    info = pruner.step(x, y, optimizer)  # the device skips the update; nothing is read yet
    assert pruner._pending is not None and info.iteration == iteration
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteError, match=f"the training loss is nan at iteration {iteration}; no weight "
                                                 f"was changed"):
            pruner.step(x, y, optimizer)
    else:
        with pytest.warns(RuntimeWarning, match=rf"skipped a batch at iteration {iteration}: the training loss is "
                                                rf"nan \(1 skipped so far\)"):
            assert info.skipped and pruner.skipped_batches == 1
    _assert_unchanged(before, small, trainer.optimizer)  # weights, BatchNorm statistics, step counters, buffers
