"""EDropout on torchvision and timm classification models with random weights: what works, checked against
definitions written here, and what Torch-Pruning's own magnitude pruner does on the same model.

For every model (one subprocess each, with a hard memory cap and a timeout, results cached per model so a run
resumes), on a small input (64×64 where the model accepts it, batch 4, 10 classes; a Linear layer that its
constructor zeroes, torchvision's ViT head, gets seeded random weights, else every logit is 0 and no check can fail):
- construction: seconds, units D, whether torch-pruning traced the model, warnings;
- energies of S = 4 states on every backend (reference, batched, compact) against an independent masked forward
  written below: every BatchNorm (subclasses included) normalising with the state's own batch statistics, every
  other module in eval mode, each mask applied to its module's output;
- the triton backend's energies in Triton's CPU interpreter (every program instance in Python: 2 states on 2
  rows, for time) in one scoring mode, recorded in the row: "eval" (the default; ``score_in_eval_mode=True``,
  BatchNorm with running statistics, those of the dense model on 16 random rows, against the masked forward in
  eval mode: well-conditioned at any input size) or "train" (batch statistics, as above; with two rows, BatchNorm over the last stages' 1x1 or 2x2 maps is
  ill-conditioned). ``--recheck-triton`` reruns only this check on the cached rows where it is not ok;
- export of one state: the small network against the masked model (eval mode), and the pruning rate against the
  exported parameter count (exact);
- kept-channel training (``CompactBackend.kept_channel_logits``) against the masked dense forward in float64 on two rows:
  logits, gradients and the random state after the call, with every module in train mode and (where the model
  has any) with dropout-like modules in eval;
  ``--recheck-kept`` reruns only the settings that are not ok, each model alone in a fresh process, under
  ``--kept-seconds`` and ``--memory-gib`` (recorded in the entry and named under the table);
- training after ``finalize()``: steps of the exported network give a finite loss;
- Torch-Pruning's ``MagnitudePruner`` (L1, 50 % channels, the classifier ignored) under the same time and memory
  budget as EDropout's grouping: the parameter share it removes, or its error.

torchvision: the PyPI wheel of torchvision is built against a CUDA torch and fails to import beside the CPU-only
torch 2.13 of this machine. The benchmark therefore runs in its own venv with a matching pair (the CUDA build of
torch runs on CPU):

    python3 -m venv .venv-zoo
    .venv-zoo/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-zoo/bin/pip install --no-deps timm torch-pruning && .venv-zoo/bin/pip install pyyaml \\
        safetensors huggingface_hub && .venv-zoo/bin/pip install --no-deps -e .
    PYTHONPATH=$PWD .venv-zoo/bin/python benchmarks/model_zoo.py      # -> results/model_zoo.{json,md}

Construct times are measured at normal priority on a shared machine (other jobs not paused): they are noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE.parent / "runs" / "model_zoo"
MEMORY_CAP = 8 * 2 ** 30  # address space per model (the machine's 24 GiB are shared; CUDA torch maps ~2 GiB)
TIMEOUT = 900  # seconds per model
BACKEND_SECONDS = 240  # per check
TRITON_SECONDS = 30  # the triton backend's energies in Triton's interpreter (every program instance in Python)
TRITON_MODE = "eval"  # the triton check's scoring mode (see triton_check)
TRITON_STATES, TRITON_ROWS = 2, 2
CALIBRATION_ROWS = 16  # eval-mode triton check: BatchNorm running statistics of the dense model on these many rows
BATCH, STATES, CLASSES = 4, 4, 10

# (source, name, constructor keyword arguments, input side)
MODELS = [
    ("torchvision", "resnet18", {}, 64), ("torchvision", "resnet50", {}, 64),
    ("torchvision", "resnext50_32x4d", {}, 64), ("torchvision", "vgg11_bn", {}, 64),
    ("torchvision", "alexnet", {}, 64), ("torchvision", "squeezenet1_1", {}, 64),
    ("torchvision", "mobilenet_v2", {}, 64), ("torchvision", "mobilenet_v3_small", {}, 64),
    ("torchvision", "efficientnet_b0", {}, 64), ("torchvision", "shufflenet_v2_x1_0", {}, 64),
    ("torchvision", "mnasnet0_5", {}, 64), ("torchvision", "regnet_x_400mf", {}, 64),
    ("torchvision", "googlenet", {"aux_logits": False, "init_weights": True}, 64),
    ("torchvision", "convnext_tiny", {}, 64),
    ("timm", "resnet18d", {}, 64), ("timm", "efficientnet_b0", {}, 64),
    ("timm", "mobilenetv3_small_100", {}, 64), ("timm", "convnext_atto", {}, 64),
    ("timm", "vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("torchvision", "densenet121", {}, 64), ("torchvision", "vit_b_16", {"image_size": 64}, 64),
    ("torchvision", "swin_t", {}, 64), ("torchvision", "wide_resnet50_2", {}, 64),
    ("torchvision", "maxvit_t", {}, 224),
]


def build(source, name, kwargs):
    """The model with random (seeded) weights and a 10-class head."""
    import torch

    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        return random_zero_linears(getattr(torchvision.models, name)(num_classes=CLASSES, **kwargs))
    import timm

    return random_zero_linears(timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs))


def random_zero_linears(model):
    """Give every Linear layer whose weight its constructor set to zero (torchvision's ViT head) seeded normal
    weights (std 0.02): with a zero head every logit is 0 whatever the input and mask, and so every energy, export
    and gradient check on the model would pass whatever the code computed."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model


# ----- independent definitions (nothing from edropout's scoring code) ----------------------------------------------
@contextlib.contextmanager
def masked_by_hooks(model, units, state):
    """While inside, each mask point's output is multiplied by its unit's keep bit (forward hooks written here)."""
    import torch

    modules = dict(model.named_modules())
    ext = torch.cat([state.bool(), torch.ones(1, dtype=torch.bool)])
    handles = []
    for p in units.mask_points:
        keep = ext[p.index].float()

        def hook(module, inputs, output, keep=keep, dim=p.channel_dim):
            shape = [1] * output.dim()
            shape[dim] = -1
            return output * keep.view(shape)

        handles.append(modules[p.module_name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def independent_energies(model, units, states, x, y):
    """Margin energy of each state: a copy of the model in eval mode whose BatchNorms have no running statistics
    (so they normalise with the batch's own statistics, one state per forward), masks multiplied into the mask
    points' outputs by hooks written here."""
    import torch
    import torch.nn as nn

    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
            m.track_running_stats = False
    out = []
    for state in states:
        with masked_by_hooks(net, units, state), torch.no_grad():
            out.append(margin(net(x), y))
    return torch.stack(out)


def independent_eval_energies(model, units, states, x, y):
    """Margin energy of each state with every module in eval mode (BatchNorm with its running statistics, as
    ``score_in_eval_mode=True`` scores), masks multiplied in by hooks written here."""
    import torch

    return torch.stack([margin(masked_outputs(model, units, state, x), y) for state in states])


def margin(z, y):
    """Mean over rows of (largest other logit - true logit)."""
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (others - true).mean()


@contextlib.contextmanager
def calibrated_batch_norms(model, side: int):
    """While inside, every BatchNorm's running statistics are those of the dense model on CALIBRATION_ROWS random
    inputs (one forward, BatchNorms in train mode with a cumulative average, every other module in eval), as after
    training on data; the initial ones (mean 0, variance 1) let the logits of deep random networks vanish (1e-12 on
    mobilenet_v3_small), which no tolerance of the form |dE| / (1 + |E|) can check. Restored on exit."""
    import torch
    import torch.nn as nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    was = {m: m.training for m in model.modules()}
    x = torch.randn(CALIBRATION_ROWS, 3, side, side, generator=torch.Generator().manual_seed(2))
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            model(x)
        model.eval()
        yield
    finally:
        for m, (momentum, mean, var, count) in zip(norms, saved):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        for m, t in was.items():
            m.training = t


def masked_outputs(model, units, state, x):
    """The masked model's eval-mode output (running statistics), through hooks written here."""
    import torch

    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with masked_by_hooks(model, units, state), torch.no_grad():
            return model(x)
    finally:
        for m, t in was.items():
            m.training = t


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Timeout(Exception):
    """A check ran past its seconds."""


def limited(seconds, fn):
    """``fn()``, or Timeout after ``seconds`` (SIGALRM: delivered between Python bytecodes)."""
    def alarm(signum, frame):
        raise Timeout(f"more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def short(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"


# ----- one model ---------------------------------------------------------------------------------------------------
def setup(source, name, kwargs, side):
    """The model, its batch (x, y), an ``EDropout`` on it (reference backend, seed 0), the construct seconds and
    the RuntimeWarnings of construction: the same for a full run and a triton-only recheck."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before edropout_kernels is imported
    import torch

    from edropout import EDropout

    torch.set_num_threads(2)
    model = build(source, name, kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, side, side, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        pruner = EDropout(model, x[:2], population_size=STATES, backend="reference", seed=0)
        seconds = round(time.perf_counter() - start, 2)
    return model, x, y, pruner, seconds, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def triton_check(model, units, energy_fn, states, x, y, mode: str, seconds: int) -> dict:
    """The triton backend's energies in Triton's interpreter (every program instance in Python: 2 states on 2 rows,
    for time) against the independent masked forward of the same scoring mode: "train" (BatchNorm with each state's
    batch statistics; ill-conditioned where the last feature maps of two rows are 1x1 or 2x2) or "eval"
    (``score_in_eval_mode=True``: BatchNorm with running statistics, set by ``calibrated_batch_norms``;
    well-conditioned at any input size)."""
    from edropout.backends import TritonBackend

    states, x, y = states[:TRITON_STATES], x[:TRITON_ROWS], y[:TRITON_ROWS]
    entry = {"mode": mode, "input": list(x.shape), "states": len(states), "limit_s": seconds}
    if mode == "eval":
        entry["running_statistics"] = f"dense model on {CALIBRATION_ROWS} random rows"
    backend = TritonBackend().bind(model, units, energy_fn, batch_statistics=mode == "train")
    independent = independent_energies if mode == "train" else independent_eval_energies
    calibration = calibrated_batch_norms(model, x.shape[-1]) if mode == "eval" else contextlib.nullcontext()
    try:
        with calibration:
            start = time.perf_counter()
            got = limited(seconds, lambda: backend.score(states.bool(), x, y))
            entry["seconds"] = round(time.perf_counter() - start, 1)
            expected = independent(model, units, states, x, y)
        err = float(((got - expected).abs() / (1 + expected.abs())).max())
        entry.update(max_rel_diff=err, ok=bool(err <= 1e-3), max_abs_energy=float(expected.abs().max()))
    except Exception as exc:
        entry["error"] = short(exc)
    return entry


def run_one(source, name, kwargs, side, triton_seconds: int = TRITON_SECONDS, triton_mode: str = TRITON_MODE) -> dict:
    """Every check on one model; a dict for the table (errors recorded, not raised)."""
    model, x, y, pruner, construct_s, seen = setup(source, name, kwargs, side)
    import torch

    from edropout import EDropout
    from edropout.budget import BudgetExceeded, budget

    row = {"model": f"{source}/{name}", "input": list(x.shape),
           "limits_s": {"triton": triton_seconds, "other_backends": BACKEND_SECONDS},
           "parameters": parameters(model), "construct_s": construct_s}
    units = pruner.units
    row.update(units=units.num_units, traced=units.traced, groups=len(units.groups))
    states = pruner.population.clone()
    want = independent_energies(model, units, states, x, y)
    row["energies"] = {}
    for backend in ("reference", "batched", "compact", "triton"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if backend == "triton":
                row["energies"][backend] = triton_check(model, units, pruner.energy_fn, states, x, y, triton_mode,
                                                        triton_seconds)
            else:
                try:
                    pruner.backend = backend
                    start = time.perf_counter()
                    got = limited(BACKEND_SECONDS, lambda: pruner.score_states(states, x, y))
                    err = float(((got - want).abs() / (1 + want.abs())).max())
                    row["energies"][backend] = {"max_rel_diff": err, "ok": bool(err <= 1e-3),
                                                "seconds": round(time.perf_counter() - start, 1)}
                except Exception as exc:
                    row["energies"][backend] = {"error": short(exc)}
        notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if notes:
            row["energies"][backend]["warnings"] = sorted(set(n[:200] for n in notes))
    pruner.backend = "reference"
    # export of one state
    state = states[1].clone()
    pruner.best_state = state
    try:
        small = pruner.export()
        ref = masked_outputs(model, units, state, x)
        small.eval()
        with torch.no_grad():
            out = small(x)
        row["export_max_rel_diff"] = float((out - ref).abs().max() / (1 + ref.abs().max()))
        rate = pruner.pruning_rate
        exported = 1 - parameters(small) / parameters(model)
        row["rate"] = {"pruning_rate": rate, "exported": exported, "exact": abs(rate - exported) < 1e-12}
    except Exception as exc:
        row["export_error"] = short(exc)
    # kept-channel training against the masked dense forward, float64
    start = time.perf_counter()
    # two rows: float64 on a CPU is slow (mobilenet_v2: 400 s on four rows, machine loaded)
    row["kept_channel_training"] = kept_channel_check(model, units, state, x[:2], y[:2])
    row["kept_channel_training_s"] = round(time.perf_counter() - start, 1)
    # training after finalize
    try:
        def train():
            net = copy.deepcopy(model).train()
            p = EDropout(net, x[:2], population_size=STATES, backend="reference", seed=0, min_iterations=0)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            p.step(x, y, opt)
            p.finalize()
            losses = [p.step(x, y, opt).loss for _ in range(2)]
            return {"ok": all(torch.isfinite(torch.tensor(losses)).tolist()), "losses": losses,
                    "exported_training": p.training_network is not p.model}
        row["train_after_finalize"] = limited(BACKEND_SECONDS, train)
    except Exception as exc:
        row["train_after_finalize"] = {"error": short(exc)}
    start = time.perf_counter()
    row["torch_pruning"] = torch_pruning_check(model, x, units.classifier, budget, BudgetExceeded)
    row["torch_pruning"]["seconds"] = round(time.perf_counter() - start, 1)
    row["warnings"] = sorted(set(w[:300] for w in seen))
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    return row


def recheck_triton(source, name, kwargs, side, path: Path, seconds: int, mode: str) -> None:
    """Replace the triton entry of the cached row at ``path`` by a fresh ``triton_check`` (the other checks are
    kept): the same model, batch, units and states as the full run, which is asserted on the units."""
    row = json.loads(path.read_text())
    model, x, y, pruner, _, _ = setup(source, name, kwargs, side)
    if pruner.units.num_units != row["units"]:
        raise RuntimeError(f"{source}/{name}: {pruner.units.num_units} units, the cached row has {row['units']}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = triton_check(model, pruner.units, pruner.energy_fn, pruner.population.clone(), x, y, mode, seconds)
    notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if notes:
        entry["warnings"] = sorted(set(n[:200] for n in notes))
    row["energies"]["triton"] = entry
    row.setdefault("limits_s", {})["triton"] = seconds
    path.write_text(json.dumps(row, indent=1))


def kept_channel_check(model, units, state, x, y, seconds: int = BACKEND_SECONDS, only=None) -> dict:
    """``CompactBackend.kept_channel_logits`` vs the masked dense forward (float64): max relative differences of logits and
    gradients, equal random states; all modules in train mode, then dropout-like modules in eval mode, each mode
    setting under its own limit of ``seconds`` (``only``: just these mode settings)."""
    result = {}
    drops = [n for n, m in model.named_modules()
             if "drop" in type(m).__name__.lower() or "stochasticdepth" in type(m).__name__.lower()]
    for modes in ("train", "drops_in_eval") if drops else ("train",):
        if only is not None and modes not in only:
            continue
        try:
            result[modes] = limited(seconds, lambda: kept_channel_mode(model, units, state, x, y,
                                                                       drops if modes == "drops_in_eval" else []))
        except Exception as exc:
            result[modes] = {"error": short(exc)}
    return result


def recheck_kept(source, name, kwargs, side, path: Path, seconds: int, memory_gib: float) -> None:
    """Rerun the kept-channel training settings of the cached row at ``path`` that are not ok, in this fresh process,
    on the full run's model, state (population member 1) and two rows (asserted on the units); the limits they ran
    under are recorded in the row."""
    row = json.loads(path.read_text())
    model, x, y, pruner, _, _ = setup(source, name, kwargs, side)
    if pruner.units.num_units != row["units"]:
        raise RuntimeError(f"{source}/{name}: {pruner.units.num_units} units, the cached row has {row['units']}")
    kept = row.setdefault("kept_channel_training", {})
    for mode in [m for m, v in kept.items() if not v.get("ok")]:
        start = time.perf_counter()
        entry = kept_channel_check(model, pruner.units, pruner.population[1].clone(), x[:2], y[:2], seconds, {mode})[mode]
        entry["rerun"] = {"limit_s": seconds, "memory_cap_gib": memory_gib,
                          "seconds": round(time.perf_counter() - start, 1)}
        kept[mode] = entry
    path.write_text(json.dumps(row, indent=1))


def kept_channel_mode(model, units, state, x, y, eval_modules) -> dict:
    """One mode setting of ``kept_channel_check``: every module in train mode except ``eval_modules`` (names)."""
    import torch
    import torch.nn.functional as F

    from edropout.backends import CompactBackend
    from edropout.energy import margin_energy
    from edropout.masked_update import frozen_statistics
    from edropout.masking import masked
    from edropout.state_view import StateView

    x64 = x.double()
    outs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kept in (True, False):  # one float64 copy at a time: wide_resnet50_2 is 0.55 GB a copy
            net = copy.deepcopy(model).double().train()
            for name, m in net.named_modules():
                if name in eval_modules:
                    m.eval()
            torch.manual_seed(3)
            with frozen_statistics(StateView(net, units, state).statistics_keeps):
                if kept:
                    logits = CompactBackend().bind(net, units, margin_energy).kept_channel_logits(state, x64)
                    if logits is None:
                        raise RuntimeError("the interpreter declined: " +
                                           "; ".join(str(w.message)[:200] for w in caught))
                else:
                    with masked(net, units, state):
                        logits = net(x64)
                F.cross_entropy(logits, y).backward()
            grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
            outs.append((logits.detach(), grads, torch.get_rng_state()))
            del net, logits
    (lc, gc, rc), (ld, gd, rd) = outs
    rel = lambda a, b: float((a - b).abs().max() / (1 + b.abs().max()))
    worst = max([rel(lc, ld)] + [rel(gc[k], gd[k]) for k in gd if k in gc])
    return {"max_rel_diff": worst, "same_rng": bool(torch.equal(rc, rd)),
            "ok": bool(worst <= 1e-10 and torch.equal(rc, rd) and gc.keys() == gd.keys())}


def torch_pruning_check(model, x, classifier, budget, BudgetExceeded) -> dict:
    """Torch-Pruning's MagnitudePruner at its defaults (L1 importance, 50 % of channels, the classifier ignored)."""
    import torch
    import torch_pruning as tp

    try:  # the copy too: a MemoryError here is this check's result, not the loss of the model's whole row
        net = copy.deepcopy(model).eval()
        head = dict(net.named_modules())[classifier]
        before = parameters(net)
        with budget(300, 2 * 2 ** 30) as guard:
            pruner = tp.pruner.MagnitudePruner(net, x[:2], importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=0.5, ignored_layers=[head])
            pruner.step()
            with torch.no_grad():
                net(x)
        return {"ok": True, "removed": 1 - parameters(net) / before}
    except BudgetExceeded:
        return {"error": f"stopped: {guard.reason}"}
    except Exception as exc:
        return {"error": short(exc)}


# ----- the driver --------------------------------------------------------------------------------------------------
def cap_memory(cap: int = MEMORY_CAP):
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_all(names, cache: Path, run: bool = True, timeout: int = TIMEOUT, triton_seconds: int = TRITON_SECONDS,
            memory_cap: int = MEMORY_CAP) -> list:
    """Rows of the selected models, each from the cache or (``run``) from a fresh subprocess under ``memory_cap``
    bytes of address space (recorded in the row when it is not ``MEMORY_CAP``); a model whose subprocess wrote no
    row gets a crash row naming what went wrong and the limits it ran under."""
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for source, name, kwargs, side in MODELS:
        key = f"{source}__{name}"
        if names and name not in names and key not in names:
            continue
        path = cache / f"{key}.json"
        if not path.exists() and not run:
            continue
        if not path.exists():
            print(f"{source}/{name} ...", flush=True)
            start = time.time()
            failure = _rerun(source, name, path, ["--triton-seconds", str(triton_seconds)], memory_cap, timeout)
            if not path.exists():
                crash = f"{failure or 'no row written'} (memory cap {memory_cap / 2 ** 30:g} GiB, {timeout} s)"
                path.write_text(json.dumps({"model": f"{source}/{name}", "crash": crash}, indent=1))
            elif memory_cap != MEMORY_CAP:
                row = json.loads(path.read_text())
                row["memory_cap_gib"] = memory_cap / 2 ** 30
                path.write_text(json.dumps(row, indent=1))
            print(f"  {time.time() - start:.0f} s", flush=True)
        rows.append(json.loads(path.read_text()))
    return rows


def _cached_rows(names, cache: Path):
    """(source, name, path, row) of every selected model with a cached row that did not crash."""
    for source, name, kwargs, side in MODELS:
        key = f"{source}__{name}"
        path = cache / f"{key}.json"
        if (names and name not in names and key not in names) or not path.exists():
            continue
        row = json.loads(path.read_text())
        if "crash" not in row:
            yield source, name, path, row


def _rerun(source, name, path: Path, extra: list, cap: int, timeout: int) -> str:
    """Run this script's ``--one`` on a model in a fresh process under ``cap`` bytes of address space: '' when it
    finished, else what went wrong (its exit and last lines, or the timeout)."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", source, name, "--json", str(path), *extra],
                              preexec_fn=lambda: cap_memory(cap), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout} s"
    if proc.returncode == 0:
        return ""
    return f"exit {proc.returncode}: {' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}"


def recheck_all(names, cache: Path, timeout: int, triton_seconds: int, mode: str) -> None:
    """``recheck_triton`` on every selected cached row whose triton entry is not ok, one subprocess per model
    under the memory cap; the cache is updated row by row (a failure is recorded in the triton entry)."""
    for source, name, path, row in _cached_rows(names, cache):
        if row["energies"].get("triton", {}).get("ok"):
            continue
        print(f"{source}/{name} (triton, {mode} mode) ...", flush=True)
        start = time.time()
        failure = _rerun(source, name, path, ["--triton-seconds", str(triton_seconds), "--triton-mode", mode,
                                              "--recheck-triton"], MEMORY_CAP, timeout)
        if failure:
            row["energies"]["triton"] = {"mode": mode, "error": failure[:400]}
            path.write_text(json.dumps(row, indent=1))
        print(f"  {time.time() - start:.0f} s: {json.loads(path.read_text())['energies']['triton']}", flush=True)


def recheck_kept_all(names, cache: Path, timeout: int, seconds: int, memory_gib: float) -> None:
    """``recheck_kept`` on every selected cached row with a kept-channel training setting that is not ok, one fresh
    subprocess per model under a ``memory_gib`` address-space cap; the cache is updated row by row."""
    for source, name, path, row in _cached_rows(names, cache):
        if all(v.get("ok") for v in row.get("kept_channel_training", {}).values()):
            continue
        print(f"{source}/{name} (kept-channel training, {seconds} s, {memory_gib:g} GiB) ...", flush=True)
        start = time.time()
        failure = _rerun(source, name, path, ["--kept-seconds", str(seconds), "--memory-gib", str(memory_gib),
                                              "--recheck-kept"], int(memory_gib * 2 ** 30), timeout)
        if failure:
            print(f"  failed: {failure[:400]}", flush=True)
        print(f"  {time.time() - start:.0f} s: {json.loads(path.read_text())['kept_channel_training']}", flush=True)


def _rerun_limits(rows) -> str:
    """Sentences naming the kept-channel training settings rerun in a fresh process under other limits and the
    rows run under another memory cap, or ''."""
    reruns = {}
    for r in rows:
        for mode, v in r.get("kept_channel_training", {}).items():
            if "rerun" in v:
                limits = (v["rerun"]["limit_s"], v["rerun"]["memory_cap_gib"])
                reruns.setdefault(limits, []).append(f"{r['model']} {mode}")
    caps = {}
    for r in rows:
        if "memory_cap_gib" in r:
            caps.setdefault(r["memory_cap_gib"], []).append(r["model"])
    return "".join(f" Kept-channel training rerun alone in a fresh process with a {s} s limit and a {g:g} GiB cap: "
                   f"{', '.join(names)}." for (s, g), names in sorted(reruns.items())) + "".join(
        f" Whole row run with a {g:g} GiB cap: {', '.join(names)}." for g, names in sorted(caps.items()))


def _limit(check) -> str:
    """'t/o' or 'mem' when a check hit the benchmark's own time or memory limit, '' otherwise."""
    error = (check or {}).get("error", "")
    if "Timeout" in error:
        return "t/o"
    if "allocate memory" in error or "MemoryError" in error:
        return "mem"
    return ""


def verdict(row) -> str:
    """works / works without export (untraced) / check: a one-word summary of a row; checks that hit the
    benchmark's limits (the triton interpreter's seconds, the memory cap) are named, not counted as failures."""
    if "crash" in row:
        return "crash"
    checks = dict(row.get("energies", {}))
    checks.update({f"training {k}": v for k, v in row.get("kept_channel_training", {}).items()})
    failed = [k for k, v in checks.items() if not v.get("ok") and not _limit(v)]
    limited_ = [k for k, v in checks.items() if _limit(v)]
    exported = row.get("rate", {}).get("exact") and row.get("export_max_rel_diff", 1) < 1e-4
    finalize = row.get("train_after_finalize", {}).get("ok")
    if failed or not finalize:
        return "check: " + ", ".join(failed + ([] if finalize else ["after finalize"]))
    if not exported and not (not row.get("traced") and "export_error" in row):
        return "check: export"
    word = "works" if exported else "works, no export (untraced)"
    return word + (f" ({', '.join(limited_)} not measured: limit)" if limited_ else "")


def markdown(rows, meta) -> str:
    lines = [f"# EDropout on torchvision and timm models ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']}; torch {meta['torch']}, torchvision {meta['torchvision']}, "
             f"timm {meta['timm']}; random weights (a Linear its constructor zeroes, torchvision ViT's head: seeded normal, "
             f"std 0.02), batch {BATCH}, S = {STATES}, memory cap "
             f"{MEMORY_CAP / 2 ** 30:.0f} GiB per model. Construct seconds at normal priority on a shared machine "
             f"(noisy). Energies: max |E − E_indep| / (1 + |E_indep|) over the states, per backend "
             f"(ref / batched / compact: {STATES} states on {BATCH} rows, BatchNorm with each state's batch "
             f"statistics; triton: {TRITON_STATES} states on {TRITON_ROWS} rows in Triton's CPU interpreter, "
             f"{TRITON_LEGEND}). Kept-channel training: max relative difference of logits and gradients vs the masked "
             f"dense forward in float64 (train modes / drops in eval).", "",
             "| model | D | traced | construct s | energies ref / bat / cmp / tri | export diff | rate exact | "
             "kept-channel training | after finalize | Torch-Pruning L1 50 % | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: ((_limit(v) or "err") if "error" in v else f"{v['max_rel_diff']:.0e}") if v else "–"
    for r in rows:
        if "crash" in r:
            lines.append(f"| {r['model']} | | | | | | | | | | crash: {r['crash'][:120]} |")
            continue
        e = r.get("energies", {})
        energies = " / ".join(fmt(e.get(b)) + ("*" if e.get(b, {}).get("warnings") else "") +
                              (_EVAL_MARK if b == "triton" and e.get(b, {}).get("mode") == "eval" else "")
                              for b in ("reference", "batched", "compact", "triton"))
        k = r.get("kept_channel_training", {})
        kept = " / ".join(fmt(k.get(m)) for m in ("train", "drops_in_eval"))
        export = f"{r['export_max_rel_diff']:.0e}" if "export_max_rel_diff" in r else "refused"
        tp_ = r.get("torch_pruning", {})
        tpr = f"{100 * tp_['removed']:.0f} % removed" if tp_.get("ok") else tp_.get("error", "")[:70]
        fin = "ok" if r.get("train_after_finalize", {}).get("ok") else \
            r.get("train_after_finalize", {}).get("error", "no")[:50]
        lines.append(f"| {r['model']} | {r['units']} | {'yes' if r['traced'] else 'no'} | {r['construct_s']} | "
                     f"{energies} | {export} | {r.get('rate', {}).get('exact', '–')} | {kept} | {fin} | {tpr} | "
                     f"{verdict(r)} |")
    lines += ["", "`*`: the backend warned (e.g. a fallback); the warnings are in model_zoo.json. `t/o`: the check ran "
              f"past the benchmark's limit (for the triton interpreter {_triton_limits(rows)}, {BACKEND_SECONDS} s "
              f"otherwise); `mem`: past the {MEMORY_CAP / 2 ** 30:.0f} GiB cap; `err`: the error is in "
              "model_zoo.json. `–`: not applicable (no dropout-like module)." + _rerun_limits(rows)]
    return "\n".join(lines) + "\n"


_EVAL_MARK = "†"
TRITON_LEGEND = (f"in the scoring mode its entry in model_zoo.json records: {_EVAL_MARK} = `score_in_eval_mode=True` "
                 f"(BatchNorm with running statistics: those of the dense model on {CALIBRATION_ROWS} random rows) "
                 "against the independent masked forward in eval mode, unmarked = batch statistics like the other "
                 "backends; input, states, seconds and the energies' size per entry")


def _triton_limits(rows) -> str:
    """The limits of the triton checks that ran past theirs, read from their Timeout messages ('more than N s'),
    e.g. '30 s' or '30 s, 240 s or 900 s (per row in model_zoo.json)'."""
    import re

    limits = sorted({int(m.group(1)) for r in rows if "crash" not in r
                     for m in [re.search(r"more than (\d+) s", r["energies"]["triton"].get("error", ""))] if m})
    text = ", ".join(f"{limit} s" for limit in limits[:-1]) + (" or " if len(limits) > 1 else "") + \
        (f"{limits[-1]} s" if limits else f"{TRITON_SECONDS} s")
    return text + (" (per row in model_zoo.json)" if len(limits) > 1 else "")


def readme_table(rows) -> str:
    """The README's "works on" table: one line per model, the largest deviation of the measured checks."""
    lines = ["| model | D | traced | energies vs independent (ref/bat/cmp) | triton (interpreter) | export diff | "
             "kept-channel training (float64) | Torch-Pruning L1 50 % | result |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "crash" in r:
            lines.append(f"| {r['model']} | | | | | | | | not measured: {r['crash'][:60]} |")
            continue
        cpu = [v["max_rel_diff"] for b, v in r.get("energies", {}).items() if b != "triton" and "max_rel_diff" in v]
        triton = r.get("energies", {}).get("triton", {})
        tri = (f"{triton['max_rel_diff']:.0e}{_EVAL_MARK if triton.get('mode') == 'eval' else ''}"
               if "max_rel_diff" in triton else _limit(triton) or "err")
        kept = [v["max_rel_diff"] for v in r.get("kept_channel_training", {}).values() if "max_rel_diff" in v]
        tp_ = r.get("torch_pruning", {})
        tpr = f"{100 * tp_['removed']:.0f} % removed" if tp_.get("ok") else tp_.get("error", "")[:50]
        export = f"{r['export_max_rel_diff']:.0e}" if "export_max_rel_diff" in r else "refused"
        energies = f"{max(cpu):.0e} ({len(cpu)}/3)" if cpu else "–"
        lines.append(f"| {r['model']} | {r['units']} | {'yes' if r['traced'] else 'no'} | {energies} | {tri} | "
                     f"{export} | {f'{max(kept):.0e}' if kept else '–'} | {tpr} | {verdict(r)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton-seconds", type=int, default=TRITON_SECONDS,
                        help="limit of the triton backend's energies in Triton's interpreter, per model")
    parser.add_argument("--one", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=[], help="only these model names")
    parser.add_argument("--cache", default=str(CACHE), help="per-model results (a rerun resumes from them)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the cached models only")
    parser.add_argument("--readme", action="store_true", help="print the README's compact table as well")
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds per model")
    parser.add_argument("--triton-mode", choices=("eval", "train"), default=TRITON_MODE,
                        help="scoring mode of the triton check: eval (BatchNorm running statistics) or train "
                             "(batch statistics)")
    parser.add_argument("--recheck-triton", action="store_true",
                        help="rerun only the triton check on the selected cached models whose triton entry is not "
                             "ok, then write the tables from every cached model")
    parser.add_argument("--recheck-kept", action="store_true",
                        help="rerun only the kept-channel training settings that are not ok on the selected cached "
                             "models, each model alone in a fresh process, then write the tables from every cached "
                             "model")
    parser.add_argument("--kept-seconds", type=int, default=BACKEND_SECONDS,
                        help="limit of each kept-channel training setting in --recheck-kept")
    parser.add_argument("--memory-gib", type=float, default=MEMORY_CAP / 2 ** 30,
                        help="address-space cap of each model's process (a run, or --recheck-kept)")
    args = parser.parse_args()
    if args.one:
        source, name = args.one
        spec = next(m for m in MODELS if m[0] == source and m[1] == name)
        if args.recheck_triton:
            recheck_triton(*spec, Path(args.json), args.triton_seconds, args.triton_mode)
            return
        if args.recheck_kept:
            recheck_kept(*spec, Path(args.json), args.kept_seconds, args.memory_gib)
            return
        row = run_one(*spec, triton_seconds=args.triton_seconds, triton_mode=args.triton_mode)
        Path(args.json).write_text(json.dumps(row, indent=1))
        return
    if args.recheck_triton:
        recheck_all(set(args.models), Path(args.cache), args.timeout, args.triton_seconds, args.triton_mode)
    if args.recheck_kept:
        recheck_kept_all(set(args.models), Path(args.cache), args.timeout, args.kept_seconds, args.memory_gib)
    recheck = args.recheck_triton or args.recheck_kept
    rows = run_all(set(args.models) if not recheck else set(), Path(args.cache),
                   run=not (args.report_only or recheck), timeout=args.timeout,
                   triton_seconds=args.triton_seconds, memory_cap=int(args.memory_gib * 2 ** 30))
    import timm
    import torch
    import torchvision

    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "command": "PYTHONPATH=$PWD .venv-zoo/bin/python benchmarks/model_zoo.py"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "model_zoo.md").write_text(markdown(rows, meta))
    print(readme_table(rows) if args.readme else markdown(rows, meta))


if __name__ == "__main__":
    main()
