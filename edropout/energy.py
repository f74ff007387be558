"""Energies of pruning states: lower is better. Margin (the official default), cross-entropy, or any callable.

An energy function maps (logits [N, K], targets [N]) to a per-sample energy [N]; a state's energy is the mean
over its mini-batch, and a non-finite mean counts as +inf so that such a state is never selected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ENERGIES = ("margin", "cross_entropy")


def margin_energy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max_{j != y} z_j - z_y`` (METHOD.md §2): negative when the sample is classified correctly."""
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return others.amax(dim=-1) - target_logit


def cross_entropy_energy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def resolve_energy(energy):
    """The per-sample energy function for a name or a callable; a clear error for anything else."""
    if callable(energy):
        return energy
    if energy == "margin":
        return margin_energy
    if energy == "cross_entropy":
        return cross_entropy_energy
    raise ValueError(f"unknown energy {energy!r}: use one of {ENERGIES} or a callable "
                     f"(logits [N, K], targets [N]) -> Tensor[N]")


def member_energies(energy_fn, logits: torch.Tensor, targets: torch.Tensor, members: int) -> torch.Tensor:
    """Mean energy of each of ``members`` groups of rows (member-major), non-finite values mapped to +inf."""
    per_sample = energy_fn(logits, targets)
    if per_sample.shape != targets.shape:
        raise ValueError(f"the energy function returned shape {tuple(per_sample.shape)}; it must return one "
                         f"energy per sample, shape {tuple(targets.shape)}")
    means = per_sample.float().reshape(members, -1).mean(dim=1)
    return torch.where(torch.isfinite(means), means, torch.full_like(means, float("inf")))

