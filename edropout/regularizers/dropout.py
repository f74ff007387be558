"""Plain (inverted) dropout after every activation module of a model, the Dropout baseline of METHOD.md §8.

The engine's networks apply dropout, if at all, only in front of their hidden Linear layers; the Bridgeout
comparison needs it on the conv activations too. ``apply_dropout`` swaps each activation module (default:
every ``nn.ReLU``) for ``ActivationDropout(activation, p)`` in place; ``remove_dropout`` swaps them back, so the
trained model is the plain network again (dropout is the identity in eval mode either way). ``disable_dropout``
sets the probability of a model's own ``nn.Dropout`` layers to 0, for runs that must have no dropout at all.
"""
from __future__ import annotations

from typing import List, Sequence, Type

from torch import nn

__all__ = ["ActivationDropout", "apply_dropout", "remove_dropout", "disable_dropout"]


class ActivationDropout(nn.Sequential):
    """An activation module followed by ``nn.Dropout(p)``; ``activation`` is the original module object."""

    def __init__(self, activation: nn.Module, p: float):
        super().__init__(activation, nn.Dropout(p))
        self.train(activation.training)  # a model in eval mode stays in eval mode

    @property
    def activation(self) -> nn.Module:
        return self[0]


def _parent_and_attr(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr


def apply_dropout(model: nn.Module, p: float = 0.3,
                  after: Sequence[Type[nn.Module]] = (nn.ReLU,)) -> List[str]:
    """Put ``nn.Dropout(p)`` after every module of a type in ``after`` (in place); returns their names.

    A module object registered under several names is wrapped once per name (each use gets its own dropout).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"apply_dropout: p={p!r} is the drop probability; use 0 <= p < 1.")
    if any(isinstance(m, ActivationDropout) for m in model.modules()):
        raise TypeError("model already has ActivationDropout wrappers: call remove_dropout(model) first.")
    kinds = tuple(after)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, kinds)]
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, ActivationDropout(getattr(parent, attr), p))
    return names


def remove_dropout(model: nn.Module) -> List[str]:
    """Swap every ``ActivationDropout`` back for its activation module; returns the restored names."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ActivationDropout)]
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, getattr(parent, attr).activation)
    return names


def disable_dropout(model: nn.Module) -> List[str]:
    """Set p = 0 on every ``nn.Dropout`` of ``model`` (the layers stay, as identities); returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            names.append(name)
    return names
