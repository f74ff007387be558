"""Per-member kept-first channel orders, the shared input of the population GEMM kernels.

A population's keep-masks ``keep[S, N]`` become one permutation per member that lists the kept channels first
(ascending) and the pruned ones after them (ascending), plus the kept count. Kernels read the first ``count[s]``
entries to do only the kept work and use the rest to write exact zeros, so every output element is written once.
``kept_first_orders`` builds the lists of many layers in one go (one sort and one count for a whole
population), which is how the triton backend builds them once per population instead of per layer and call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["KeptFirstOrder", "kept_first_order", "kept_first_orders"]


@dataclass(frozen=True)
class KeptFirstOrder:
    """``index`` int32 ``[S, N]`` (kept ids ascending, then pruned ids ascending; rows may be strided views of a
    wider table) and ``count`` int32 ``[S]`` (may be strided)."""

    index: torch.Tensor
    count: torch.Tensor

    def __iter__(self):
        """``index, count = kept_first_order(keep)``."""
        return iter((self.index, self.count))

    @property
    def members(self) -> int:
        return self.index.shape[0]

    @property
    def channels(self) -> int:
        return self.index.shape[1]

    def check(self, name: str, members: int, channels: int) -> "KeptFirstOrder":
        """Raise ValueError unless these lists are for ``members`` members of ``channels`` channels."""
        if tuple(self.index.shape) != (members, channels) or tuple(self.count.shape) != (members,):
            raise ValueError(f"{name} must list {channels} channels for {members} members, got index "
                             f"{tuple(self.index.shape)} and count {tuple(self.count.shape)}")
        if self.index.dtype != torch.int32 or self.count.dtype != torch.int32 or self.index.stride(1) != 1:
            raise ValueError(f"{name} must hold int32 tensors with unit stride along channels")
        return self


def kept_first_order(keep: torch.Tensor) -> KeptFirstOrder:
    """The kept channel lists of one boolean mask ``keep [S, N]``. Built with a stable sort (no host sync)."""
    if keep.dim() != 2:
        raise ValueError(f"keep must be 2-D [members, channels], got shape {tuple(keep.shape)}")
    return kept_first_orders([keep])[0]


_CONSTS: OrderedDict = OrderedDict()


def _column_constants(sizes: tuple[int, ...], device) -> torch.Tensor:
    """Per column: int32 ``[3, sum(sizes)]`` (sort-key base 2 * layer, the layer's first column, the layer) and
    the first columns again as int64 (the sort's index dtype). Built on the host and copied to ``device`` once per
    layer layout (cached)."""
    key = (sizes, str(device))
    hit = _CONSTS.get(key)
    if hit is None:
        layer = [i for i, n in enumerate(sizes) for _ in range(n)]
        first = [sum(sizes[:i]) for i in layer]
        table = torch.tensor([[2 * i for i in layer], first, layer], dtype=torch.int32)
        hit = _CONSTS[key] = (table.to(device), table[1].to(torch.int64).to(device))
        while len(_CONSTS) > 64:
            _CONSTS.popitem(last=False)
    return hit


def kept_first_orders(keeps: list[torch.Tensor]) -> list[KeptFirstOrder]:
    """The kept channel lists of several masks ``[S, N_l]`` (one population) with a fixed number of device
    operations, however many layers: the masks are laid side by side and sorted once by (layer, pruned flag),
    stably, so each layer's segment comes out kept ids first and pruned ids after, each ascending. The per-layer
    results are views of one table."""
    if not keeps:
        return []
    members = keeps[0].shape[0]
    if any(k.dim() != 2 or k.shape[0] != members for k in keeps):
        raise ValueError("every keep-mask must be 2-D [members, channels] with the same members")
    sizes = tuple(k.shape[1] for k in keeps)
    consts, first_columns = _column_constants(sizes, keeps[0].device)
    device = keeps[0].device
    keep = torch.cat([k.to(torch.bool) for k in keeps], dim=1)
    order = torch.sort(consts[0] + ~keep, dim=1, stable=True).indices  # int32 + bool: int32 keys
    index = (order - first_columns).to(torch.int32)
    count = torch.zeros(members, len(sizes), dtype=torch.int32, device=device).index_add_(
        1, consts[2], keep.to(torch.int32))
    out, first = [], 0
    for i, n in enumerate(sizes):
        out.append(KeptFirstOrder(index[:, first:first + n], count[:, i]))
        first += n
    return out
