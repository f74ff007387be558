"""The host synchronisations of ``EDropout.step``. On the accelerated path (backend "triton", whose fused masked
update judges the training loss on the device) an evolving step reads the device exactly once: the convergence
read (``edropout.host.read``: the best state, its energy, the batch's value checks and the previous
step's loss in one transfer), and a converged step (masked dense training, or training of the exported network)
once as well: the batch check with the previous step's loss. What remains elsewhere, and is counted here too: the
reference and batched backends (and the triton backend with an optimizer the fused update declines) read the
loss's finiteness on the host before the update (``Backend.optimizer_step_if_finite``: one
``_local_scalar_dense``).

Counted on CPU: ATen operations that read a device value on the host (``.item()``, ``float()``, ``bool()``,
``torch.equal`` reach the dispatcher as ``_local_scalar_dense``, ``is_nonzero``, ``equal``) and Python-level
``.cpu()`` / ``.numpy()`` / ``.item()`` calls outside ``host.read``. On CUDA each of them would be a host
synchronisation. Not seen here: ``.tolist()``, which does not reach the dispatcher (the engine calls it on the
host copies ``host.read`` returns and on what ``StateView`` derives from them). Listed in the README instead:
host-to-device copies from pageable memory, which the engine routes through ``host.upload`` (pinned,
non-blocking), the one-off reads of the first scoring call (plan probe and self-check) and of the first converged
step (building the exported network).
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edropout import EDropout, host
from nets import small_net

_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SYNC_OPS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(monkeypatch):
    """Yields (sync-op list, python-call list, reads-before) while counting."""
    calls, inside = [], [0]
    read = host.read

    def counted_read(*tensors):
        inside[0] += 1
        try:
            return read(*tensors)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(host, "read", counted_read)
    for name in ("cpu", "numpy", "item"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _name=name, _original=original, **k):
            if not inside[0]:
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    before = host.reads
    with _Syncs() as mode:
        yield mode.ops, calls, before


# the host-side loss check that remains off the fused update: Backend.optimizer_step_if_finite's float(value)
_LOSS_READ = {"reference": ["_local_scalar_dense"], "batched": ["_local_scalar_dense"], "triton": []}


@pytest.mark.parametrize("phase", ["evolving", "converged", "converged_exported"])
@pytest.mark.parametrize("backend", ["reference", "batched", "triton"])
def test_a_step_reads_the_device_once(backend, phase, monkeypatch):
    torch.manual_seed(0)
    model = small_net("resnet18")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    pruner = EDropout(model, x[:2], population_size=4, backend=backend, min_iterations=10 ** 9,
                      train_exported_after_convergence=phase == "converged_exported")
    for _ in range(2):  # first calls build plans and probe the model (one-off host reads)
        pruner.step(x, y, opt)
    if phase != "evolving":
        # converged: no evolution; training with the best state masked, or on the exported network, whose
        # trainer the first converged step builds (a one-off)
        pruner.converged = True
        pruner.step(x, y, opt)
    for _ in range(2):
        with counting(monkeypatch) as (ops, calls, before):
            pruner.step(x, y, opt)
        assert ops == _LOSS_READ[backend] and calls == [], f"host synchronisations in step(): {ops + calls}"
        assert host.reads - before == 1, "exactly one device read per step"
        monkeypatch.undo()
    if phase == "converged_exported":
        assert pruner._exported_trainer is not None, "the converged steps trained the exported network"


def test_step_info_reads_lazily():
    torch.manual_seed(0)
    model = small_net("resnet18")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = EDropout(model, x[:2], population_size=4, backend="batched", min_iterations=10 ** 9)
    info = pruner.step(x, y, opt)
    assert isinstance(info.loss, float) and info.loss > 0 and info.best_energy <= info.mean_energy
    assert 0.0 <= info.pruning_rate <= 1.0 and info.iteration == 1
    assert info._values is not None  # read once, for all three values


class _RerunGraph:
    """Stand-in for a CUDA graph on CPU: capture runs ``fn`` on the static inputs; replay reruns it into the same
    output buffer, as a graph replay writes its static output."""

    def capture(self, fn, inputs):
        out = fn(*inputs)

        class Graph:
            def replay(self):
                out.copy_(fn(*inputs))

        return Graph(), out


def test_cuda_graph_scoring_replays_captures_per_shape():
    from edropout.backends import TritonBackend

    torch.manual_seed(0)
    model = small_net("resnet18")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    eager = EDropout(model, x[:2], population_size=4, backend="triton")
    backend = TritonBackend(cuda_graphs=True, graph_factory=_RerunGraph())
    graphed = EDropout(model, x[:2], population_size=4, backend=backend)
    states = [torch.rand(4, eager.num_units, generator=g) < 0.6 for _ in range(3)]
    for s in states:
        expect = eager.score_states(s, x, y)
        got = graphed.score_states(s, x, y)
        torch.testing.assert_close(got, expect)
        got.fill_(float("nan"))  # the caller's copy: the next replay must not see it
    assert backend._graphed.captures == 1, "one capture per input shape"
    graphed.score_states(torch.cat(states[:2]), x, y)  # S = 8: a new shape, a new capture
    assert backend._graphed.captures == 2
    torch.testing.assert_close(graphed.score_states(states[0], x, y), eager.score_states(states[0], x, y))
