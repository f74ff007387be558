"""CPU benchmarks in one pytest-benchmark run: energies with the reference, batched and compact backends, and whole
training iterations (plain, EDropout at S = 8 and 32, converged) from ``cpu_iteration``.

Run with ``python -m pytest benchmarks/test_bench_cpu.py --benchmark-only`` (needs pytest-benchmark), or through
``python benchmarks/cpu_table.py`` and ``python benchmarks/cpu_iteration.py``, which reuse these cases and write
the results tables. Fixed setup:
2 threads, the engine's LeNet-style and ResNet-18-style nets at 28×28 grey input, batch 128, S ∈ {8, 16, 32} and
keep fraction k ∈ {1.0, 0.5, 0.25}; every member keeps exactly round(k·D) bits, chosen at random, so the
population's k is exact and each group keeps about k of its channels.
"""
from __future__ import annotations

import functools
import time

import pytest
import torch

from edropout import EDropout
from edropout.backends import make_backend
from edropout.app.models import build_model

THREADS = 2
NETS = ("lenet", "resnet18")
MEMBERS = (8, 16, 32)
KEEPS = (1.0, 0.5, 0.25)
BACKENDS = ("reference", "batched", "compact")
BATCH, SIZE, CLASSES = 128, 28, 10


def exact_keep_states(members: int, units: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """States [members, units] that each keep exactly round(keep·units) bits at random positions."""
    kept = round(keep * units)
    states = torch.zeros(members, units, dtype=torch.bool)
    for s in range(members):
        states[s, torch.randperm(units, generator=generator)[:kept]] = True
    return states


@functools.lru_cache(maxsize=None)
def make_model(net: str, seed: int = 0):
    """Model, its pruner (for units and energy) and a fixed batch; shared by all cases of one net."""
    torch.manual_seed(seed)
    model = build_model(net, 1, SIZE, CLASSES)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    pruner = EDropout(model, x[:2], backend="reference", seed=seed)
    return model, pruner, x, y


def make_case(net: str, members: int, keep: float, seed: int = 0) -> dict:
    """Everything ``score`` needs for one benchmark case."""
    model, pruner, x, y = make_model(net, seed)
    g = torch.Generator().manual_seed(seed + members + int(keep * 1000))
    states = exact_keep_states(members, pruner.num_units, keep, g)
    return dict(model=model, units=pruner.units, states=states, x=x, y=y, energy_fn=pruner.energy_fn)


def score(case: dict, backend: str) -> torch.Tensor:
    """Energies [S] of the case's population with one backend (train-mode scoring, the default). The compact
    backend's scoring of duplicate states once is switched off: at k = 1 all members are the same state, and
    the table should show what S members cost, as it does for the other backends."""
    bound = make_backend(backend).bind(case["model"], case["units"], case["energy_fn"])
    bound.deduplicate = False  # the compact backend's switch; the others score every member anyway
    return bound.score(case["states"], case["x"], case["y"])


def rounds_for(seconds: float) -> int:
    """Timed rounds for a call of about ``seconds``: more for quick calls, at least 2 (median of 2 = their mean)."""
    return 5 if seconds < 0.5 else 3 if seconds < 3.0 else 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("net", NETS)
def test_energies(benchmark, net, members, keep, backend):
    torch.set_num_threads(THREADS)
    case = make_case(net, members, keep)
    start = time.perf_counter()
    out = score(case, backend)  # warm-up (also builds the compact plan), and sizes the number of rounds
    warm = time.perf_counter() - start
    assert out.shape == (members,) and torch.isfinite(out).all()
    benchmark.group = f"{net} S={members} k={keep}"
    benchmark.extra_info.update(net=net, members=members, keep=keep, backend=backend, batch=BATCH,
                                threads=THREADS)
    benchmark.pedantic(score, args=(case, backend), rounds=rounds_for(warm), iterations=1)


@functools.lru_cache(maxsize=None)
def iteration_case(net: str):
    """The plain, EDropout (S = 8 and 32, k = 0.5) and converged iterations of ``cpu_iteration``, on its batch."""
    from cpu_iteration import iteration_paths

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return iteration_paths(net, [8, 32], x, y)[0]


@pytest.mark.parametrize("path", ["plain", "edropout_S8", "edropout_S32", "converged"])
@pytest.mark.parametrize("net", NETS)
def test_iteration(benchmark, net, path):
    """One training iteration (Adadelta, batch 128): compare each path's time with the net's ``plain`` row."""
    torch.set_num_threads(THREADS)
    step = iteration_case(net)[path]
    start = time.perf_counter()
    step()  # warm-up: plans, caches, allocator
    warm = time.perf_counter() - start
    benchmark.group = f"{net} iteration"
    benchmark.extra_info.update(net=net, path=path, batch=BATCH, threads=THREADS)
    benchmark.pedantic(step, rounds=rounds_for(warm), iterations=1)
