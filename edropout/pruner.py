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
from .distributed import StateCheck, forward_inside, resolve_parallelism, unwrap, wrapper_like
from .energy import check_labels, resolve_energy
from .export import export_pruned
from .masked_update import frozen_statistics, pruned_values, zero_pruned
from .masking import masked
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
    ``model`` may be wrapped in ``DistributedDataParallel``; with ``torch.distributed`` initialised (or a
    ``process_group``) the pruner runs ``parallel="data"`` (default) or ``"population"`` across the ranks
    (``edropout.distributed``), and every rank must call ``step``/``energies`` together.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, population_size: int = 8,
                 init_keep: float = 0.5, mutation_factor: float = 0.9, crossover_rate: float = 0.9,
                 energy="margin", backend="auto", seed: int = 0, min_iterations: int = 100,
                 patience: int = 10, rescore_parents: bool = False, score_in_eval_mode: bool = False,
                 ignored_layers=None, max_members_per_pass=None, compact_after_convergence: bool = True,
                 process_group=None, parallel=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not torch.is_tensor(example_inputs):
            raise TypeError("example_inputs must be a Tensor batch of the model's input (e.g. x[:2])")
        self.model, self.ddp = unwrap(model)  # the module to prune, and its DDP wrapper for training forwards
        model = self.model
        self.parallelism = resolve_parallelism(self.ddp, process_group, parallel)
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
        population = evo.initial_population(self.population_size, self.units.num_units, self.init_keep,
                                            self.generator)
        self.population = evo.keep_one_per_group(population, self._group_of_unit, self.generator).to(self.device)
        self.stored_energies = None
        self.best_state = torch.ones(self.units.num_units, dtype=torch.bool, device=self.device)
        self.convergence = evo.Convergence(int(min_iterations), int(patience))
        self.iteration = 0
        self.converged = False
        self.pruned_values = {}
        self._best_view = None
        self._scorer = None
        if self.parallelism is not None:
            self.parallelism.check_same_settings(
                {"population_size": self.population_size, "num_units": self.num_units, "seed": self.seed,
                 "init_keep": self.init_keep, "mutation_factor": self.mutation_factor,
                 "crossover_rate": self.crossover_rate, "min_iterations": min_iterations, "patience": patience,
                 "rescore_parents": self.rescore_parents, "score_in_eval_mode": score_in_eval_mode,
                 "parallel": self.parallelism.mode}, self.device)
            self._state_check = StateCheck(self.num_units, self.device)
            # a member's scoring work grows with what it keeps (kept-channel paths): deal members by kept parameters
            self._scorer = self.parallelism.scorer(self._score_locally, self._state_check, self.units.kept_parameters)

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
        """Energies [N] of arbitrary states [N, D] on a batch; the model is left untouched. Distributed, a
        collective: the energies of the global batch (data mode; ``x`` is this rank's shard) or of the batch that
        every rank holds (population mode)."""
        self._check_batch(x, y)
        states = states.reshape(-1, self.num_units).to(self.device).bool()
        if self._scorer is not None:
            self.parallelism.check_batch(x)
            return self._scorer.score(states, x, y)
        return self._score_locally(states, x, y)

    def _score_locally(self, states, x, y):
        return self.backend.score(states, x, y)

    def energies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energy of every population member on this batch: Tensor[S]."""
        return self.score_states(self.population, x, y)

    # ----- evolution -----------------------------------------------------------------------------------
    def evolve(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One generation: children, scoring, greedy selection, best state and convergence."""
        children = self.backend.children(self.population, self.mutation_factor, self.crossover_rate,
                                         generator=self.generator, seed=self.seed, iteration=self.iteration)
        children = evo.keep_one_per_group(children, self._group_of_unit, self.generator)
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
            if self.parallelism is not None:
                self._state_check.update(self.best_state, self.iteration + 1)
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
        if self.parallelism is not None:
            self.parallelism.check_batch(x, training=True)
            if self.ddp is None:
                raise ValueError(f"distributed EDropout ({self.parallelism.world_size} ranks) trains through "
                                 f"DistributedDataParallel, which averages the ranks' gradients: build the pruner "
                                 f"on DistributedDataParallel(model) instead of the bare model")
        if not self.converged:
            self.evolve(x, y)
        if self.parallelism is not None:
            x, y = self.parallelism.training_rows(x, y)
        if self.converged and self.compact_after_convergence and self.units.traced:
            loss = self._compact_trainer(optimizer).step(x, y)
        else:
            # restored after backward: autograd saves the running statistics it was given and checks their versions
            with frozen_statistics(self.best_view.statistics_keeps):
                loss = F.cross_entropy(self._training_logits(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.backend.optimizer_step(optimizer, self.best_view)
        self.iteration += 1
        energies = self.stored_energies if self.stored_energies is not None else torch.full((1,), float("nan"))
        return StepInfo(self.iteration, float(loss.detach()), float(energies.min()), float(energies.mean()),
                        self.pruning_rate, self.converged)

    def _training_logits(self, x):
        """The backend's training forward with the best state applied; under DDP inside DDP's forward, so that
        its gradient all-reduce follows (the kept-channel forward calls the modules functionally)."""
        if self.ddp is None:
            return self.backend.training_logits(self.best_state, x)
        return forward_inside(self.ddp, lambda inputs: self.backend.training_logits(self.best_state, inputs), x)

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
            wrap = None if self.ddp is None else wrapper_like(self.ddp)  # the exported network trains under DDP too
            self._compact = CompactTrainer(self.model, self.units, self.best_view, optimizer, self.example_inputs,
                                           wrap)
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
                "unchanged": self.convergence.unchanged, "seed": self.seed,
                "pruned_values": {k: v.cpu() for k, v in self.pruned_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` taken from a pruner of the same model."""
        if state.get("num_units") != self.num_units or tuple(state["population"].shape) != \
                (self.population_size, self.num_units):
            raise ValueError(f"this checkpoint is for a population of shape {tuple(state['population'].shape)} "
                             f"(D = {state.get('num_units')}), but this pruner has S = {self.population_size}, "
                             f"D = {self.num_units}; load it into a pruner built on the same model and "
                             f"population_size")
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
