"""Channel-compact tensors for the compact backend, and the bookkeeping of which channels they carry.

A ``Packed`` value stands for a full-width tensor whose channels along ``dim`` are all exactly zero except the
``Channels`` it stores. Ops on packed values cost about the kept fraction of the dense op, and converting back
(``dense``) is always possible, which is what keeps every unknown op correct.

``Channels`` objects are deduplicated by content within one scoring call (``ChannelTable``), so identity
(``a is b``) means "same kept channels": residual adds and weight caches compare objects, not tensors.
"""
from __future__ import annotations

import torch

from ..units import PrunableUnits


class Channels:
    """Sorted kept channel indices (LongTensor). ``empty`` marks "nothing kept": the index is then ``[0]`` and the
    data stored there is zero, so every op sees a well-formed one-channel tensor that is exactly the zero tensor."""

    __slots__ = ("index", "empty", "__weakref__")

    def __init__(self, index: torch.Tensor, empty: bool = False):
        self.index = index
        self.empty = empty


class Packed:
    """A full-width tensor of ``width`` channels along ``dim``, of which only ``channels`` are stored in ``data``."""

    __slots__ = ("data", "dim", "channels", "width")

    def __init__(self, data: torch.Tensor, dim: int, channels: Channels, width: int):
        self.data = data
        self.dim = dim
        self.channels = channels
        self.width = width

    @property
    def shape(self) -> torch.Size:
        """The full (dense) shape this value stands for."""
        shape = list(self.data.shape)
        shape[self.dim] = self.width
        return torch.Size(shape)

    def dense(self) -> torch.Tensor:
        """The full-width tensor, zeros in the channels that are not stored."""
        out = self.data.new_zeros(self.shape)
        return out.index_copy_(self.dim, self.channels.index, self.data)


def dense(value):
    """``value`` as an ordinary tensor (packed values are scattered back to full width)."""
    return value.dense() if type(value) is Packed else value


def dense_tree(value):
    """``dense`` applied through (nested) tuples, lists and dicts, e.g. the arguments of an unknown op."""
    kind = type(value)
    if kind is Packed:
        return value.dense()
    if kind is tuple or kind is list:
        return kind(dense_tree(v) for v in value)
    if kind is dict:
        return {k: dense_tree(v) for k, v in value.items()}
    return value


def select(tensor: torch.Tensor, dim: int, channels) -> object:
    """Keep only ``channels`` of a dense tensor along ``dim`` (``None`` = all kept: the tensor itself)."""
    if channels is None:
        return tensor
    if channels.empty:
        return Packed(torch.zeros_like(tensor.narrow(dim, 0, 1)), dim, channels, tensor.shape[dim])
    return Packed(tensor.index_select(dim, channels.index), dim, channels, tensor.shape[dim])


def align(value, dim: int, channels: Channels) -> torch.Tensor:
    """The data of ``value`` at exactly ``channels`` along ``dim`` (zeros where ``value`` has none)."""
    if type(value) is Packed and value.channels is channels and value.dim == dim:
        return value.data
    full = dense(value)
    if channels.empty:
        return torch.zeros_like(full.narrow(dim, 0, 1))
    return full.index_select(dim, channels.index)


class ChannelTable:
    """Per scoring call: for every member and every channel map (an index of bits per channel, D = never pruned),
    the member's kept ``Channels`` (``None`` when all are kept), deduplicated by content across maps and members;
    plus caches of derived channel lists (flatten expansions, concatenations, unions)."""

    def __init__(self, units: PrunableUnits, states: torch.Tensor, maps: list):
        ext = units.extended(states).cpu()
        self._unique = {}
        self.derived = {}
        self.rows = [[None] * len(maps) for _ in range(states.shape[0])]
        device = states.device
        for m, index in enumerate(maps):
            masks = ext[:, index]
            full = masks.all(dim=1).tolist()
            for s in range(states.shape[0]):
                if not full[s]:
                    self.rows[s][m] = self._channels(masks[s], device)

    def _channels(self, mask: torch.Tensor, device) -> Channels:
        key = (mask.shape[0], mask.numpy().tobytes())
        found = self._unique.get(key)
        if found is None:
            index = mask.nonzero().flatten()
            empty = index.numel() == 0
            found = Channels((torch.zeros(1, dtype=torch.long) if empty else index).to(device), empty)
            self._unique[key] = found
        return found

    def flattened(self, channels: Channels, sizes: tuple, rel: int) -> Channels:
        """Channels after flattening dims of ``sizes`` (full sizes) into one, the channel dim at position ``rel``."""
        key = ("flat", id(channels), sizes, rel)
        found = self.derived.get(key)
        if found is None:
            mask = torch.zeros(sizes, dtype=torch.bool, device=channels.index.device)
            mask.index_fill_(rel, channels.index, True)
            found = Channels(mask.flatten().nonzero().flatten(), channels.empty)
            self.derived[key] = (found, channels)  # keep ``channels`` alive so its id is not reused
            return found
        return found[0]

    def concatenated(self, parts: list) -> Channels:
        """Channels of a concatenation; ``parts`` are (Channels or None = all kept, width) in order."""
        key = ("cat",) + tuple((id(c), w) for c, w in parts)
        found = self.derived.get(key)
        if found is None:
            pieces, offset = [], 0
            device = next(c.index.device for c, _ in parts if c is not None)
            for c, width in parts:
                # an empty part stores one zero channel, which stays in the concatenation
                pieces.append(torch.arange(offset, offset + width, device=device) if c is None else c.index + offset)
                offset += width
            empty = all(c is not None and c.empty for c, _ in parts)
            found = (Channels(torch.cat(pieces), empty), [c for c, _ in parts])
            self.derived[key] = found
        return found[0]

    def union(self, a: Channels, b: Channels) -> Channels:
        """Channels kept by either operand (for adds of differently pruned tensors)."""
        key = ("union", id(a), id(b))
        found = self.derived.get(key)
        if found is None:
            found = (Channels(torch.unique(torch.cat([a.index, b.index])), a.empty and b.empty), a, b)
            self.derived[key] = found
        return found[0]
