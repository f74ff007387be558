"""``--bind-cores``: each CPU rank on one host gets its own consecutive block of the cores it may use."""
import multiprocessing
import os
import socket

import pytest
import torch

from edropout.app.cli import build_parser
from edropout.app.errors import UserError
from edropout.app.launch import bind_cores, core_share, join, leave


@pytest.mark.parametrize("cores, world, expected", [
    (range(8), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (range(8), 3, [[0, 1], [2, 3, 4], [5, 6, 7]]),
    ([9, 3, 5, 7], 4, [[3], [5], [7], [9]]),
    ([0, 1], 2, [[0], [1]]),
])
def test_core_share_deals_consecutive_disjoint_blocks_covering_every_core(cores, world, expected):
    shares = [core_share(cores, rank, world) for rank in range(world)]
    assert shares == expected
    assert sorted(c for share in shares for c in share) == sorted(cores)


def test_more_ranks_than_cores_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"2 cores for 3 ranks.*--nproc_per_node"):
        core_share([0, 1], 0, 3)


def _bound(rank, world, queue):
    got = bind_cores(rank, world)
    queue.put((got, sorted(os.sched_getaffinity(0))))


def test_bind_cores_sets_this_process_affinity_to_its_share():
    allowed = sorted(os.sched_getaffinity(0))
    world = min(2, len(allowed))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for rank in range(world):
        child = context.Process(target=_bound, args=(rank, world, queue))
        child.start()
        child.join(60)
        got, affinity = queue.get(timeout=5)
        assert affinity == core_share(allowed, rank, world) and got == len(affinity)
    assert sorted(os.sched_getaffinity(0)) == allowed  # the test process itself is untouched


def test_bind_cores_is_an_option_of_the_main_job():
    assert build_parser().parse_args(["prune", "--bind-cores"]).bind_cores
    assert not build_parser().parse_args(["prune"]).bind_cores


def _joined(rank, world, port, threads, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    launch = join("cpu", "data", bind=True, threads=threads)
    queue.put((rank, sorted(os.sched_getaffinity(0)), torch.get_num_threads()))
    leave(launch)


@pytest.mark.parametrize("threads", [None, 3])
def test_a_cpu_rank_joining_with_bind_gets_its_cores_and_threads(threads):
    allowed = sorted(os.sched_getaffinity(0))
    world = min(2, len(allowed))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_joined, args=(r, world, port, threads, queue)) for r in range(world)]
    for p in ranks:
        p.start()
    found = sorted(queue.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(60)
    for rank, affinity, count in found:
        share = core_share(allowed, rank, world)
        assert affinity == share and count == (threads or len(share))


def test_a_single_process_join_sets_the_threads_asked_and_binds_nothing(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    before, allowed = torch.get_num_threads(), os.sched_getaffinity(0)
    try:
        launch = join("cpu", "data", bind=True, threads=before + 1)
        assert launch.world_size == 1 and torch.get_num_threads() == before + 1
        assert os.sched_getaffinity(0) == allowed
    finally:
        torch.set_num_threads(before)
