"""Scenarios run by 2 gloo processes (``torch.multiprocessing.spawn``) and, for the reference, by one process:
each returns what it saw (energies, populations, best states, weights) so that the tests compare them."""
import gc
import os
import signal
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import edropout.app.cli as cli
import edropout.app.training as training
from edropout import EDropout
from edropout.checks import NonFiniteError
from edropout.backends.compact import CompactBackend
from edropout.distributed import RanksDiverged
from nets import ConcatNet, randomise_bn, small_net

ITERATIONS = 20
GLOBAL_BATCH = 16
BACKENDS = ("reference", "compact")
# the main job on 2 ranks, on random 8×8 idx files in DATA (``idx_files.write_fashion_like``; no scikit-learn import): 16
# iterations per epoch, the state frozen in epoch 1 (so later epochs train the exported network under DDP)
DATA = "data"
CLI = ["prune", "--model", "lenet", "--width", "4", "--data", "fashion-mnist", "--batch-size", "32",
       "--population-size", "4", "--min-iterations", "8", "--patience", "2", "--epochs", "6", "--no-progress"]


def cli_args(directory, out, *more):
    """The main job's arguments with the data and output directories under ``directory``."""
    return CLI + ["--data-dir", os.path.join(directory, DATA), "--out", os.path.join(directory, out)] + list(more)


def batch(rows, seed=1, classes=10):
    """A random float64 batch of 8×8 grey images with labels of ``classes`` classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (rows,), generator=g)


def model(name="lenet"):
    """LeNet-style net without BatchNorm (or "concat": with BatchNorm), float64, identical on every rank."""
    if name == "concat":
        torch.manual_seed(0)
        return randomise_bn(ConcatNet()).double()
    return small_net(name).double()


def shard(x, y, rank, world):
    """Rank ``rank``'s contiguous part of a batch (the first parts one row longer for odd sizes)."""
    return x.tensor_split(world)[rank], y.tensor_split(world)[rank]


def energies_case(backend, parallel, rank=0, world=1, net_name="lenet"):
    """The population's energies and those of five random states, on a batch of 13 rows: data mode gives each
    rank its shard, population mode the whole batch."""
    x, y = batch(13, classes=4 if net_name == "concat" else 10)
    net = model(net_name)
    pruner = EDropout(net, x[:2], population_size=6, backend=backend, seed=3,
                      parallel=parallel if world > 1 else None)
    if parallel == "data":
        x, y = shard(x, y, rank, world)
    states = torch.rand(5, pruner.num_units, generator=torch.Generator().manual_seed(5)) < 0.6
    return {"population": pruner.population.clone(), "energies": pruner.energies(x, y),
            "states": states, "state_energies": pruner.score_states(states, x, y)}


def trajectory_case(backend, parallel, rank=0, world=1):
    """``ITERATIONS`` steps on global batches of ``GLOBAL_BATCH`` rows, the model DDP-wrapped when distributed;
    the state freezes along the way, so the exported network trains too. Records every iteration's population,
    stored energies and best state, the final weights, and which training paths ran."""
    net = model()
    x0, _ = batch(2)
    wrapped = DistributedDataParallel(net) if world > 1 else net
    pruner = EDropout(wrapped, x0, population_size=6, backend=backend, seed=3, min_iterations=8, patience=2,
                      parallel=parallel if world > 1 else None)
    optimizer = torch.optim.Adadelta(wrapped.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)
    seen = {"population": [], "stored_energies": [], "best_state": [], "loss": [], "kept_forwards": 0}
    kept_forward = CompactBackend.kept_channel_logits

    def counted(*args):  # how many training forwards really ran on kept channels
        logits = kept_forward(*args)
        seen["kept_forwards"] += logits is not None
        return logits

    CompactBackend.kept_channel_logits = counted
    try:
        run_steps(pruner, optimizer, parallel, rank, world, seen)
    finally:
        CompactBackend.kept_channel_logits = kept_forward
    pruner.sync()
    seen["weights"] = {k: v.clone() for k, v in net.state_dict().items()}
    seen["converged"] = pruner.converged
    seen["compact_trainer_ran"] = pruner.training_network is not pruner.model
    return seen


def run_steps(pruner, optimizer, parallel, rank, world, seen):
    """``ITERATIONS`` steps, recording the evolution after each."""
    for i in range(ITERATIONS):
        x, y = batch(GLOBAL_BATCH, seed=100 + i)
        if parallel == "data":
            x, y = shard(x, y, rank, world)
        info = pruner.step(x, y, optimizer)
        seen["population"].append(pruner.population.clone())
        seen["stored_energies"].append(pruner.stored_energies.clone())
        seen["best_state"].append(pruner.best_state.clone())
        seen["loss"].append(info.loss)


def diverged_case(rank, world):
    """Rank 1's evolution draws other random numbers: the pruner must stop every rank with RanksDiverged."""
    x, y = shard(*batch(12), rank, world)
    net = model()
    pruner = EDropout(DistributedDataParallel(net), x[:2], population_size=6, backend="reference", seed=3)
    if rank == 1:
        pruner.generator.manual_seed(99)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    try:
        for _ in range(5):
            pruner.step(x, y, optimizer)
    except RanksDiverged as exc:
        return str(exc)
    return None


def double(module, inputs, output):
    """A forward hook on the model's root that doubles its logits."""
    return 2 * output


def hooked_case(rank, world):
    """One DDP step of a model whose root has a forward hook: the hook must run once, as without DDP."""
    x, y = shard(*batch(8), rank, world)
    net = model()
    net.register_forward_hook(double)
    pruner = EDropout(DistributedDataParallel(net), x[:2], population_size=4, backend="reference", seed=3)
    info = pruner.step(x, y, torch.optim.SGD(net.parameters(), lr=0.0))
    return {"best_state": pruner.best_state.clone(), "loss": info.loss}


def other_batches_case(rank, world):
    """Population mode with a different batch on each rank must stop every rank with a clear error."""
    x, y = batch(8, seed=20 + rank)
    pruner = EDropout(model(), x[:2], population_size=4, backend="reference", parallel="population")
    try:
        pruner.energies(x, y)
    except ValueError as exc:
        return str(exc)
    return None


def skip_case(rank, world):
    """on_nonfinite='skip' is refused across ranks (a rank skipping alone would leave the others waiting)."""
    x, _ = batch(4)
    try:
        EDropout(model(), x[:2], population_size=4, backend="reference", on_nonfinite="skip")
    except ValueError as exc:
        return str(exc)
    return None


def infinite_logits(module, inputs, output):
    """A forward hook that makes every logit infinite (the cross-entropy is then NaN)."""
    return output + float("inf")


def nonfinite_loss_case(rank, world):
    """Rank 1's logits are infinite (its training loss is NaN; the energies ignore the logits): DDP averages that
    rank's gradients into every rank's, so every rank must skip the update and raise, naming the iteration, with
    its weights unchanged."""
    x, y = shard(*batch(8), rank, world)
    net = model()
    if rank == 1:
        net.register_forward_hook(infinite_logits)
    before = [p.detach().clone() for p in net.parameters()]
    pruner = EDropout(DistributedDataParallel(net), x[:2], population_size=4, backend="reference", seed=3,
                      energy=lambda logits, targets: targets.double())
    try:
        pruner.step(x, y, torch.optim.SGD(net.parameters(), lr=0.1))
        error = None
    except NonFiniteError as exc:
        error = str(exc)
    return {"error": error, "unchanged": all(torch.equal(a, p.detach()) for a, p in zip(before, net.parameters()))}


def settings_case(rank, world):
    """Ranks built with different population sizes must both get a clear error at construction."""
    x, _ = batch(4)
    try:
        EDropout(model(), x[:2], population_size=6 + 2 * rank)
    except ValueError as exc:
        return str(exc)
    return None


def bare_model_case(rank, world):
    """A distributed step on a model without DDP must be refused (its ranks would train apart)."""
    x, y = shard(*batch(8), rank, world)
    pruner = EDropout(model(), x[:2], population_size=4, backend="reference")
    try:
        pruner.step(x, y, torch.optim.SGD(pruner.model.parameters(), lr=0.1))
    except ValueError as exc:
        return str(exc)
    return None


def _children(pid):
    """Process ids of ``pid``'s children (Linux /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def start_and_kill(directory):
    """``torchrun --nproc_per_node=2 -m edropout prune ...`` into ``directory``/killed, checkpointing after every
    iteration, both workers killed (SIGKILL) as soon as a checkpoint appears, inside the first epoch; returns
    that checkpoint's (epoch, batches of the epoch done) and the job's output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "edropout"] + cli_args(directory, "killed", "--checkpoint-every", "0")
    out = os.path.join(directory, "killed")
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = os.path.join(out, "checkpoint.pt")
    deadline = time.monotonic() + 300
    while not os.path.exists(checkpoint):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"the torchrun job wrote no checkpoint:\n{job.communicate()[0].decode()}")
        time.sleep(0.005)
    workers = _children(job.pid)
    for pid in workers:  # freeze them first, then read where they are
        os.kill(pid, signal.SIGSTOP)
    saved = torch.load(checkpoint, weights_only=True)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    output = job.communicate(timeout=120)[0].decode()
    return (saved["epoch"], saved["position"]), output


def cli_case(rank, world, directory):
    """The main job on this process group: a straight run, and the resume of the run that ``start_and_kill``
    killed; records which rank wrote files."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    writes = []

    def recorded(module, name):
        original = getattr(module, name)

        def write(*args, **kwargs):
            writes.append(name)
            return original(*args, **kwargs)

        setattr(module, name, write)

    for module, name in ((training, "atomic_save"), (cli, "save_pruned_model"), (cli, "write_json"),
                         (cli, "plot_history")):
        recorded(module, name)
    codes = [cli.main(cli_args(directory, "straight")), cli.main(cli_args(directory, "killed", "--resume"))]
    return {"writes": writes, "codes": codes}


def run_all(rank, world, directory):
    """Every scenario in one process group (one spawn for the whole module)."""
    out = {}
    for backend in BACKENDS:
        for parallel in ("data", "population"):
            out["energies", backend, parallel] = energies_case(backend, parallel, rank, world)
            out["trajectory", backend, parallel] = trajectory_case(backend, parallel, rank, world)
    for parallel in ("data", "population"):
        out["energies", "batchnorm", parallel] = energies_case("reference", parallel, rank, world, "concat")
    out["diverged"] = diverged_case(rank, world)
    out["settings"] = settings_case(rank, world)
    out["bare_model"] = bare_model_case(rank, world)
    out["hooked"] = hooked_case(rank, world)
    out["other_batches"] = other_batches_case(rank, world)
    out["skip"] = skip_case(rank, world)
    out["nonfinite_loss"] = nonfinite_loss_case(rank, world)
    out["cli"] = cli_case(rank, world, directory)
    return out


def worker(rank, world, store, results):
    """Entry point of one spawned rank: join the gloo group through a file store, run everything, save."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(run_all(rank, world, results), os.path.join(results, f"rank{rank}.pt"))
        gc.collect()  # the last DDP wrappers go while the group still exists
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _spoiled(x, y, how):
    """The batch with one NaN input ("nan"), one label past the 10 classes ("label"), no rows ("empty") or one
    label fewer than inputs ("shape")."""
    x, y = x.clone(), y.clone()
    if how == "nan":
        x.view(-1)[3] = float("nan")
    elif how == "label":
        y[0] = 10
    elif how == "empty":
        x, y = x[:0], y[:0]
    else:
        y = y[:-1]
    return x, y


def bad_batch_case(rank, world, parallel, how, call, bad_rank):
    """Rank ``bad_rank`` alone gets a bad batch (``_spoiled``) in ``call``: "step" (evolving), "converged" (a step
    after ``finalize``) or "energies". Every rank must raise; returns (exception type name, message) or None."""
    x, y = batch(8, seed=7)
    if parallel == "data":
        x, y = shard(x, y, rank, world)
    net = model()
    pruner = EDropout(DistributedDataParallel(net), x[:2], population_size=4, backend="compact", seed=3,
                      parallel=parallel)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    pruner.step(x, y, optimizer)  # a good step first
    if call == "converged":
        pruner.finalize()
    if rank == bad_rank:
        x, y = _spoiled(x, y, how)
    try:
        if call == "energies":
            pruner.energies(x, y)
        else:
            pruner.step(x, y, optimizer)
    except (NonFiniteError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None


BAD_BATCHES = [("population", "nan", "step", 1), ("data", "label", "step", 1), ("data", "nan", "converged", 0),
               ("population", "nan", "energies", 1), ("data", "shape", "step", 1), ("population", "empty", "step", 0),
               ("data", "empty", "converged", 1), ("population", "shape", "energies", 0)]
#: What the rank with the bad batch says, by kind of problem (the other ranks say "another rank's batch ...").
OWN_ERRORS = {"nan": "x holds 1 non-finite values", "label": "labels must lie in [0, 10)",
              "empty": "the batch is empty", "shape": "x and y must have the same batch size"}


def bad_batch_worker(rank, world, store, results):
    """Every ``BAD_BATCHES`` scenario in one gloo group whose collectives time out after 30 s (a rank left waiting
    fails instead of hanging), each followed by an all-reduce that both ranks must reach in step."""
    import datetime
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        seen = []
        for number, case in enumerate(BAD_BATCHES):
            seen.append(bad_batch_case(rank, world, *case))
            gc.collect()
            together = torch.tensor([float(number)])
            dist.all_reduce(together)
            seen[-1] = (seen[-1], together.item())
        torch.save(seen, os.path.join(results, f"bad_batch_rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
