"""CPU scaling of distributed EDropout: whole training iterations on 1 rank × 1 thread against 2 ranks × 1 thread
(gloo), data- and population-parallel, at S = 16 and 32, in one run.

    python benchmarks/distributed_scaling.py    # on an otherwise idle machine; writes benchmarks/results/distributed_scaling.*
    python benchmarks/distributed_scaling.py --bucket-cap-mb 0.25    # DDP with smaller gradient buckets
    python benchmarks/distributed_scaling.py --pin-cores    # each rank on its own cores (the 1-rank run on rank 0's)

``--bucket-cap-mb`` is DDP's own setting: LeNet's 0.9 MB of gradients fit in DDP's first 1 MB bucket, whose
all-reduce then starts only after the whole backward; smaller buckets start the big fully connected layer's
all-reduce while the convolutions' backward still runs. ``--pin-cores`` binds each rank, with the collective
threads it starts, to its own share of the cores, as the main job's ``--bind-cores`` does (``launch.bind_cores``);
the 1-rank run gets rank 0's share.

Fixed setup: LeNet-style and ResNet-18-style nets at 28×28 grey input, global batch 128 (data mode: 64 rows per
rank; population mode: 128 rows on every rank, training on 64), Adadelta, keep fraction k = 0.5, backend "auto",
no convergence. One rank is a plain process (no process group, no DDP); two ranks are DDP-wrapped and joined
through a file store. Each iteration is timed between barriers, median of the rounds. The same two ranks also
time the scorers' collectives alone (one all-reduce of S + 5 float64, one all-gather of S/2 + 4 per rank).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from edropout import EDropout
from edropout.app.launch import bind_cores
from edropout.app.models import build_model
from edropout.app.report import run_metadata

BATCH, SIZE, CLASSES, KEEP, WORLD = 128, 28, 10, 0.5, 2
MODES = ("data", "population")


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 1, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _setup(net, members, wrap=None, parallel=None):
    """The model (wrapped by ``wrap``), its pruner and optimizer, identical on every rank."""
    torch.manual_seed(0)
    model = build_model(net, 1, SIZE, CLASSES)
    trained = wrap(model) if wrap else model
    x, _ = _batch()
    pruner = EDropout(trained, x[:2], population_size=members, init_keep=KEEP, min_iterations=10 ** 9,
                      parallel=parallel)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)
    return model, pruner, optimizer


def _timed(step, rounds, warmup, sync=lambda: None):
    """Median milliseconds of ``step`` over ``rounds`` after ``warmup`` calls, each between ``sync`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def single_process(nets, members_list, rounds, warmup):
    """{(net, S): ms} for one process with one thread."""
    x, y = _batch()
    found = {}
    for net in nets:
        for members in members_list:
            _, pruner, optimizer = _setup(net, members)
            found[net, members] = _timed(lambda: pruner.step(x, y, optimizer), rounds, warmup)
    return found


def _collectives(members_list, rounds):
    """{S: (all-reduce ms, all-gather ms)} of the scorers' collectives alone."""
    found = {}
    for members in members_list:
        reduced = torch.zeros(members + 5, dtype=torch.float64)
        chunk = torch.zeros(members // WORLD + 4, dtype=torch.float64)
        gathered = [torch.empty_like(chunk) for _ in range(WORLD)]
        found[members] = (_timed(lambda: dist.all_reduce(reduced), rounds, 5, dist.barrier),
                          _timed(lambda: dist.all_gather(gathered, chunk), rounds, 5, dist.barrier))
    return found


def _rank(rank, store, nets, members_list, rounds, warmup, out, ddp_options, pin):
    if pin:
        bind_cores(rank, WORLD)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    x, y = _batch()
    found = {}
    for net in nets:
        for members in members_list:
            for mode in MODES:
                _, pruner, optimizer = _setup(net, members, lambda m: DistributedDataParallel(m, **ddp_options), mode)
                xs, ys = (x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) if mode == "data" else (x, y)
                found[net, members, mode] = _timed(lambda: pruner.step(xs, ys, optimizer), rounds, warmup,
                                                   dist.barrier)
    collectives = _collectives(members_list, 50)
    if rank == 0:
        torch.save({"iterations": found, "collectives": collectives}, out)
    del pruner, optimizer
    gc.collect()  # the last DDP wrappers go while the group still exists
    dist.barrier()
    dist.destroy_process_group()


def two_ranks(nets, members_list, rounds, warmup, ddp_options=None, pin=False):
    """{(net, S, mode): ms} and {S: collective ms} for two gloo ranks with one thread each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_rank, args=(os.path.join(tmp, "store"), nets, members_list, rounds, warmup, out, ddp_options or {}, pin),
                 nprocs=WORLD)
        found = torch.load(out, weights_only=True)
    return found["iterations"], found["collectives"]


def _parameters(net):
    return sum(p.numel() for p in build_model(net, 1, SIZE, CLASSES).parameters())


def markdown(rows, collectives, meta, command, ddp_options, pinned=False) -> str:
    lines = ["# Distributed EDropout on CPU: 1 rank × 1 thread vs 2 ranks × 1 thread (gloo)", "",
             f"{meta['machine']}; torch {meta['torch']}; {meta['date']}; `{command}`; global batch {BATCH}, "
             f"{SIZE}×{SIZE} grey; Adadelta; k = {KEEP}; backend auto; DDP-wrapped model on 2 ranks ("
             f"{', '.join(f'{k} = {v}' for k, v in ddp_options.items()) or 'DDP defaults'}); "
             + ("each rank bound to its own share of the cores, the 1-rank run to rank 0's; " if pinned else "") + "medians of "
             f"the rounds, each iteration timed between barriers.", "",
             "| net | S | 1 rank ms | data 2 ranks ms | data speedup | population 2 ranks ms | population speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['S']} | {r['one_rank_ms']:.1f} | {r['data_ms']:.1f} | "
                     f"{r['data_speedup']:.2f}× | {r['population_ms']:.1f} | {r['population_speedup']:.2f}× |")
    lines += ["", "Collectives alone on the same 2 ranks (median ms): "
              + "; ".join(f"S = {s}: all-reduce of {s + 5} float64 {c[0]:.3f}, all-gather of {s // WORLD + 4} "
                          f"per rank {c[1]:.3f}" for s, c in collectives.items()) + ".",
              "DDP's gradient all-reduce moves every parameter's gradient once per iteration: "
              + ", ".join(f"{r['net']} {r['parameters']:,} float32" for r in rows if r["S"] == rows[0]["S"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--members", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--nets", nargs="+", default=["lenet", "resnet18"])
    parser.add_argument("--bucket-cap-mb", type=float, default=None,
                        help="DDP's bucket_cap_mb on the 2 ranks (default: DDP's own)")
    parser.add_argument("--pin-cores", action="store_true",
                        help="bind each rank to its own share of the cores (the main job's --bind-cores), and the "
                             "1-rank run to rank 0's")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    allowed = os.sched_getaffinity(0)
    if args.pin_cores:
        bind_cores(0, WORLD)  # the 1-rank run gets rank 0's share
    one = single_process(args.nets, args.members, args.rounds, args.warmup)
    os.sched_setaffinity(0, allowed)  # the ranks start from every core and take their own shares
    ddp_options = {} if args.bucket_cap_mb is None else {"bucket_cap_mb": args.bucket_cap_mb}
    two, collectives = two_ranks(args.nets, args.members, args.rounds, args.warmup, ddp_options, args.pin_cores)
    rows = []
    for net in args.nets:
        for members in args.members:
            row = {"net": net, "S": members, "parameters": _parameters(net), "one_rank_ms": one[net, members]}
            for mode in MODES:
                row[f"{mode}_ms"] = two[net, members, mode]
                row[f"{mode}_speedup"] = one[net, members] / two[net, members, mode]
            rows.append(row)
    meta = run_metadata("distributed_scaling", torch.device("cpu"))
    command = " ".join(["python benchmarks/distributed_scaling.py"] + argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed_scaling.json"), "w") as f:
        json.dump({"meta": meta, "command": command, "ddp_options": ddp_options, "pinned": args.pin_cores, "rows": rows,
                   "collectives_ms": {str(s): {"all_reduce": c[0], "all_gather": c[1]}
                                      for s, c in collectives.items()}}, f, indent=2)
    text = markdown(rows, collectives, meta, command, ddp_options, args.pin_cores)
    with open(os.path.join(args.out, "distributed_scaling.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
