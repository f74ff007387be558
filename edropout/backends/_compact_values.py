"""Channel-compact tensors for the compact backend, and the bookkeeping of which channels they carry.

A ``Packed`` value stands for a full-width tensor whose channels along ``dim`` are all exactly zero except the
``Channels`` it stores. Ops on packed values cost about the kept fraction of the dense op, and converting back
(``dense``) is always possible, which is what keeps every unknown op correct.

Stored conv channel lists are padded with pruned channels (stored as zeros) up to a multiple of
``CHANNEL_MULTIPLE``: oneDNN's fast convolution kernels want channel counts that are multiples of the SIMD width
(8 floats on AVX2), and few distinct widths let its primitive cache serve every member. Measured (3×3 conv,
batch 128, 14×14, 1 thread, min of 7): 16 channels 1.4 ms, 17-23 channels 2.7-7.9 ms, 24 channels 3.0 ms,
25-31 channels 9-13 ms, 32 channels 8.9 ms; a shape not seen before costs ~0.4 ms more (primitive creation).
End to end (2 threads, a fresh population per call as in training, S = 16, k = 0.5): ResNet-18-style 791 ms
padded vs 952 ms unpadded; LeNet-style 106 vs 87 ms (its 8-16-channel convs gain less than the padding costs).
Padding also removes the "nothing kept" special case: an empty group is a tensor of padding zeros. Producers
zero the weight rows of padded outputs; flatten drops the padding, so Linear layers never see it.

``Channels`` objects are deduplicated by content within one scoring call (``ChannelTable``), so identity
(``a is b``) means "same stored channels": residual adds and weight caches compare objects, not tensors.
"""
from __future__ import annotations

import torch

from ..units import PrunableUnits

CHANNEL_MULTIPLE = 8


class Channels:
    """Stored channel indices ``index`` (kept channels ascending, then padding) and ``pads``, the positions in
    ``index`` that are padding (their data is always zero), or None when there is none."""

    __slots__ = ("index", "pads", "__weakref__")

    def __init__(self, index: torch.Tensor, pads):
        self.index = index
        self.pads = pads

    def zero_pads(self, data: torch.Tensor, dim: int) -> torch.Tensor:
        """``data`` (stored channels along ``dim``) with the padding positions set to zero, in place."""
        if self.pads is None:
            return data
        if dim == 1 and _channels_last(data):
            _as_rows(data).index_fill_(1, self.pads, 0)
            return data
        return data.index_fill_(dim, self.pads, 0)

    def valid(self) -> torch.Tensor:
        """BoolTensor over stored positions: True for kept channels, False for padding."""
        out = torch.ones(self.index.shape[0], dtype=torch.bool, device=self.index.device)
        if self.pads is not None:
            out[self.pads] = False
        return out


def padded(kept: torch.Tensor, width: int, multiple: int) -> Channels:
    """Channels for the sorted kept indices ``kept`` of a ``width``-channel tensor, padded with pruned channels to a
    multiple of ``multiple`` (at least one channel is stored, so an empty group is one zero channel)."""
    n = kept.shape[0]
    stored = min(width, -(-max(n, 1) // multiple) * multiple)
    if stored == n:
        return Channels(kept, None)
    free = torch.ones(width, dtype=torch.bool, device=kept.device)
    free[kept] = False
    extra = free.nonzero().flatten()[:stored - n]
    return Channels(torch.cat([kept, extra]), torch.arange(n, stored, device=kept.device))


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
        data = self.data
        if self.dim == 1 and _channels_last(data):
            out = torch.empty(self.shape, dtype=data.dtype, device=data.device,
                              memory_format=torch.channels_last).zero_()
            _as_rows(out).index_copy_(1, self.channels.index, _as_rows(data))
            return out
        out = torch.zeros(self.shape, dtype=data.dtype, device=data.device)
        return out.index_copy_(self.dim, self.channels.index, data)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor as its (N·H·W, C) matrix view: channel gathers, fills and scatters on
    that 2-D view are 2-100× faster than on the 4-D tensor (which takes a slow, badly parallelised path)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


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


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``index_select`` that keeps a channels-last 4-D tensor channels-last (pooling and BatchNorm are several
    times faster on it, and the next conv would convert anyway)."""
    if dim == 1 and _channels_last(tensor):
        n, _, h, w = tensor.shape
        return _as_rows(tensor).index_select(1, index).view(n, h, w, -1).permute(0, 3, 1, 2)
    return tensor.index_select(dim, index)


def select(tensor: torch.Tensor, dim: int, channels) -> object:
    """Keep only ``channels`` of a dense tensor along ``dim`` (``None`` = all kept: the tensor itself)."""
    if channels is None:
        return tensor
    data = channels.zero_pads(take(tensor, dim, channels.index), dim)
    return Packed(data, dim, channels, tensor.shape[dim])


def align(value, dim: int, channels: Channels) -> torch.Tensor:
    """The data of ``value`` at exactly ``channels`` along ``dim`` (zeros where ``value`` has none, and in pads)."""
    if type(value) is Packed and value.channels is channels and value.dim == dim:
        return value.data
    return channels.zero_pads(take(dense(value), dim, channels.index), dim)


class ChannelTable:
    """Per scoring call: for every member and every channel map (an index of bits per channel, D = never pruned,
    and whether to pad: maps of conv channels are padded, maps of Linear features are not), the member's stored
    ``Channels`` (``None`` when all are kept), deduplicated by content across maps and members; plus caches of
    derived channel lists (flatten expansions, concatenations, unions, pad removal)."""

    def __init__(self, units: PrunableUnits, states: torch.Tensor, maps: list):
        ext = units.extended(states).cpu()
        self.device = states.device
        self._unique = {}
        self.derived = {}
        self.rows = [[None] * len(maps) for _ in range(states.shape[0])]
        for m, (index, pad) in enumerate(maps):
            masks = ext[:, index]
            full = masks.all(dim=1).tolist()
            multiple = CHANNEL_MULTIPLE if pad else 1
            for s in range(states.shape[0]):
                if not full[s]:
                    self.rows[s][m] = self._channels(masks[s], multiple)

    def _channels(self, mask: torch.Tensor, multiple: int) -> Channels:
        key = (mask.shape[0], multiple, mask.numpy().tobytes())
        found = self._unique.get(key)
        if found is None:
            found = self._unique[key] = padded(mask.nonzero().flatten().to(self.device), mask.shape[0], multiple)
        return found

    def _derive(self, key, make, *keep_alive):
        found = self.derived.get(key)
        if found is None:
            found = self.derived[key] = (make(),) + keep_alive  # holding the inputs keeps their ids unique
        return found[0]

    def flattened(self, channels: Channels, sizes: tuple, rel: int) -> Channels:
        """Channels after flattening dims of full ``sizes`` into one, the channel dim at position ``rel``, in the
        order ``flatten`` lays out the stored data."""
        def make():
            strides = [1] * len(sizes)
            for d in range(len(sizes) - 2, -1, -1):
                strides[d] = strides[d + 1] * sizes[d + 1]
            grid = [len(channels.index) if d == rel else sizes[d] for d in range(len(sizes))]
            position = torch.zeros(grid, dtype=torch.long, device=channels.index.device)
            for d, size in enumerate(sizes):
                along = channels.index if d == rel else torch.arange(size, device=position.device)
                shape = [1] * len(sizes)
                shape[d] = -1
                position += along.view(shape) * strides[d]
            pads = None
            if channels.pads is not None:
                shape = [1] * len(sizes)
                shape[rel] = -1
                valid = channels.valid().view(shape).expand(grid).flatten()
                pads = (~valid).nonzero().flatten()
            return Channels(position.flatten(), pads)

        return self._derive(("flat", id(channels), sizes, rel), make, channels)

    def concatenated(self, parts: list) -> Channels:
        """Channels of a concatenation; ``parts`` are (Channels or None = all kept, width) in order."""
        def make():
            index, pads, offset, stored = [], [], 0, 0
            for c, width in parts:
                if c is None:
                    index.append(torch.arange(offset, offset + width, device=self.device))
                    stored += width
                else:
                    index.append(c.index + offset)
                    if c.pads is not None:
                        pads.append(c.pads + stored)
                    stored += c.index.shape[0]
                offset += width
            return Channels(torch.cat(index), torch.cat(pads) if pads else None)

        return self._derive(("cat",) + tuple((id(c), w) for c, w in parts), make, [c for c, _ in parts])

    def union(self, a: Channels, b: Channels, width: int) -> Channels:
        """Channels kept by either operand (for adds of differently pruned tensors), padded again."""
        def make():
            kept = torch.cat([a.index[a.valid()], b.index[b.valid()]])
            multiple = CHANNEL_MULTIPLE if a.pads is not None or b.pads is not None else 1
            return padded(torch.unique(kept), width, multiple)

        return self._derive(("union", id(a), id(b), width), make, a, b)

    def unpadded(self, channels: Channels):
        """(positions of the kept channels among the stored ones, Channels without padding)."""
        def make():
            positions = channels.valid().nonzero().flatten()
            return positions, Channels(channels.index[positions], None)

        return self._derive(("unpad", id(channels)), make, channels)
