"""Per-member kept-first channel orders, the shared input of the population kernels.

A population's keep-masks ``keep[S, N]`` become one permutation per member that lists the kept
channels first (ascending) and the pruned ones after them (ascending), plus the kept count.
Kernels read the first ``count[s]`` entries to do only the kept work and use the rest to write
exact zeros, so every output element is written once and no separate zero-fill pass is needed.
"""

from __future__ import annotations

import torch

__all__ = ["kept_first_order"]


def kept_first_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(index int32 [S, N], count int32 [S])`` for a boolean mask ``keep [S, N]``.

    ``index[s, :count[s]]`` are the kept channel ids of member ``s`` in ascending order and
    ``index[s, count[s]:]`` its pruned ids, also ascending. Built with a stable sort (no host sync),
    so it can run inside CUDA graphs and costs one tiny launch per layer and population.
    """
    if keep.dim() != 2:
        raise ValueError(f"keep must be 2-D [members, channels], got shape {tuple(keep.shape)}")
    keep = keep.to(torch.bool)
    # Sorting the "pruned" flag (0 = kept, 1 = pruned) stably puts kept ids first, each run ascending.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    count = keep.sum(dim=1, dtype=torch.int32)
    return order.to(torch.int32).contiguous(), count.contiguous()
