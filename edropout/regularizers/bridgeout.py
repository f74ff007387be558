"""Bridgeout and Batch Bridgeout (METHOD.md §8): multiplicative weight noise W̃ = W + |W|^{q/2} ⊙ η.

Bridgeout draws η per example; Batch Bridgeout draws one η per forward call (= per mini-batch) and applies
it only to the τ share of smallest-|w| weights of each output unit. Both are identity in eval mode, and
the gradient flows exactly through W̃ (plain autograd of the formula, finite at W = 0).

The layers are swapped in place (`module.__class__` becomes a subclass of nn.Linear / nn.Conv2d), so module
names, parameter objects, optimizer state, hooks and `isinstance` checks are all preserved;
`remove_bridgeout` swaps them back. Only the weight gets noise; the bias is untouched.

Cost of per-example Bridgeout: it materialises B noisy weight copies (B = batch size), i.e. memory
O(B·|W|) for W̃, η and the autograd buffers. Linear runs as one batched matmul. Conv2d runs as one grouped
convolution with B·groups groups over the batch folded into channels: same FLOPs as the plain conv, but
grouped-conv kernels are typically several times slower than a dense conv on GPU. Batch Bridgeout costs
one noisy weight copy and one per-row sort of |W| per forward call.

``backend="triton"`` computes W̃ (all B copies for Bridgeout) with the kernel of edropout_kernels.bridgeout,
which stores no noise: the backward regenerates η from a seed drawn per forward call (kept in
``bridgeout_last_seed`` so ``bridgeout_mask`` can read the draws out). The convolution / matmul itself is
PyTorch's either way; the per-example copies still take O(B·|W|) memory for W̃ and its gradient.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .sparseout import check_p_q, draw_keep_mask

__all__ = [
    "abs_pow", "bridgeout_weight", "smallest_magnitude_mask",
    "Bridgeout", "BatchBridgeout", "BridgeoutLinear", "BridgeoutConv2d",
    "BatchBridgeoutLinear", "BatchBridgeoutConv2d",
    "apply_bridgeout", "apply_batch_bridgeout", "remove_bridgeout",
]


def abs_pow(w: torch.Tensor, a: float) -> torch.Tensor:
    """|w|^a whose value and gradient are 0 where |w| is below the smallest normal float.

    The plain autograd of |w|^a is inf·0 = NaN at w = 0 for a < 1; the double `where` keeps the
    backward finite (a·|w|^{a−1}·sign(w) elsewhere, bounded by a/tiny).
    """
    aw = w.abs()
    ok = aw >= torch.finfo(w.dtype).tiny
    safe = torch.where(ok, aw, torch.ones_like(aw))
    return torch.where(ok, safe.pow(a), torch.zeros_like(aw))


def bridgeout_weight(w: torch.Tensor, p: float, q: float, keep: Optional[torch.Tensor] = None,
                     target: Optional[torch.Tensor] = None, copies: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """W̃ = W + target ⊙ |W|^{q/2} ⊙ η with η = m/(1−p) − 1, differentiable in W.

    `keep` holds the Bernoulli(1−p) draws m, shaped like w or (copies, *w.shape) for per-example copies;
    when None it is drawn from `generator` (or the global RNG) with that shape. `target` (bool, w's shape)
    restricts the noise to the targeted weights (Batch Bridgeout); None targets every weight.
    """
    check_p_q(p, q, "bridgeout_weight")
    if keep is None:
        shape = ((copies,) if copies is not None else ()) + tuple(w.shape)
        keep = draw_keep_mask(shape, p, w.device, generator)
    eta = keep.to(device=w.device, dtype=w.dtype).div(1.0 - p).sub_(1.0)
    scale = abs_pow(w, q / 2.0)
    if target is not None:
        scale = scale * target.to(device=w.device, dtype=w.dtype)
    return w + scale * eta


@torch.no_grad()
def smallest_magnitude_mask(w: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask of the round(τ·fan_in) smallest-|w| weights of each output unit (row of w.flatten(1)).

    Ties are broken by position (stable sort), so the mask is deterministic.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau!r} is the targeted share of each filter's weights; use 0 <= tau <= 1.")
    rows = w.detach().abs().reshape(w.shape[0], -1)
    k = int(math.floor(tau * rows.shape[1] + 0.5))
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        idx = rows.argsort(dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask.reshape(w.shape)


def _conv2d(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            groups: int) -> torch.Tensor:
    """nn.Conv2d's forward with an explicit weight and group count (honours padding_mode)."""
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, groups)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, groups)


class Bridgeout(nn.Module):
    """Mixin base of the per-example Bridgeout layers (`isinstance(m, Bridgeout)` finds every wrapped
    layer, Batch ones included); the concrete Linear / Conv2d classes below supply `_noisy_forward`."""

    def __init__(self, *args, p: float = 0.3, q: float = 1.5,
                 generator: Optional[torch.Generator] = None, backend: str = "torch", **kwargs):
        super().__init__(*args, **kwargs)
        self._configure(p=p, q=q, generator=generator, backend=backend)

    def _configure(self, p: float, q: float, generator: Optional[torch.Generator] = None,
                   backend: str = "torch") -> None:
        check_p_q(p, q, type(self).__name__)
        self.bridgeout_p, self.bridgeout_q, self.bridgeout_generator = float(p), float(q), generator
        self.bridgeout_backend = _backend.check_backend(backend, type(self).__name__)
        self.bridgeout_last_seed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.bridgeout_p == 0.0:
            return super().forward(x)
        return self._noisy_forward(x)

    def draw_keep(self, shape: Sequence[int]) -> torch.Tensor:
        """The torch backend's keep draws m, shaped `shape` (override to feed fixed draws)."""
        return draw_keep_mask(shape, self.bridgeout_p, self.weight.device, self.bridgeout_generator)

    def _noisy_weights(self, copies: Optional[int] = None, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W̃ shaped like the weight, or (copies, *weight.shape), from the configured backend."""
        p, q = self.bridgeout_p, self.bridgeout_q
        if self.bridgeout_backend == "triton":
            _backend.check_device(self.weight.device, type(self).__name__)
            self.bridgeout_last_seed = _backend.draw_seed(self.bridgeout_generator)
            return _backend.kernels().bridgeout_weight_triton(self.weight, p, q, self.bridgeout_last_seed,
                                                                 target=target, copies=copies)
        shape = ((copies,) if copies is not None else ()) + tuple(self.weight.shape)
        return bridgeout_weight(self.weight, p, q, keep=self.draw_keep(shape), target=target)

    def extra_repr(self) -> str:
        backend = ", backend='triton'" if self.bridgeout_backend == "triton" else ""
        return f"{super().extra_repr()}, p={self.bridgeout_p}, q={self.bridgeout_q}{backend}"


class BatchBridgeout(Bridgeout):
    """Mixin: one η per forward call (a mini-batch; gradient-accumulation micro-batches each get their
    own draw), applied to the τ share of smallest-|w| weights of each output unit."""

    def __init__(self, *args, p: float = 0.3, q: float = 1.5, tau: float = 0.75,
                 generator: Optional[torch.Generator] = None, backend: str = "torch", **kwargs):
        super().__init__(*args, p=p, q=q, generator=generator, backend=backend, **kwargs)
        self._configure(p=p, q=q, tau=tau, generator=generator, backend=backend)

    def _configure(self, p: float, q: float, tau: float = 0.75,
                   generator: Optional[torch.Generator] = None, backend: str = "torch") -> None:
        super()._configure(p, q, generator, backend)
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"{type(self).__name__}: tau={tau!r} is the targeted share of each filter's "
                             "weights; use 0 <= tau <= 1 (default 0.75).")
        self.bridgeout_tau = float(tau)

    def noisy_weight(self) -> torch.Tensor:
        """One draw of W̃ for the whole batch: noise only on the targeted (smallest-|w|) weights."""
        return self._noisy_weights(target=smallest_magnitude_mask(self.weight, self.bridgeout_tau))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.bridgeout_tau}"


class BridgeoutLinear(Bridgeout, nn.Linear):
    """nn.Linear with per-example Bridgeout: y_b = x_b W̃_bᵀ + bias via one batched matmul."""

    def _noisy_forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = 1 if x.dim() == 1 else x.shape[0]
        xb = x.reshape(batch, -1, self.in_features)                       # (B, T, in)
        w = self._noisy_weights(copies=batch)                            # (B, out, in)
        y = torch.bmm(xb, w.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class BridgeoutConv2d(Bridgeout, nn.Conv2d):
    """nn.Conv2d with per-example Bridgeout via one grouped conv over the batch folded into channels."""

    def _noisy_forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        b = xb.shape[0]
        w = self._noisy_weights(copies=b)                                # (B, out, in/g, kh, kw)
        bias = None if self.bias is None else self.bias.repeat(b)
        y = _conv2d(self, xb.reshape(1, b * xb.shape[1], *xb.shape[2:]),
                    w.reshape(b * self.out_channels, *w.shape[2:]), bias, b * self.groups)
        y = y.reshape(b, self.out_channels, *y.shape[2:])
        return y.squeeze(0) if unbatched else y


class BatchBridgeoutLinear(BatchBridgeout, nn.Linear):
    """nn.Linear with Batch Bridgeout: all examples of a forward call share one W̃."""

    def _noisy_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.noisy_weight(), self.bias)


class BatchBridgeoutConv2d(BatchBridgeout, nn.Conv2d):
    """nn.Conv2d with Batch Bridgeout: all examples of a forward call share one W̃."""

    def _noisy_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv2d(self, x, self.noisy_weight(), self.bias, self.groups)


_PLAIN = (nn.Linear, nn.Conv2d)
_WRAPPED = {
    "bridgeout": {nn.Linear: BridgeoutLinear, nn.Conv2d: BridgeoutConv2d},
    "batch": {nn.Linear: BatchBridgeoutLinear, nn.Conv2d: BatchBridgeoutConv2d},
}
_BASE_OF = {cls: base for table in _WRAPPED.values() for base, cls in table.items()}


def _select_layers(model: nn.Module, layers: Optional[Iterable[Union[str, nn.Module]]]):
    """(name, module) pairs to wrap: the given ones, or every Linear/Conv2d but the last one registered."""
    named = list(model.named_modules())
    if layers is None:
        plain = [(n, m) for n, m in named if type(m) in _PLAIN]
        return plain[:-1]
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    chosen = []
    for item in layers:
        name = item if isinstance(item, str) else by_id.get(id(item))
        if name is None or name not in by_name:
            raise KeyError(f"layer {item!r} is not a submodule of the model; pass names from model.named_modules().")
        module = by_name[name]
        if type(module) not in _PLAIN:
            kind = "already wrapped: call remove_bridgeout(model) first" if type(module) in _BASE_OF \
                else "only plain nn.Linear and nn.Conv2d layers are supported"
            raise TypeError(f"layer {name!r} is {type(module).__name__}: {kind}.")
        chosen.append((name, module))
    return chosen


def _apply(model, kind, layers, **config) -> List[str]:
    chosen = _select_layers(model, layers)
    if layers is None and any(type(m) in _BASE_OF for m in model.modules()):
        raise TypeError("model already has Bridgeout layers: call remove_bridgeout(model) first.")
    for _, module in chosen:
        module.__class__ = _WRAPPED[kind][type(module)]
        module._configure(**config)
    return [name for name, _ in chosen]


def apply_bridgeout(model: nn.Module, p: float = 0.3, q: float = 1.5,
                    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
                    generator: Optional[torch.Generator] = None, backend: str = "torch") -> List[str]:
    """Turn the chosen Linear/Conv2d layers (default: all but the last, the classifier) into per-example
    Bridgeout layers in place; returns their names. backend="triton" draws W̃ with the Triton kernel."""
    check_p_q(p, q, "apply_bridgeout")
    _backend.check_backend(backend, "apply_bridgeout")
    return _apply(model, "bridgeout", layers, p=p, q=q, generator=generator, backend=backend)


def apply_batch_bridgeout(model: nn.Module, p: float = 0.3, q: float = 1.5, tau: float = 0.75,
                          layers: Optional[Sequence[Union[str, nn.Module]]] = None,
                          generator: Optional[torch.Generator] = None, backend: str = "torch") -> List[str]:
    """Turn the chosen Linear/Conv2d layers (default: all but the last, the classifier) into Batch
    Bridgeout layers in place; returns their names. backend="triton" draws W̃ with the Triton kernel."""
    check_p_q(p, q, "apply_batch_bridgeout")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"apply_batch_bridgeout: tau={tau!r} must lie in [0, 1] (default 0.75).")
    _backend.check_backend(backend, "apply_batch_bridgeout")
    return _apply(model, "batch", layers, p=p, q=q, tau=tau, generator=generator, backend=backend)


def remove_bridgeout(model: nn.Module) -> List[str]:
    """Restore every (Batch) Bridgeout layer to its plain nn.Linear / nn.Conv2d class, keeping the
    trained parameters; returns the restored names."""
    restored = []
    for name, module in model.named_modules():
        base = _BASE_OF.get(type(module))
        if base is None:
            continue
        for attr in ("bridgeout_p", "bridgeout_q", "bridgeout_tau", "bridgeout_generator", "bridgeout_backend",
                     "bridgeout_last_seed"):
            module.__dict__.pop(attr, None)
        module.__class__ = base
        restored.append(name)
    return restored
