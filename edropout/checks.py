"""Checks of what a user hands ``EDropout``: the model, each batch, the optimizer and the model's output.

Every check names the problem and the fix. The value checks of a batch (non-finite inputs, labels out of range)
are computed on the device as a few scalars (``batch_flags``) and judged on the host (``batch_problem``) once
read: ``EDropout.step`` reads them with its one convergence read, so they cost no wait of their own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class NonFiniteError(ValueError):
    """A batch, a loss or every energy held NaN or infinity; nothing was changed by the step that found it."""


ON_NONFINITE = ("raise", "skip")


def check_on_nonfinite(value: str) -> str:
    """``on_nonfinite`` is "raise" (stop with ``NonFiniteError``) or "skip" (skip the batch with a warning)."""
    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters; a model without parameters has nothing to prune."""
    for param in model.parameters():
        return param.device
    raise ValueError(f"the model ({type(model).__name__}) has no parameters, so there is nothing to prune or "
                     f"train; pass a model with Conv or Linear layers")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_batch(x, y, device: torch.device) -> torch.Tensor:
    """Types, shapes, dtypes and devices of a batch (no device work); returns the labels as int64 (any integer
    dtype is accepted)."""
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise TypeError("x and y must be Tensors (inputs [B, ...] and integer labels [B])")
    if y.dim() != 1 or x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size and y must be 1-D labels; got x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")
    if y.shape[0] == 0:
        raise ValueError("the batch is empty (x and y hold no samples); skip empty batches, e.g. with a "
                         "DataLoader(..., drop_last=True)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    for name, tensor in (("x", x), ("y", y)):
        if not _same_device(tensor.device, device):
            raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move the batch with "
                             f"{name}.to({str(device)!r})")
    return y if y.dtype == torch.int64 else y.long()


def batch_flags(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The batch's value checks on the device, not read: the lowest and highest label and, for floating inputs,
    the sum of ``x`` (non-finite when ``x`` holds a NaN or infinity; ``batch_problem`` then counts them)."""
    flags = list(torch.aminmax(y))
    if x.is_floating_point() or x.is_complex():
        real = torch.view_as_real(x) if x.is_complex() else x
        flags.append(real.sum(dtype=torch.float64 if real.dtype == torch.float64 else torch.float32))
    return flags


#: The verdict of a rank whose batch failed ``check_batch`` (or the parallelism's batch check): it takes part in
#: the others' collective with this instead of energies, and raises its own error after it.
MALFORMED_VERDICT = (0.0, 0.0, 1.0)


def batch_verdict(flags, x: torch.Tensor, classes: int) -> torch.Tensor:
    """This rank's batch judged on the device, not read: [labels outside [0, classes), any input non-finite,
    malformed (0 here: see ``MALFORMED_VERDICT``)] as 0/1 float64, exactly as ``batch_problem`` judges: inputs
    narrower than float64 by their float64 sum, which cannot overflow (a tenth of the time of a per-element
    check), float64 ones element by element. Ranks sum their verdicts in a collective, so that a bad batch on one
    rank stops every rank, not that rank alone while the others wait for it in their next collective."""
    labels = (flags[0] < 0) | (flags[1] >= classes)
    if x.is_floating_point() or x.is_complex():
        real = torch.view_as_real(x) if x.is_complex() else x
        values = (~torch.isfinite(real).all() if real.dtype == torch.float64 else
                  ~torch.isfinite(real.sum(dtype=torch.float64)))
    else:
        values = torch.zeros_like(labels)
    return torch.stack([labels, values, torch.zeros_like(labels)]).double()


def other_ranks_problem(everywhere, classes: int) -> str | None:
    """What is wrong with another rank's batch, from the host copy of the ranks' summed ``batch_verdict``s, for a
    rank whose own batch is fine: a malformed batch or labels out of range raise ``ValueError``; non-finite inputs
    are returned."""
    labels, values, malformed = everywhere.tolist()
    if malformed:
        raise ValueError("another rank's batch is malformed (its own error names the problem: a wrong type, shape, "
                         "dtype or device, or an empty batch), so every rank stops here")
    if labels:
        raise ValueError(f"another rank's batch has labels outside [0, {classes}), so every rank stops here. Remap "
                         f"the labels or fix the classifier size")
    if values:
        return "another rank's batch holds non-finite values (NaN or infinity), so every rank stops here"
    return None


def batch_problem(flags, x: torch.Tensor, classes: int) -> str | None:
    """What is wrong with the batch's values, from the host copies of its ``batch_flags``: labels outside
    [0, classes) raise ``ValueError``; non-finite inputs are returned as a problem (counted exactly, which reads
    the device once more, only then: a sum can also overflow); None when the batch is fine."""
    low, high = flags[0].tolist(), flags[1].tolist()
    if low < 0 or high >= classes:
        raise ValueError(f"labels must lie in [0, {classes}) for a model with {classes} outputs; got labels in "
                         f"[{low}, {high}]. Remap the labels or fix the classifier size")
    if len(flags) > 2 and not math.isfinite(flags[2].tolist()):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            return f"x holds {bad} non-finite values (NaN or infinity) of {x.numel()}"
    return None


def check_optimizer(optimizer, model: nn.Module) -> None:
    """The optimizer must hold the model's parameters, or its steps would never change the model."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters() if p.requires_grad):
        raise ValueError("the optimizer holds none of the model's parameters (was it built for another model or "
                         "a copy?); build it as torch.optim.<Name>(model.parameters(), ...) with the model given "
                         "to EDropout")


class LogitsOf(nn.Module):
    """The user's model with ``output_to_logits`` applied to its output, so that the engine sees a logits
    tensor [N, K] whatever the model returns (a tuple, a dict, an object with ``.logits``)."""

    def __init__(self, model: nn.Module, output_to_logits):
        super().__init__()
        self.model = model
        self.output_to_logits = output_to_logits

    @property
    def training(self) -> bool:
        """The wrapped model's mode (the user switches their own model with ``.train()`` / ``.eval()``)."""
        return self.__dict__.get("_modules", {}).get("model", None) is None or self.model.training

    @training.setter
    def training(self, mode: bool) -> None:
        """``train(mode)`` reaches the wrapped model as a child module; the wrapper holds no mode of its own."""

    def forward(self, x):
        return self.output_to_logits(self.model(x))


def check_logits(output, wrapped: bool) -> torch.Tensor:
    """The model's (or ``output_to_logits``'s) output must be a logits tensor [N, K]; otherwise say what to pass."""
    if torch.is_tensor(output):
        if output.dim() != 2:
            raise ValueError(f"the model's logits must have shape [N, classes], got {tuple(output.shape)}")
        return output
    if wrapped:
        raise TypeError(f"output_to_logits returned a {type(output).__name__}; it must return the logits Tensor")
    if isinstance(output, dict):
        key = "logits" if "logits" in output else next(iter(output), "logits")
        hint = f"output_to_logits=lambda out: out[{key!r}]"
    elif isinstance(output, (tuple, list)):
        hint = "output_to_logits=lambda out: out[0]"
    elif hasattr(output, "logits"):
        hint = "output_to_logits=lambda out: out.logits"
    else:
        hint = "output_to_logits=<a function from the output to the logits Tensor>"
    raise TypeError(f"the model returns a {type(output).__name__}, not a logits Tensor; pass EDropout(..., {hint})")
