"""``EDropout``: evolve a population of pruning states by their energies while the kept weights train.

One iteration (METHOD.md §4): make children, score them on the batch, select greedily, pick the best state;
then a cross-entropy forward/backward with the best state applied and an optimizer step that leaves pruned
weights exactly unchanged. Once the best state stops changing (§5) it is frozen and pruned weights are zeroed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import evolution as evo
from .backends import Backend, make_backend
from .compact_training import CompactTrainer
from .energy import check_labels, resolve_energy
from .export import export_pruned
from .masked_update import frozen_statistics, pruned_values, zero_pruned
from .masking import masked
from .size_target import SizeMeasure, SizeTarget, check_metric
from .state_view import StateView
from .units import discover_units, model_outputs


@dataclass
class StepInfo:
    """What one ``step`` did: training loss, best and mean stored energy, pruning rate of the best state."""

    iteration: int
    loss: float
    best_energy: float
    mean_energy: float
    pruning_rate: float
    converged: bool


class EDropout:
    """Energy-based pruning of ``model``'s channels by binary differential evolution.

    ``example_inputs`` is one small input batch used to trace which channels must be pruned together.
    ``backend`` is a registered name (``edropout.backends.BACKENDS``) or a ``Backend`` object; the pruner binds
    it to the model and holds it as ``self.backend``.
    ``target`` (optional) is the share of ``target_metric`` ("params": trainable parameters, or "flops") that the
    exported network removes: every state made is repaired to it, or, with ``target_penalty`` set, penalised in
    the energy by that weight per share outside the tolerance (``edropout.size_target``). Without a target the
    evolution is the paper's.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, population_size: int = 8,
                 init_keep: float = 0.5, mutation_factor: float = 0.9, crossover_rate: float = 0.9,
                 energy="margin", backend="auto", seed: int = 0, min_iterations: int = 100,
                 patience: int = 10, rescore_parents: bool = False, score_in_eval_mode: bool = False,
                 ignored_layers=None, max_members_per_pass=None, compact_after_convergence: bool = True,
                 target=None, target_metric: str = "params", target_penalty=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not torch.is_tensor(example_inputs):
            raise TypeError("example_inputs must be a Tensor batch of the model's input (e.g. x[:2])")
        self.model = model
        self.example_inputs = example_inputs
        self.population_size = evo.check_population_size(population_size)
        self.init_keep = evo.check_probability("init_keep", init_keep)
        self.mutation_factor = evo.check_probability("mutation_factor", mutation_factor)
        self.crossover_rate = evo.check_probability("crossover_rate", crossover_rate)
        self.energy_fn = resolve_energy(energy)
        self.device = next(model.parameters()).device
        backend = make_backend(backend)  # an unknown name fails before the model is traced
        if min_iterations < 0 or patience < 1:
            raise ValueError(f"min_iterations must be >= 0 and patience >= 1, got {min_iterations} and {patience}")
        self.rescore_parents = bool(rescore_parents)
        self.batch_statistics = not score_in_eval_mode
        self._max_members_per_pass = max_members_per_pass
        self.compact_after_convergence = bool(compact_after_convergence)
        self._compact = None
        self.units = discover_units(model, example_inputs, ignored_layers)
        self.num_classes = model_outputs(model, example_inputs).shape[-1]
        self.backend = backend
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._group_of_unit = self.units.group_of_unit
        self.target_metric = check_metric(target_metric)
        self._size_measure = None  # built on first use of removed_share with the FLOPs metric
        self.size_target = None if target is None else SizeTarget(self.units, target, target_metric, target_penalty,
                                                                  model, example_inputs)
        population = evo.initial_population(self.population_size, self.units.num_units, self.init_keep,
                                            self.generator)
        population = evo.keep_one_per_group(population, self._group_of_unit, self.generator)
        self.population = self._on_target(population).to(self.device)
        self.stored_energies = None
        self.best_state = torch.ones(self.units.num_units, dtype=torch.bool, device=self.device)
        self.convergence = evo.Convergence(int(min_iterations), int(patience))
        self.iteration = 0
        self.converged = False
        self.pruned_values = {}
        self._best_view = None

    @property
    def backend(self) -> Backend:
        """The bound backend that scores, evolves, runs the training forward and the masked update. Assigning a
        name or a ``Backend`` object binds it to this pruner's model."""
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        self._backend = make_backend(backend).bind(self.model, self.units, self.energy_fn,
                                                   batch_statistics=self.batch_statistics,
                                                   max_members=self._max_members_per_pass)

    @property
    def max_members_per_pass(self):
        """At most this many members per scoring forward (None: the whole population at once)."""
        return self._max_members_per_pass

    @max_members_per_pass.setter
    def max_members_per_pass(self, value) -> None:
        self._max_members_per_pass = self.backend.max_members = value

    # ----- scoring -------------------------------------------------------------------------------------
    @property
    def num_units(self) -> int:
        """D, the number of prunable unit groups (bits per state)."""
        return self.units.num_units

    def _check_batch(self, x, y):
        if not torch.is_tensor(x) or not torch.is_tensor(y):
            raise TypeError("x and y must be Tensors (inputs [B, ...] and integer labels [B])")
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size and y must be 1-D labels; got x "
                             f"{tuple(x.shape)} and y {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        check_labels(y, self.num_classes)

    def score_states(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energies [N] of arbitrary states [N, D] on a batch; the model is left untouched."""
        self._check_batch(x, y)
        states = states.reshape(-1, self.num_units).to(self.device).bool()
        energies = self.backend.score(states, x, y)
        return energies if self.size_target is None else self.size_target.penalise(states, energies)

    def energies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energy of every population member on this batch: Tensor[S]."""
        return self.score_states(self.population, x, y)

    # ----- evolution -----------------------------------------------------------------------------------
    def _on_target(self, states: torch.Tensor) -> torch.Tensor:
        """States repaired to the size target (unchanged without a target or when it is a penalty)."""
        return states if self.size_target is None else self.size_target.repair(states, self.generator)

    def evolve(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One generation: children, scoring, greedy selection, best state and convergence."""
        children = self.backend.children(self.population, self.mutation_factor, self.crossover_rate,
                                         generator=self.generator, seed=self.seed, iteration=self.iteration)
        children = self._on_target(evo.keep_one_per_group(children, self._group_of_unit, self.generator))
        if self.stored_energies is None or self.rescore_parents:
            both = self.score_states(torch.cat([self.population, children]), x, y)
            self.stored_energies, child_energies = both.split(self.population_size)
        else:
            child_energies = self.score_states(children, x, y)
        self.population, self.stored_energies, best_index = self.backend.select(
            self.population, self.stored_energies, children, child_energies)
        best = self.population[best_index]
        changed = not torch.equal(best, self.best_state)  # the one host synchronisation of an iteration
        if changed:
            self.best_state = best.clone()
        if self.convergence.update(self.iteration + 1, changed):
            self.finalize()

    # ----- training ------------------------------------------------------------------------------------
    @property
    def best_view(self) -> StateView:
        """The best state's ``StateView`` (keep-masks, statistics keeps, pruning rate, ...), built once per best
        state: again only when ``best_state`` is replaced."""
        if self._best_view is None or self._best_view.state is not self.best_state:
            self._best_view = StateView(self.model, self.units, self.best_state)
        return self._best_view

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepInfo:
        """One EDropout iteration: evolve and select (until converged), then a masked training step."""
        self._check_batch(x, y)
        if not self.converged:
            self.evolve(x, y)
        if self.converged and self.compact_after_convergence and self.units.traced:
            loss = self._compact_trainer(optimizer).step(x, y)
        else:
            # restored after backward: autograd saves the running statistics it was given and checks their versions
            with frozen_statistics(self.best_view.statistics_keeps):
                loss = F.cross_entropy(self.backend.training_logits(self.best_state, x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.backend.optimizer_step(optimizer, self.best_view)
        self.iteration += 1
        energies = self.stored_energies if self.stored_energies is not None else torch.full((1,), float("nan"))
        return StepInfo(self.iteration, float(loss.detach()), float(energies.min()), float(energies.mean()),
                        self.pruning_rate, self.converged)

    @property
    def trains_kept_channels(self) -> bool:
        """Whether the training forward runs on the best state's kept channels only (the backend's answer: on CPU
        with backend "auto" or "compact" and the model in train mode)."""
        return self.backend.trains_kept_channels

    def _compact_trainer(self, optimizer) -> CompactTrainer:
        if self._compact is not None and self._compact.user_optimizer is not optimizer:
            self.sync()
            self._compact = None
        if self._compact is None:
            self._compact = CompactTrainer(self.model, self.units, self.best_view, optimizer, self.example_inputs)
        return self._compact

    def sync(self) -> None:
        """After convergence training runs on the compact network; copy its weights, BatchNorm statistics and
        optimizer state back into the user's model and optimizer (``export`` and ``state_dict`` do this too)."""
        if self._compact is not None:
            self._compact.write_back()

    def finalize(self) -> None:
        """Freeze the best state, stop evolving and zero pruned weights for good."""
        if self.converged:
            return
        self.converged = True
        names = {param: name for name, param in self.model.named_parameters()}
        keeps = self.best_view.parameter_keeps
        self.pruned_values = {names[param]: values for param, values in pruned_values(keeps).items()}
        zero_pruned(keeps)

    # ----- results -------------------------------------------------------------------------------------
    @property
    def pruning_rate(self) -> float:
        """Share of trainable parameters that the best state removes when exported."""
        return self.best_view.pruning_rate

    @property
    def target(self):
        """The requested share of ``target_metric`` to remove, or None."""
        return None if self.size_target is None else self.size_target.target

    @property
    def _target_settings(self):
        """What a checkpoint records of the size target, to refuse resuming under another one."""
        if self.size_target is None:
            return None
        return {"target": self.target, "metric": self.target_metric, "penalty": self.size_target.penalty_weight}

    @property
    def removed_share(self) -> float:
        """Share of ``target_metric`` (trainable parameters or FLOPs) that the best state removes when exported."""
        if self.target_metric == "params":
            return self.pruning_rate
        if self._size_measure is None:
            self._size_measure = (SizeMeasure(self.units, self.target_metric, self.model, self.example_inputs)
                                  if self.size_target is None else self.size_target.measure)
        return float(self._size_measure.share_removed(self.best_state[None])[0])

    @property
    def units_kept_share(self) -> float:
        """Share of the prunable units (bits) that the best state keeps."""
        return float(self.best_state.float().mean())

    @contextlib.contextmanager
    def full_network(self):
        """Context manager for the paper's (F): every unit kept, pruned weights at the values they were frozen
        at before ``finalize`` zeroed them (the dropout-style full network). Zeroed again on exit."""
        self.sync()
        params = dict(self.model.named_parameters())
        keeps = self.best_view.parameter_keeps
        try:
            with torch.no_grad():
                for name, values in self.pruned_values.items():
                    params[name][~keeps[params[name]].expand_as(params[name])] = values.to(self.device)
            yield
        finally:
            if self.converged:
                zero_pruned(keeps)

    def apply(self, state=None):
        """Context manager: the model computes with ``state`` (default: the best state) applied."""
        return masked(self.model, self.units, self.best_state if state is None else state.to(self.device))

    def export(self) -> nn.Module:
        """A physically smaller copy of the model without the best state's pruned units."""
        self.sync()
        return export_pruned(self.model, self.units, self.best_state, self.example_inputs)

    # ----- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume the evolution exactly: population, energies, RNG, counters.

        Also brings the user's model and optimizer up to date (``sync``), so save them after this call."""
        self.sync()
        return {"num_units": self.num_units, "population": self.population.cpu(),
                "stored_energies": None if self.stored_energies is None else self.stored_energies.cpu(),
                "best_state": self.best_state.cpu(), "generator": self.generator.get_state(),
                "iteration": self.iteration, "converged": self.converged,
                "unchanged": self.convergence.unchanged, "seed": self.seed, "size_target": self._target_settings,
                "pruned_values": {k: v.cpu() for k, v in self.pruned_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` taken from a pruner of the same model."""
        if state.get("num_units") != self.num_units or tuple(state["population"].shape) != \
                (self.population_size, self.num_units):
            raise ValueError(f"this checkpoint is for a population of shape {tuple(state['population'].shape)} "
                             f"(D = {state.get('num_units')}), but this pruner has S = {self.population_size}, "
                             f"D = {self.num_units}; load it into a pruner built on the same model and "
                             f"population_size")
        if state.get("size_target") != self._target_settings:
            raise ValueError(f"this checkpoint was made with size target {state.get('size_target')}, but this pruner "
                             f"has {self._target_settings}; build the pruner with the checkpoint's target, "
                             f"target_metric and target_penalty to resume it")
        self.population = state["population"].to(self.device).bool()
        energies = state["stored_energies"]
        self.stored_energies = None if energies is None else energies.to(self.device)
        self.best_state = state["best_state"].to(self.device).bool()
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.converged = bool(state["converged"])
        self.convergence.unchanged = int(state["unchanged"])
        self.seed = int(state["seed"])
        self._compact = None
        self.pruned_values = state.get("pruned_values", {})
