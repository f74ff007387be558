"""``EDropout``: evolve a population of pruning states by their energies while the kept weights train.

One iteration (METHOD.md §4): make children, score them on the batch, select greedily, pick the best state;
then a cross-entropy forward/backward with the best state applied and an optimizer step that leaves pruned
weights exactly unchanged. Once the best state stops changing (§5) it is frozen and pruned weights are zeroed.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import evolution as evo
from .backends import Backend, make_backend
from .checks import (MALFORMED_VERDICT, LogitsOf, NonFiniteError, batch_flags, batch_problem, batch_verdict,
                     check_batch, check_logits, check_on_nonfinite, check_optimizer, model_device,
                     other_ranks_problem)
from .deferred_loss import DeferredLossCheck
from .distributed import StateCheck, forward_inside, resolve_parallelism, unwrap, wrapper_like
from .energy import resolve_energy
from .export import export_pruned
from .exported_training import ExportedNetworkTrainer
from .masked_update import frozen_statistics, pruned_values, zero_pruned
from .masking import masked, share_masks
from .size_target import SizeMeasure, SizeTarget, check_metric
from . import host
from .state_view import ALL_KEPT, StateView
from .units import discover_units, model_outputs


class StepInfo:
    """What one ``step`` did: training loss, best and mean stored energy, pruning rate of the best state, and
    whether the batch was skipped (``on_nonfinite="skip"``: no weight changed).

    The loss and energies stay on the device until read: reading one of them (or ``skipped``) waits for the
    step's kernels (on CUDA) once, for all three; a training loop that does not read them every step never waits
    for them. When the device alone judged the loss (``check``, the fused update), that read also reports a
    non-finite loss, as the next ``step`` would have: ``NonFiniteError``, or a warning and ``skipped`` True."""

    def __init__(self, iteration: int, loss: torch.Tensor, energies: torch.Tensor, view, converged: bool,
                 skipped: bool = False, check: DeferredLossCheck | None = None, settle=None):
        self.iteration, self.converged, self._skipped = iteration, converged, skipped
        self._loss, self._energies, self._view, self._values = loss.detach(), energies, view, None
        self._check, self._settle = check, settle

    def _read(self) -> list:
        if self._values is None:
            e = self._energies
            parts = [self._loss.double().reshape(()), e.min().double(), e.mean().double()]
            if self._check is not None:
                parts.append(self._check.tensors[-1].double().reshape(()))
            values = torch.stack(parts).tolist()
            if self._check is not None:
                self._settle([values[0], values.pop()], self._check)
            self._values = values
        return self._values

    @property
    def skipped(self) -> bool:
        """Whether the step changed no weight (``on_nonfinite="skip"``)."""
        if self._check is not None and self._check.skipped is None:
            self._read()
        return self._skipped or bool(self._check is not None and self._check.skipped)

    @property
    def loss(self) -> float:
        return self._read()[0]

    @property
    def best_energy(self) -> float:
        return self._read()[1]

    @property
    def mean_energy(self) -> float:
        return self._read()[2]

    @property
    def pruning_rate(self) -> float:
        """Share of parameters the best state removes (from the state's host copy: no wait)."""
        return self._view.pruning_rate

    def __repr__(self) -> str:
        return (f"StepInfo(iteration={self.iteration}, loss={self.loss:.4g}, best_energy={self.best_energy:.4g}, "
                f"mean_energy={self.mean_energy:.4g}, pruning_rate={self.pruning_rate:.4g}, "
                f"converged={self.converged}, skipped={self.skipped})")


class EDropout:
    """Energy-based pruning of ``model``'s channels by binary differential evolution.

    ``example_inputs`` is one small input batch used to trace which channels must be pruned together.
    ``backend`` is a registered name (``edropout.backends.BACKENDS``) or a ``Backend`` object; the pruner binds
    it to the model and holds it as ``self.backend``.
    ``output_to_logits`` maps the model's output to the logits Tensor when the model returns something else (a
    tuple, a dict, an object with ``.logits``), e.g. ``lambda out: out.logits``. ``on_nonfinite``: a batch with
    NaN or infinite inputs, a non-finite training loss, or a batch on which every energy is non-finite raises
    ``NonFiniteError`` before any weight or optimizer state changes ("raise"), or is skipped with a warning and
    counted in ``skipped_batches`` ("skip"). Where the fused masked update runs (backend "triton" with SGD, Adam,
    AdamW or Adadelta) the device alone judges the training loss, without a host wait, also when the exported
    network trains after convergence: a non-finite loss makes the update write nothing, and it is reported
    (raised, or warned and counted) at the next read of the device: the next ``step``, or a read of that step's
    ``StepInfo``, of ``skipped_batches``, or ``sync``/``state_dict``/``export``, naming the iteration it belonged
    to.
    ``model`` may be wrapped in ``DistributedDataParallel``; with ``torch.distributed`` initialised (or a
    ``process_group``) the pruner runs ``parallel="data"`` (default) or ``"population"`` across the ranks
    (``edropout.distributed``), and every rank must call ``step``/``energies`` together.
    ``target`` (optional) is the share of ``target_metric`` ("params": trainable parameters, or "flops") that the
    exported network removes: every state made is repaired to it, or, with ``target_penalty`` set, penalised in
    the energy by that weight per share outside the tolerance (``edropout.size_target``). Without a target the
    evolution is the paper's.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, population_size: int = 8,
                 init_keep: float = 0.5, mutation_factor: float = 0.9, crossover_rate: float = 0.9,
                 energy="margin", backend="auto", seed: int = 0, min_iterations: int = 100,
                 patience: int = 10, rescore_parents: bool = False, score_in_eval_mode: bool = False,
                 ignored_layers=None, max_members_per_pass=None, train_exported_after_convergence: bool = True,
                 output_to_logits=None, on_nonfinite: str = "raise", process_group=None, parallel=None,
                 compact_after_convergence=None, target=None, target_metric: str = "params",
                 target_penalty=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not torch.is_tensor(example_inputs):
            raise TypeError("example_inputs must be a Tensor batch of the model's input (e.g. x[:2])")
        model, self.ddp = unwrap(model)  # the module to prune, and its DDP wrapper for training forwards
        self.parallelism = resolve_parallelism(self.ddp, process_group, parallel)
        self.device = model_device(model)
        if output_to_logits is not None and not callable(output_to_logits):
            raise TypeError("output_to_logits must be a function from the model's output to the logits Tensor")
        # the engine sees logits whatever the model returns; the wrapper shares the model's modules
        self.model = model if output_to_logits is None else LogitsOf(model, output_to_logits)
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        if self.parallelism is not None and self.on_nonfinite == "skip":
            raise ValueError("on_nonfinite='skip' cannot be used across ranks: each rank checks its own batch, so "
                             "ranks would skip different iterations and wait for each other forever; use 'raise'")
        self._skipped_batches = 0
        self._pending = None  # the last step's DeferredLossCheck, until the host reads its loss
        self._checked_optimizer = None
        self.example_inputs = example_inputs
        self.population_size = evo.check_population_size(population_size)
        self.init_keep = evo.check_probability("init_keep", init_keep)
        self.mutation_factor = evo.check_probability("mutation_factor", mutation_factor)
        self.crossover_rate = evo.check_probability("crossover_rate", crossover_rate)
        self.energy_fn = resolve_energy(energy)
        backend = make_backend(backend)  # an unknown name fails before the model is traced
        if min_iterations < 0 or patience < 1:
            raise ValueError(f"min_iterations must be >= 0 and patience >= 1, got {min_iterations} and {patience}")
        self.rescore_parents = bool(rescore_parents)
        self.batch_statistics = not score_in_eval_mode
        self._max_members_per_pass = max_members_per_pass
        if compact_after_convergence is not None:
            warnings.warn("EDropout(compact_after_convergence=...) is now train_exported_after_convergence=...",
                          DeprecationWarning, stacklevel=2)
            train_exported_after_convergence = compact_after_convergence
        self.train_exported_after_convergence = bool(train_exported_after_convergence)
        self._exported_trainer = None
        self.num_classes = check_logits(model_outputs(self.model, example_inputs),
                                        output_to_logits is not None).shape[-1]
        self.units = discover_units(self.model, example_inputs, ignored_layers)
        self.backend = backend
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._groups = int(self.units.group_of_unit.max()) + 1
        self._group_of_unit = self.units.group_of_unit.to(self.device)  # on the device once, not every iteration
        evo.check_population_memory(self.population_size, self.units.num_units, self.device)
        self.target_metric = check_metric(target_metric)
        self._size_measure = None  # built on first use of removed_share with the FLOPs metric
        self.size_target = None if target is None else SizeTarget(self.units, target, target_metric, target_penalty,
                                                                  model, example_inputs)
        population = evo.initial_population(self.population_size, self.units.num_units, self.init_keep,
                                            self.generator)
        population = evo.keep_one_per_group(population, self._group_of_unit, self.generator, self._groups)
        self.population = self._on_target(population).to(self.device)
        self.stored_energies = None
        all_kept = torch.ones(self.units.num_units, dtype=torch.bool)
        self._set_best(all_kept.to(self.device), all_kept)
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

    def _finite_batch(self, x, y):
        """The batch's labels as int64; a non-finite input raises ``NonFiniteError`` (whatever ``on_nonfinite``:
        a call that only scores has no batch to skip), on every rank when any rank's batch has one. One read of the
        device."""
        y = self._checked_batch(x, y)
        problem = self._read_batch_problem(x, batch_flags(x, y))
        if problem:
            raise NonFiniteError(f"{problem}; clean or drop this batch")
        return y

    def _checked_batch(self, x, y, training=False, evolving=False):
        """``check_batch`` (across ranks also the parallelism's batch check, of a ``training`` batch); a malformed
        batch raises its error on its rank after taking part in the collective the other ranks enter next (the
        energy collective when ``evolving``, else the batch-verdict all-reduce) with ``MALFORMED_VERDICT``, which
        stops them too: no rank waits alone."""
        if self.parallelism is None:
            return check_batch(x, y, self.device)
        try:
            y = check_batch(x, y, self.device)
            self.parallelism.check_batch(x, training)
            return y
        except (TypeError, ValueError):
            verdict = torch.tensor(MALFORMED_VERDICT, dtype=torch.float64, device=self.device)
            if evolving:
                scored = 2 if self.stored_energies is None or self.rescore_parents else 1
                self._scorer.abstain(scored * self.population_size, verdict)
            else:
                dist.all_reduce(verdict, group=self.parallelism.group)
            raise

    def _read_batch_problem(self, x, flags):
        """``_batch_problem`` of the batch's unread ``flags``, read with the last step's loss; across ranks after
        one all-reduce of the ranks' batch verdicts (3 values), so that every rank judges every batch."""
        everywhere = None
        if self.parallelism is not None:
            everywhere = batch_verdict(flags, x, self.num_classes)
            dist.all_reduce(everywhere, group=self.parallelism.group)
        return self._read_judged(x, flags, everywhere)[1]

    def _read_judged(self, x, flags, everywhere, *tensors):
        """(host copies of ``tensors``, the batch's problem) in one read (``_read_settling``): ``_batch_problem``
        of its unread ``flags`` and, across ranks, of ``everywhere``, the ranks' summed verdicts (None: not
        distributed); no problem without ``flags``."""
        extra = [] if everywhere is None else [everywhere]
        values = self._read_settling(*tensors, *(flags or ()), *extra)
        host, flags_host = values[:len(tensors)], values[len(tensors):]
        everywhere_host = flags_host.pop() if extra else None
        return host, (self._batch_problem(flags_host, x, everywhere_host) if flags_host else None)

    def _batch_problem(self, flags_host, x, everywhere=None):
        """What is wrong with this rank's batch (``checks.batch_problem``; labels out of range raise), else, given
        the host copy of the ranks' summed batch verdicts, with another rank's (``checks.other_ranks_problem``):
        every rank stops on the same batch, none waits alone in a collective; None when every batch is fine."""
        problem = batch_problem(flags_host, x, self.num_classes)
        if problem is None and everywhere is not None:
            problem = other_ranks_problem(everywhere, self.num_classes)
        return problem

    def _read_settling(self, *tensors) -> list:
        """Host copies of ``tensors`` in one read (``host.read``), which also reads and reports the last step's
        deferred training loss (``_settle``)."""
        pending = self._pending
        if pending is None:
            return host.read(*tensors)
        values = host.read(*tensors, *pending.tensors)
        self._settle([v.tolist() for v in values[len(tensors):]], pending)
        return values[:len(tensors)]

    def _settle(self, values=None, check=None) -> None:
        """Report the last step's deferred loss check (only if it is ``check``, when given) from the host values
        of its ``tensors`` (``values``; read here when None): a skipped update raises or is warned about and
        counted, for its own iteration (it wrote nothing; ``DeferredLossCheck.settle`` undoes its bookkeeping)."""
        pending = self._pending
        if pending is None or (check is not None and check is not pending):
            return
        if values is None:
            values = [v.tolist() for v in host.read(*pending.tensors)]
        self._pending = None
        loss, every = values[0], values[-1]
        if pending.settle(math.isfinite(every)):
            self._report(self._loss_problem(loss), pending.iteration)

    @property
    def skipped_batches(self) -> int:
        """Batches skipped so far (``on_nonfinite="skip"``); reads the last step's deferred loss check first."""
        self._settle()
        return self._skipped_batches

    def _report(self, problem: str, iteration: int) -> None:
        """Raise ``NonFiniteError``, or count and warn (``on_nonfinite``), for ``problem`` found at ``iteration``."""
        if self.on_nonfinite == "raise":
            raise NonFiniteError(f"{problem} at iteration {iteration}; no weight was changed. Clean the data "
                                 f"or lower the learning rate, or pass on_nonfinite='skip' to skip such batches")
        self._skipped_batches += 1
        warnings.warn(f"EDropout skipped a batch at iteration {iteration}: {problem} "
                      f"({self._skipped_batches} skipped so far)", RuntimeWarning, stacklevel=4)

    def _nonfinite(self, problem: str) -> StepInfo:
        """Raise, or count and warn and return the skipped step's info (``on_nonfinite``)."""
        self._report(problem, self.iteration + 1)
        energies = self.stored_energies if self.stored_energies is not None else torch.full((1,), float("nan"))
        return StepInfo(self.iteration, torch.tensor(float("nan")), energies, self.best_view, self.converged,
                        skipped=True)

    def score_states(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energies [N] of arbitrary states [N, D] on a batch; the model is left untouched. A state whose energy
        is non-finite gets +inf. Distributed, a collective: the energies of the global batch (data mode; ``x`` is
        this rank's shard) or of the batch that every rank holds (population mode)."""
        return self._score(states, x, self._finite_batch(x, y))[0]

    def _score(self, states, x, y, verdict=None):
        """(energies [N] of ``states``, the ranks' summed batch verdicts or None in one process): across ranks the
        energy collective also carries this rank's ``verdict`` (``checks.batch_verdict``; None: nothing to report)."""
        states = states.reshape(-1, self.num_units).to(self.device).bool()
        everywhere = None
        if self._scorer is not None:
            energies, everywhere = self._scorer.score(states, x, y, verdict)
        else:
            energies = self._score_locally(states, x, y)
        return energies if self.size_target is None else self.size_target.penalise(states, energies), everywhere

    def _score_locally(self, states, x, y):
        return self.backend.score(states, x, y)

    def energies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Energy of every population member on this batch: Tensor[S] (+inf for a member whose energy is
        non-finite; ``NonFiniteError`` when every member's is)."""
        energies = self.score_states(self.population, x, y)
        if not bool(torch.isfinite(energies).any()):
            raise NonFiniteError("every population member's energy is non-finite on this batch: the model's "
                                 "outputs overflow or are NaN whatever is pruned")
        return energies

    # ----- evolution -----------------------------------------------------------------------------------
    def _on_target(self, states: torch.Tensor) -> torch.Tensor:
        """States repaired to the size target (unchanged without a target or when it is a penalty)."""
        return states if self.size_target is None else self.size_target.repair(states, self.generator)

    def evolve(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One generation: children, scoring, greedy selection, best state and convergence."""
        problem = self._evolve(x, self._finite_batch(x, y))
        if problem:
            raise NonFiniteError(problem)

    def _evolve(self, x, y, flags=None):
        """``evolve`` on a batch; returns a problem (and changes nothing) when every energy is non-finite or, with
        the batch's unread ``flags`` (``checks.batch_flags``; ``y`` then clamped to the classes, so that scoring
        never indexes past the logits), when its inputs are; labels out of range raise, also before any change."""
        generator_state = self.generator.get_state()
        children = self.backend.children(self.population, self.mutation_factor, self.crossover_rate,
                                         generator=self.generator, seed=self.seed, iteration=self.iteration)
        children = self._on_target(evo.keep_one_per_group(children, self._group_of_unit, self.generator, self._groups))
        stored = self.stored_energies
        # across ranks the batch's verdict travels with the energies, so that every rank stops on a bad batch
        verdict = None if not flags or self.parallelism is None else batch_verdict(flags, x, self.num_classes)
        if stored is None or self.rescore_parents:
            scored, everywhere = self._score(torch.cat([self.population, children]), x, y, verdict)
            stored, child_energies = scored.split(self.population_size)
        else:
            child_energies, everywhere = self._score(children, x, y, verdict)
        population, energies, best_index = self.backend.select(self.population, stored, children, child_energies)
        index = best_index.reshape(1)
        best = population.index_select(0, index)[0]  # indexing with a 0-d tensor would wait for the device
        # the one host synchronisation of an iteration: the best state itself (StateView derives its masks from
        # this host copy without waiting again), its energy, the batch's value checks (scoring changed no weight,
        # so a bad batch is still refused before any change) and the last step's loss
        try:
            (best_host, best_energy), problem = self._read_judged(x, flags, None if verdict is None else everywhere,
                                                                  best, energies.index_select(0, index))
        except Exception:
            self.generator.set_state(generator_state)
            raise
        if problem is None and not math.isfinite(best_energy.tolist()[0]):
            problem = "every population member's energy is non-finite on this batch"
        if problem:
            self.generator.set_state(generator_state)
            return problem
        changed = best_host.tolist() != self._best_host.tolist()
        self.population, self.stored_energies = population, energies
        if changed:
            self._set_best(best, best_host)
            if self.parallelism is not None:
                self._state_check.update(self.best_state, self.iteration + 1)
        if self.convergence.update(self.iteration + 1, changed):
            self.finalize()
        return None

    # ----- training ------------------------------------------------------------------------------------
    @property
    def best_state(self) -> torch.Tensor:
        """The best state [D] (True = keep), on the model's device."""
        return self._best_state

    @best_state.setter
    def best_state(self, state: torch.Tensor) -> None:
        # a user's assignment (e.g. to export a chosen state) also records the host copy the derived masks and
        # the pruning rate read, at the cost of one device read
        state = torch.as_tensor(state).bool()
        self._set_best(state.to(self.device), state.detach().cpu())

    def _set_best(self, state: torch.Tensor, host: torch.Tensor) -> None:
        """Make ``state`` (on the device) the best state, with ``host`` its copy on the host."""
        self._best_state, self._best_host = state, host

    @property
    def best_view(self) -> StateView:
        """The best state's ``StateView`` (keep-masks, statistics keeps, pruning rate, ...), built once per best
        state: again only when ``best_state`` is replaced."""
        if self._best_view is None or self._best_view.state is not self.best_state:
            self._best_view = StateView(self.model, self.units, self.best_state, self._best_host)
            # the training forward's masks come from the view's host-derived table, in the view's one upload
            share_masks(self.units, self.best_state, self._best_view.point_table)
        return self._best_view

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepInfo:
        """One EDropout iteration: evolve and select (until converged), then a masked training step.

        Non-finite inputs, a non-finite loss, or every energy non-finite raise ``NonFiniteError`` before any
        weight or optimizer state changes, or skip the batch (``on_nonfinite="skip"``). An evolving step reads the
        device once (the convergence read, which also carries the batch check and the previous step's loss); the
        loss is judged on the device by the fused update (else one read by the backend), and a non-finite one is
        reported at the next read (see the class docstring)."""
        y = self._checked_batch(x, y, training=True, evolving=not self.converged)
        flags = batch_flags(x, y)
        if optimizer is not self._checked_optimizer:
            check_optimizer(optimizer, self.model)
            self._checked_optimizer = optimizer
        if self.parallelism is not None and self.ddp is None:
            raise ValueError(f"distributed EDropout ({self.parallelism.world_size} ranks) trains through "
                             f"DistributedDataParallel, which averages the ranks' gradients: build the pruner "
                             f"on DistributedDataParallel(model) instead of the bare model")
        if not self.converged:
            problem = self._evolve(x, y.clamp(0, self.num_classes - 1), flags)
        else:
            problem = self._read_batch_problem(x, flags)
        if problem:
            return self._nonfinite(problem)
        if self.parallelism is not None:
            x, y = self.parallelism.training_rows(x, y)
        exported = self.converged and self.train_exported_after_convergence and self.units.traced
        trainer = self._trainer_for(optimizer) if exported else None
        trained = trainer.small if exported else self.model
        saved = [b.clone() for b in trained.buffers()] if self.on_nonfinite == "skip" else None
        check = None
        if exported:  # the exported network: nothing pruned in it, so its update is the plain one
            loss = trainer.loss(x, y)
            trainer.backward(loss)
            stepped, view = trainer.optimizer, ALL_KEPT
        else:
            # restored after backward: autograd saves the running statistics it was given and checks their versions
            with frozen_statistics(self.best_view.statistics_weights):
                loss = F.cross_entropy(self._training_logits(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            stepped, view = optimizer, self.best_view
        every = self._loss_everywhere(loss)
        if saved is not None:  # a non-finite forward's BatchNorm statistics are put back, on the device
            finite = torch.isfinite(every)
            with torch.no_grad():
                for buffer, value in zip(trained.buffers(), saved):
                    torch.where(finite, buffer, value, out=buffer)
        taken = self.backend.optimizer_step_if_finite(stepped, view, every)
        if taken is False:
            return self._nonfinite_loss(loss)
        if exported:
            trainer.stepped()
        if taken is not True:  # the device judged the loss: the host reads it at its next read
            check = self._pending = DeferredLossCheck(self.iteration + 1, loss.detach(), every, taken)
        self.iteration += 1
        energies = self.stored_energies if self.stored_energies is not None else torch.full((1,), float("nan"))
        return StepInfo(self.iteration, loss, energies, self.best_view, self.converged, check=check,
                        settle=self._settle)

    def _loss_everywhere(self, loss) -> torch.Tensor:
        """A 0-d device value that is finite exactly when the update may run: the loss itself; across ranks, the
        sum of every rank's loss (DDP averaged every rank's gradients, so a non-finite loss anywhere must skip
        the update everywhere): one all-reduce, no host read."""
        if self.parallelism is None:
            return loss.detach()
        every = loss.detach().float().clone()
        dist.all_reduce(every, op=dist.ReduceOp.SUM, group=self.parallelism.group)
        return every

    @staticmethod
    def _loss_problem(value: float) -> str:
        """What ``on_nonfinite`` reports for a skipped update whose own training loss was ``value``."""
        if math.isfinite(value):
            return "another rank's training loss is non-finite"
        return f"the training loss is {value}"

    def _training_logits(self, x):
        """The backend's training forward with the best state applied; under DDP inside DDP's forward, so that
        its gradient all-reduce follows (the kept-channel forward calls the modules functionally)."""
        if self.ddp is None:
            return self.backend.training_logits(self.best_state, x)
        return forward_inside(self.ddp, lambda inputs: self.backend.training_logits(self.best_state, inputs), x)

    def _nonfinite_loss(self, loss) -> StepInfo:
        """The training loss is non-finite (read on the host): no optimizer step; the iteration counts (its
        generation of the evolution stands)."""
        info = self._nonfinite(self._loss_problem(float(loss.detach())))
        self.iteration += 1
        info.iteration = self.iteration
        return info

    @property
    def trains_kept_channels(self) -> bool:
        """Whether the training forward runs on the best state's kept channels only (the backend's answer: on CPU
        with backend "auto" or "compact" and the model in train mode)."""
        return self.backend.trains_kept_channels

    def _trainer_for(self, optimizer) -> ExportedNetworkTrainer:
        """The exported network's trainer for ``optimizer`` (a new one, after syncing, when the optimizer changed)."""
        if self._exported_trainer is not None and self._exported_trainer.user_optimizer is not optimizer:
            self.sync()
            self._exported_trainer = None
        if self._exported_trainer is None:
            wrap = None if self.ddp is None else wrapper_like(self.ddp)  # the exported network trains under DDP too
            self._exported_trainer = ExportedNetworkTrainer(self.model, self.units, self.best_view, optimizer,
                                                            self.example_inputs, wrap)
        return self._exported_trainer

    @property
    def compact_after_convergence(self) -> bool:
        """Deprecated name of ``train_exported_after_convergence``."""
        warnings.warn("EDropout.compact_after_convergence is now train_exported_after_convergence",
                      DeprecationWarning, stacklevel=2)
        return self.train_exported_after_convergence

    @property
    def training_network(self) -> nn.Module:
        """The network ``step`` trains: after convergence with ``train_exported_after_convergence``, the exported
        smaller network (``sync`` copies it back into the model); else the model itself."""
        return self._exported_trainer.small if self._exported_trainer is not None else self.model

    def sync(self) -> None:
        """After convergence training runs on the exported network; copy its weights, BatchNorm statistics and
        optimizer state back into the user's model and optimizer (``export`` and ``state_dict`` do this too).
        First reports the last step's deferred loss check, so that the optimizer state it leaves is final."""
        self._settle()
        if self._exported_trainer is not None:
            self._exported_trainer.write_back()

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
        small = export_pruned(self.model, self.units, self.best_state, self.example_inputs)
        return small.model if isinstance(small, LogitsOf) else small

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
        host = state["best_state"].cpu().bool()
        self._set_best(host.to(self.device), host)
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.converged = bool(state["converged"])
        self.convergence.unchanged = int(state["unchanged"])
        self.seed = int(state["seed"])
        self._exported_trainer = None
        self._pending = None
        self.pruned_values = state.get("pruned_values", {})
