"""The interface every backend implements: what ``EDropout`` asks of one iteration's heavy parts.

A backend is bound once to a model, its prunable units, the energy function and the scoring options
(``bind``), so each call names only what changes: the states to score and the batch, the population to evolve,
the best state to train with. ``EDropout`` holds one bound backend and never asks which one it is; a new backend
subclasses ``Backend`` (usually ``ReferenceBackend``, overriding what it does faster) and registers a name with
``edropout.backends.register_backend``, or is passed to ``EDropout(backend=...)`` as an instance.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn as nn


class Backend(abc.ABC):
    """Scores states, evolves the population, runs the training forward and the masked optimizer step."""

    name = None  # the name it is registered under, if any

    def bind(self, model: nn.Module, units, energy_fn, *, batch_statistics: bool = True, max_members=None):
        """Bind to ``model`` and its ``units`` (``PrunableUnits``), the per-sample ``energy_fn``, BatchNorm batch
        statistics while scoring (else running statistics) and at most ``max_members`` members per forward (None:
        all); returns the backend. A backend serves one model and units: bind a fresh one for another."""
        if getattr(self, "model", None) is not None and (self.model is not model or self.units is not units):
            raise ValueError(f"this {type(self).__name__} is already bound to another model; pass a new backend "
                             f"object (or its name) to each EDropout")
        self.model, self.units, self.energy_fn = model, units, energy_fn
        self.batch_statistics, self.max_members = bool(batch_statistics), max_members
        self.device = next(model.parameters()).device
        return self

    def __str__(self) -> str:
        return self.name or type(self).__name__

    @property
    def trains_kept_channels(self) -> bool:
        """Whether ``training_logits`` computes on the kept channels only (else the masked dense forward)."""
        return False

    @abc.abstractmethod
    def score(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energies [S] of ``states`` [S, D] (bool, on the model's device) on the batch; the model is left
        untouched."""

    @abc.abstractmethod
    def children(self, population: torch.Tensor, mutation_factor: float, crossover_rate: float, *,
                 generator: torch.Generator, seed: int, iteration: int) -> torch.Tensor:
        """One generation of children [S, D] of ``population`` [S, D]: random draws from ``generator``, or
        counter-based ones keyed by (``seed``, ``iteration``)."""

    @abc.abstractmethod
    def select(self, population, energies, children, child_energies):
        """Greedy selection: (new population [S, D], its energies [S], index of the best member)."""

    @abc.abstractmethod
    def training_logits(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's differentiable output on ``x`` with ``state`` [D] applied, modules in their own modes."""

    @abc.abstractmethod
    def optimizer_step(self, optimizer: torch.optim.Optimizer, view) -> None:
        """``optimizer.step()`` leaving every element that ``view`` (a ``StateView``) prunes, and its optimizer
        state, exactly unchanged."""

    def optimizer_step_if_finite(self, optimizer: torch.optim.Optimizer, view, value: torch.Tensor):
        """``optimizer_step`` only if ``value`` (a 0-d tensor on the device: the training loss) is finite;
        otherwise no weight and no optimizer state changes. Returns True (stepped) or False (not) when the host
        read ``value`` (here: one wait on CUDA), or, when the device alone decided, an object whose ``undo()``
        puts back the step's host-side bookkeeping (step counters, lazily created state), for the caller to call
        once it has read ``value`` and found it non-finite."""
        if not math.isfinite(float(value)):
            return False
        self.optimizer_step(optimizer, view)
        return True
