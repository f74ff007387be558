"""Counting what a GPU would run, on CPU: device operations, host operations and transfers, told apart.

On CPU every tensor lives on the host, so a plain ``TorchDispatchMode`` counter cannot tell the work a GPU would
launch from the work the engine does on host copies (the best state that the convergence read brings back, the
masks ``StateView`` derives from it, the CPU step counters of torch's optimizers). Here a registry of *host copies*
(``HostCopies``) follows them instead: it starts from what is on the host on every device (the tensors
``host.read`` returns, ``PrunableUnits``' index tensors, tensors made by a factory call that names no device, such
as ``torch.rand(..., generator=cpu_generator)`` or torch's ``torch.tensor(0.0)`` step counters) and grows through
every operation whose tensor inputs are all host copies. Such an operation is a *host op*; any operation with a
tensor input that is not a host copy is a *device op*, so the exclusion cannot hide device work that reads a host
copy. Transfers that are no-ops on CPU are counted where the engine makes them: ``host.read`` (one copy to the
host, which waits: one sync), ``host.upload`` (one copy to the device; its result is a device tensor), a ``.to``
of a host copy that names a device, and a new pointer table of the fused optimizer (``_device_table``).

Benchmark and test machinery only: it patches ``edropout.host`` and the Triton interpreter while counting and
changes no result.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
             "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "t", "transpose",
             "as_strided", "split", "split_with_sizes", "unbind", "chunk", "view_as", "_reshape_alias", "unfold",
             "lift_fresh", "_to_copy_noop", "set_", "resize_"}
SYNC = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
# torch functions that make a tensor from nothing: on the host unless they name a device
FACTORIES = {torch.ones, torch.zeros, torch.full, torch.empty, torch.rand, torch.randn, torch.randint,
             torch.randperm, torch.arange, torch.eye, torch.linspace, torch.tensor, torch.as_tensor}


class HostCopies:
    """The tensors (by identity) that live on the host on every device; see the module docstring."""

    def __init__(self):
        self._marked = WeakIdKeyDictionary()

    def mark(self, *tensors) -> None:
        for t in pytree.tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._marked[t] = True

    def __contains__(self, t) -> bool:
        return t in self._marked

    def mark_units(self, units) -> None:
        """``PrunableUnits``' bit-index tensors: built on the host (``torch.full`` without a device) on every
        device, and kept there."""
        self.mark(units.point_bits, units.axis_bits[1], [p.index for p in units.mask_points],
                  [list(pa.axes.values()) for pa in units.param_axes])


class OpCounter(TorchDispatchMode):
    """Counts ATen operations: device ops and host ops by name, views and allocations, syncs; transfers and Triton
    launches are added by ``counting``."""

    def __init__(self, host: HostCopies):
        super().__init__()
        self.host, self.paused, self.host_factory = host, 0, 0
        self.device_ops = collections.Counter()
        self.host_ops = collections.Counter()
        self.transfers = collections.Counter()
        self.syncs = collections.Counter()
        self.triton = collections.Counter()
        self.no_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = all(t in self.host for t in inputs) if inputs else self.host_factory > 0
        if on_host:
            self.host.mark(out)
        name = func.overloadpacket.__name__
        if name in NO_LAUNCH or func.is_view:
            self.no_launch += 1
        elif on_host:
            self.host_ops[name] += 1
        elif name in SYNC:
            self.syncs[name] += 1
        else:
            self.device_ops[name] += 1
        return out

    def totals(self) -> dict:
        aten, triton = sum(self.device_ops.values()), sum(self.triton.values())
        transfers = sum(self.transfers.values())
        return {"device_ops": aten + triton + transfers, "aten": aten, "triton": triton, "transfers": transfers,
                "host_ops": sum(self.host_ops.values()), "syncs": sum(self.syncs.values()),
                "views_and_allocations": self.no_launch}


def _names_host(device) -> bool:
    """Whether a factory's ``device`` argument is the host on every machine: none given, or the literal "cpu" (as
    torch's optimizers write it). A ``torch.device`` object is taken for the model's device (counted as device
    work), since on this CPU machine the two cannot be told apart."""
    return device is None or (isinstance(device, str) and device == "cpu")


class _HostFactories(TorchFunctionMode):
    """Marks what a factory call without a device makes as host copies, and counts a ``.to`` of a host copy that
    names a device as a transfer (on CPU it returns the tensor itself; here a copy, which is a device tensor)."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if func in FACTORIES and _names_host(kwargs.get("device")):
            counter.host_factory += 1
            try:
                out = func(*args, **kwargs)
            finally:
                counter.host_factory -= 1
            counter.host.mark(out)
            return out
        if func is torch.Tensor.to and args and args[0] in counter.host:
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if device is not None:
                counter.transfers["to device (.to)"] += 1
                counter.paused += 1
                try:
                    out = func(*args, **kwargs)
                    return out.clone() if out is args[0] else out
                finally:
                    counter.paused -= 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting(host: HostCopies | None = None):
    """An ``OpCounter`` over the block (with ``host``'s host copies, which it extends), counting Triton launches
    (interpreter; ATen counting paused inside them) and the engine's transfers."""
    from triton.runtime.interpreter import InterpretedFunction

    from edropout import host as engine_host
    from edropout_kernels import masked_optimizer

    counter = OpCounter(host if host is not None else HostCopies())
    originals = (InterpretedFunction.run, engine_host.read, engine_host.upload, masked_optimizer._device_table)

    def run(self, *args, **kwargs):
        counter.triton[getattr(self.fn, "__name__", "kernel")] += 1
        counter.paused += 1
        try:
            return originals[0](self, *args, **kwargs)
        finally:
            counter.paused -= 1

    def read(*tensors):
        out = originals[1](*tensors)
        counter.transfers["to host (host.read)"] += 1
        counter.syncs["host.read"] += 1
        counter.host.mark(out)
        return out

    def upload(tensors, device):
        tensors = list(tensors)
        if not tensors:
            return []
        flat, specs = engine_host.pack(tensors)  # as on CUDA: packed on the host, one copy, views on the device
        counter.transfers["to device (host.upload)"] += 1
        counter.paused += 1
        try:
            flat = flat.clone()
        finally:
            counter.paused -= 1
        return engine_host.unpack(flat, specs)

    def device_table(device, meta):
        if (str(device), tuple(meta)) not in masked_optimizer._TABLES:
            counter.transfers["to device (pointer table)"] += 1
        return originals[3](device, meta)

    InterpretedFunction.run, engine_host.read, engine_host.upload = run, read, upload
    masked_optimizer._device_table = device_table
    try:
        with counter, _HostFactories(counter):
            yield counter
    finally:
        InterpretedFunction.run, engine_host.read, engine_host.upload, masked_optimizer._device_table = originals
