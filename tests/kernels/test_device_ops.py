"""The device-op floor of the triton backend (issue 15): an iteration whose best state changed issues at most twice
the device operations of a plain training iteration, counted by ``benchmarks/op_counter.py``; and that counter
counts as device work every operation that reads a device tensor, whatever host copies it also reads, so that the
host ops it leaves out cannot hide device work."""
import os
import sys

import torch
import torch.nn.functional as F

from edropout import EDropout, host
from edropout.app.models import build_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from op_counter import HostCopies, counting  # noqa: E402


def test_an_op_that_reads_a_device_tensor_is_a_device_op_even_with_host_copy_inputs():
    device_value = torch.randn(5)  # made before counting, not by a host factory: a device tensor
    with counting() as c:
        copy, = host.read(device_value)  # the device packs (cat), one copy to the host, one sync
        doubled = copy * 2  # only host copies in: a host op
        mixed = device_value + doubled  # a device tensor and a host copy in: a device op
        again = mixed * 3  # its output is a device tensor
        keys = torch.rand(3)  # a factory that names no device: on the host
        sent, = host.upload([keys], "cpu")  # one packed copy to the device (packing: a host op)
        plus = sent + 1  # what was sent is a device tensor
        moved = doubled.to(device_value.device)  # a host copy sent with .to: one transfer
        moved.neg()  # ... and a device op after it
        copy.sum().item()  # reading a host copy: no sync
    assert dict(c.host_ops) == {"mul": 1, "rand": 1, "cat": 1, "sum": 1, "_local_scalar_dense": 1}
    assert dict(c.device_ops) == {"cat": 1, "add": 2, "mul": 1, "neg": 1}
    assert dict(c.transfers) == {"to host (host.read)": 1, "to device (host.upload)": 1, "to device (.to)": 1}
    assert dict(c.syncs) == {"host.read": 1}
    assert torch.equal(again, (device_value + copy * 2) * 3) and torch.equal(plus, keys + 1)
    assert torch.equal(moved, copy * 2) and moved is not doubled


def _plain_iteration_ops(model, optimizer, x, y) -> int:
    host_copies = HostCopies()
    for _ in range(3):  # the first steps make the optimizer state (its CPU step counters are host copies)
        with counting(host_copies) as c:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return c.totals()["device_ops"]


def test_an_iteration_whose_best_state_changed_issues_at_most_twice_a_plain_iterations_device_ops():
    torch.manual_seed(0)
    make = lambda: build_model("resnet18", 1, 8, 10, 2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)
    adadelta = lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0, weight_decay=1e-5, foreach=True)  # noqa: E731
    plain_model = make()
    plain = _plain_iteration_ops(plain_model, adadelta(plain_model), x, y)
    model = make()
    optimizer = adadelta(model)
    pruner = EDropout(model, x, population_size=8, backend="triton", min_iterations=10 ** 9)
    host_copies = HostCopies()
    host_copies.mark_units(pruner.units)
    steady = changed = None
    for _ in range(12):
        before = pruner.best_state
        with counting(host_copies) as c:
            pruner.step(x, y, optimizer)
        if pruner.iteration > 2:  # after the first calls (plan probe and self-check)
            if pruner.best_state is before:
                steady = c.totals()
            else:
                changed = c.totals()
                assert c.transfers["to device (host.upload)"] <= 2, "a new best state's masks: one upload"
        if steady and changed:
            break
    assert steady and changed, "no steady or no changed iteration seen"
    assert steady["device_ops"] <= 2 * plain, (steady, plain)
    assert changed["device_ops"] <= 2 * plain, (changed, plain)
