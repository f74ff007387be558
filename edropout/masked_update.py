"""An optimizer step that leaves pruned weights and their optimizer state exactly unchanged.

Works with any ``torch.optim`` optimizer: gradients of pruned elements are zeroed, the values of pruned
elements of every parameter and of every parameter-shaped state tensor (momentum, Adam moments, Adadelta
accumulators) are saved, the ordinary step runs, and the saved values are written back. State tensors that the
step creates start at zero for pruned elements, their untouched initial value for the optimizers torch ships
lazily (SGD, Adam, AdamW, Adadelta, RMSprop, ...). So weight decay never shrinks a pruned weight and momentum
never drifts it: pruned weights are frozen, not zeroed, exactly like dropout (METHOD.md §4).
"""
from __future__ import annotations

import contextlib

import torch


def _frozen(param, keep):
    return ~keep.expand_as(param)


def masked_step(optimizer: torch.optim.Optimizer, keeps: dict) -> None:
    """``optimizer.step()`` with every element outside its keep-mask (``StateView.parameter_keeps``) left exactly
    as it was.

    Whole tensors are saved and the pruned elements written back with ``torch.where`` against the broadcastable
    mask: unlike boolean indexing this needs no index list, which made the step 8x a plain one on CPU."""
    saved = []
    for param, keep in keeps.items():
        frozen = ~keep
        if param.grad is not None:
            param.grad.masked_fill_(frozen, 0)
        state = optimizer.state.get(param, {})
        tensors = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
        saved.append((param, frozen, param.detach().clone(), tensors))
    optimizer.step()
    with torch.no_grad():
        for param, frozen, values, tensors in saved:
            torch.where(frozen, values, param, out=param)
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    if key in tensors:
                        torch.where(frozen, tensors[key], value, out=value)
                    else:  # created by this step: pruned elements start at zero
                        value.masked_fill_(frozen, 0)


@contextlib.contextmanager
def frozen_statistics(keeps: dict):
    """A training forward inside the block updates BatchNorm running statistics; on exit those of pruned channels
    are put back, so a pruned unit's statistics stay as they were, like its weights and optimizer state (and the
    masked dense forward and the kept-channels forward leave the same statistics). ``keeps``: {BatchNorm: keep
    [C]}, bool or, to spare a conversion per step, the float 1/0 weights of ``StateView.statistics_weights``.
    Three device operations for all BatchNorms: a copy, a lerp with weight 1 (kept: exactly the new value) or 0
    (pruned: exactly the saved one), a copy back."""
    modules = list(keeps)
    stats = [m.running_mean for m in modules] + [m.running_var for m in modules]
    weights = [keeps[m] if keeps[m].is_floating_point() else keeps[m].to(m.running_mean.dtype) for m in modules]
    with torch.no_grad():
        saved = torch._foreach_mul(stats, 1.0) if stats else []
    try:
        yield
    finally:
        if stats:
            with torch.no_grad():
                torch._foreach_lerp_(saved, stats, weights + weights)
                torch._foreach_copy_(stats, saved)


def pruned_values(keeps: dict) -> dict:
    """Copies of the pruned elements of every parameter in ``keeps`` (what ``finalize`` is about to zero)."""
    return {param: param.detach()[_frozen(param, keep)].clone() for param, keep in keeps.items()}


def zero_pruned(keeps: dict) -> None:
    """Set pruned weights to zero for good (``finalize``)."""
    with torch.no_grad():
        for param, keep in keeps.items():
            param.masked_fill_(_frozen(param, keep), 0)
