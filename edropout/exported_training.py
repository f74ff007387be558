"""Training after convergence on the exported (physically smaller) network, so a converged iteration costs less
than a dense one.

Once the state is frozen, the kept weights are gathered into the physically smaller network and the optimizer's
state is gathered with them; each step then trains the small network with the user's hyper-parameters (read from
the user's optimizer every step, so LR schedulers keep working). ``write_back`` copies weights, BatchNorm
statistics and optimizer state back into the user's model and optimizer, whose pruned elements stay zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .export import export_pruned
from .state_view import StateView
from .units import PrunableUnits


def _gather(tensor: torch.Tensor, kept: dict) -> torch.Tensor:
    for dim, positions in kept.items():
        tensor = tensor.index_select(dim, positions.to(tensor.device))
    return tensor


def _scatter(target: torch.Tensor, kept: dict, values: torch.Tensor) -> None:
    index = [slice(None)] * target.dim()
    dims = sorted(kept)
    for n, dim in enumerate(dims):
        shape = [1] * len(dims)
        shape[n] = -1
        index[dim] = kept[dim].to(target.device).view(shape)
    target[tuple(index)] = values


class ExportedNetworkTrainer:
    """Trains the exported network of ``view``'s state in place of the masked dense one, with the optimizer state
    carried over. ``wrap`` (e.g. a ``DistributedDataParallel`` constructor) wraps the exported network for its
    forwards."""

    def __init__(self, model: nn.Module, units: PrunableUnits, view: StateView, optimizer, example_inputs,
                 wrap=None):
        self.model, self.user_optimizer = model, optimizer
        self.small = export_pruned(model, units, view.state, example_inputs)
        self.small.train(model.training)
        self.forward = self.small if wrap is None else wrap(self.small)
        self.kept = view.kept_positions
        big_params = dict(model.named_parameters())
        small_params = dict(self.small.named_parameters())
        self.pairs = [(big_params[n], small_params[n], self.kept.get(n, {})) for n in big_params]
        small_of = {id(b): s for b, s, _ in self.pairs}
        groups = []
        for group in optimizer.param_groups:
            missing = [p for p in group["params"] if id(p) not in small_of]
            if missing:
                raise ValueError("the optimizer holds parameters that are not the model's; training the exported "
                                 "network needs an optimizer over the model's own parameters")
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [small_of[id(p)] for p in group["params"]]})
        self.optimizer = type(optimizer)(groups)
        for big, small, kept in self.pairs:
            state_big = optimizer.state.get(big)
            if state_big:
                self.optimizer.state[small] = {k: _gather(v, kept) if torch.is_tensor(v) and v.shape == big.shape
                                               else (v.clone() if torch.is_tensor(v) else v)
                                               for k, v in state_big.items()}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The small network's training forward with the user's current hyper-parameters: the cross-entropy loss."""
        for mine, theirs in zip(self.optimizer.param_groups, self.user_optimizer.param_groups):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        self.small.train(self.model.training)
        return F.cross_entropy(self.forward(x), y)

    def backward(self, loss: torch.Tensor) -> None:
        """The small network's gradients of ``loss`` (its old gradients dropped first)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def stepped(self) -> None:
        """Record that ``optimizer`` stepped: the user's optimizer stepped by proxy, and LR schedulers read this
        flag to check the order of their calls."""
        self.user_optimizer._opt_called = True

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the small network's weights, buffers and optimizer state into the user's model and optimizer."""
        for big, small, kept in self.pairs:
            _scatter(big, kept, small) if kept else big.copy_(small)
            state_small = self.optimizer.state.get(small)
            if not state_small:
                continue
            state_big = self.user_optimizer.state.setdefault(big, {})
            for key, value in state_small.items():
                if torch.is_tensor(value) and value.shape == small.shape and kept:
                    if key not in state_big:
                        state_big[key] = torch.zeros_like(big)
                    _scatter(state_big[key], kept, value)
                else:
                    state_big[key] = value.clone() if torch.is_tensor(value) else value
        big_buffers = dict(self.model.named_buffers())
        for name, buffer in self.small.named_buffers():
            target = big_buffers[name]
            if target.shape == buffer.shape:
                target.copy_(buffer)
            else:
                module = name.rsplit(".", 1)[0]
                _scatter(target, {0: self.kept[f"{module}.weight"][0]}, buffer)
