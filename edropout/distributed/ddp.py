"""The pruner and ``DistributedDataParallel``: unwrapping the user's model, running our own training forwards
inside DDP's forward, and wrapping the exported network the same way after convergence."""
from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: nn.Module):
    """(the module to prune, its DDP wrapper or None)."""
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


class _Forward(nn.Module):
    """Stands in for DDP's wrapped module during one call: runs ``forward`` and shows DDP the wrapped module's
    buffers under their own names (DDP broadcasts rank 0's buffers before every forward)."""

    def __init__(self, module: nn.Module, forward):
        super().__init__()
        object.__setattr__(self, "wrapped", module)  # not a child: the parameters stay the model's alone
        object.__setattr__(self, "run", forward)

    def forward(self, *inputs, **kwargs):
        return self.run(*inputs, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self.wrapped.named_buffers(*args, **kwargs)


def forward_inside(ddp: DistributedDataParallel, forward, x):
    """``forward(x)`` run inside ``ddp``'s own forward, in place of the wrapped module's forward.

    DDP arms its gradient all-reduce (and broadcasts buffers) only in its forward; a forward that calls the
    model's modules functionally, like the kept-channel interpreter, would otherwise train each rank alone.
    ``forward`` may call the model itself (its hooks then run once, as in an ordinary DDP forward)."""
    module = ddp.module
    ddp.module = _Forward(module, forward)
    try:
        return ddp(x)
    finally:
        ddp.module = module


def wrapper_like(ddp: DistributedDataParallel):
    """A function that wraps another module (the exported network) in DDP with ``ddp``'s settings and group."""

    def wrap(module: nn.Module) -> DistributedDataParallel:
        settings = {} if ddp.broadcast_buffers else {"broadcast_buffers": False}  # the default otherwise
        return DistributedDataParallel(module, device_ids=ddp.device_ids, output_device=ddp.output_device,
                                       process_group=ddp.process_group,
                                       find_unused_parameters=ddp.find_unused_parameters,
                                       gradient_as_bucket_view=ddp.gradient_as_bucket_view, **settings)

    return wrap
