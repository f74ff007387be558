"""Compile every Triton kernel variant the engine launches for sm_90 (H100/H200) and sm_80 (A100) on this CPU
machine, and report registers, spills, shared memory and the main loop of each (``compile_probe``).

Variants are launched by the real wrappers of ``edropout_kernels`` with the arguments the triton backend, the
evolution, the masked optimizer and the regularizers pass, on the layer shapes of ``gpu_energies.py``'s
benchmark models (ResNet-18-style width 64 on 32x32 and the 256-wide MLP, batch 128, S = 8), in each precision
(exact fp32, tf32, bf16, fp16) and layout (NCHW, channels-last), plus odd sizes. Launches that compile to the same
kernel (same specialisation) are reported once.

    python benchmarks/gpu_compile_report.py                 # both targets, all variants -> results/
    python benchmarks/gpu_compile_report.py --arch 90 --only conv --out-dir /tmp/r
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_probe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MEMBERS, BATCH = 8, 128
#: The kernels whose floors the report checks: 0 spills, <= 168 registers, pipelined GEMM loops in tf32/bf16.
HOT = ("_population_gemm_kernel", "_population_linear_kernel", "_population_conv2d_kernel", "_gather_kept_kernel",
       "_population_batchnorm_kernel", "_population_energies_kernel", "_masked_step_kernel")
MAX_REGISTERS = 168
GEMMS = ("_population_gemm_kernel", "_population_linear_kernel", "_population_conv2d_kernel")


@dataclass
class Variant:
    """One call of a real launch wrapper; ``precision`` names the dot precision it asks for (for the floors)."""

    name: str
    group: str
    precision: str
    call: Callable[[], None]


# ----- shapes of the benchmark models --------------------------------------------------------------------------
def _benchmark_layers(spec):
    """(module, input shape of one sample) of every Conv2d/Linear of a benchmark model, in forward order."""
    from edropout.app.models import build_model

    torch.manual_seed(0)
    model = build_model(spec["name"], spec["in_channels"], spec["input_size"], 10, spec["width"])
    found = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append((m, tuple(i[0].shape[1:]))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, spec["in_channels"], spec["input_size"], spec["input_size"]))
    for h in hooks:
        h.remove()
    return model, found


def _keep(members, channels, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(members, channels, generator=g) < 0.5
    keep[:, 0] = True
    return keep


def _distinct_convs(layers):
    """One layer per distinct (C, O, kernel, stride, padding, H, W): the benchmark net repeats its blocks."""
    seen, out = set(), []
    for module, shape in layers:
        if isinstance(module, nn.Conv2d):
            key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding, shape)
            if key not in seen:
                seen.add(key)
                out.append((module, shape))
    return out


def _conv_call(module, shape, dtype, tf32, channels_last, fold, members=MEMBERS, batch=BATCH):
    """population_conv2d exactly as the triton backend calls it (GPU tile defaults)."""
    import edropout_kernels as ek

    def call():
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty((members * batch, *shape), dtype=dtype).contiguous(memory_format=fmt)
        o = module.out_channels
        scale = torch.ones(o) if fold else None
        shift = torch.zeros(o) if fold else None
        ek.population_conv2d(x, module.weight.detach(), module.bias, _keep(members, module.in_channels, 1),
                             _keep(members, o, 2), members=members, stride=module.stride,
                             padding=tuple(module.padding), scale=scale, shift=shift, allow_tf32=tf32)
    return call


def _linear_call(n_in, n_out, rows, dtype, tf32, bias=True, fold=False, members=MEMBERS):
    import edropout_kernels as ek

    def call():
        x = torch.empty(members * rows, n_in, dtype=dtype)
        w = torch.empty(n_out, n_in)
        ek.population_linear(x, w, torch.zeros(n_out) if bias else None, _keep(members, n_in, 1),
                             _keep(members, n_out, 2), members=members,
                             scale=torch.ones(n_out) if fold else None, shift=torch.zeros(n_out) if fold else None,
                             allow_tf32=tf32)
    return call


def _batchnorm_call(shape, dtype, channels_last=False, relu=False, members=MEMBERS, batch=BATCH):
    import edropout_kernels as ek

    def call():
        y = torch.empty((members * batch, *shape), dtype=dtype)
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        c = shape[0]
        ek.population_batchnorm(y, members, torch.ones(c), torch.zeros(c), 1e-5, out_keep=_keep(members, c, 3),
                                relu=relu)
    return call


def _energies_call(dtype, classes=10, members=MEMBERS, batch=BATCH):
    import edropout_kernels as ek

    def call():
        ek.population_energies(torch.empty(members * batch, classes, dtype=dtype), torch.zeros(batch, dtype=torch.long),
                               members)
    return call


def _optimizer_call(make_optimizer):
    """fused_masked_step on the ResNet-18 benchmark model's parameters with the best-state masks of a random state."""

    def call():
        from edropout.state_view import StateView
        from edropout.units import discover_units
        from edropout_kernels import fused_masked_step

        model, _ = _benchmark_layers(GPU_MODELS["resnet18"])
        units = discover_units(model, torch.zeros(2, 3, 32, 32))
        state = torch.rand(units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
        masks = StateView(model, units, state).row_col_keeps
        optimizer = make_optimizer(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        loss = torch.ones(())  # EDropout.step passes the loss: the kernel skips itself when it is not finite
        for _ in range(2):  # the first step creates the state (a different flag for SGD's fresh momentum buffer)
            if not fused_masked_step(optimizer, masks, only_if_finite=loss):
                raise RuntimeError("fused_masked_step declined this optimizer")
    return call


def _evolution_calls():
    from edropout_kernels.evolution import draw_evolution_randoms, make_children, select_and_best

    def children(size, genes):
        def call():
            pop = torch.zeros(size, genes, dtype=torch.bool)
            make_children(pop, 0.9, 0.9, seed=1, step=3)
        return call

    def draws():
        draw_evolution_randoms(8, 963, seed=1, step=3, device="cpu")

    def select(size, genes):
        def call():
            pop = torch.zeros(size, genes, dtype=torch.bool)
            select_and_best(pop, torch.zeros(size), pop.clone(), torch.zeros(size))
        return call

    return [Variant("make_children S=8 D=963", "evolution", "-", children(8, 963)),
            Variant("make_children S=32 D=963", "evolution", "-", children(32, 963)),
            Variant("draw_evolution_randoms", "evolution", "-", draws),
            Variant("select_and_best S=8", "evolution", "-", select(8, 963)),
            Variant("select_and_best S=32", "evolution", "-", select(32, 963))]


def _regularizer_calls():
    from edropout_kernels.bridgeout import bridgeout_weight_triton
    from edropout_kernels.sparseout import sparseout_mask, sparseout_triton

    def sparseout(q, dtype):
        def call():
            x = torch.empty(BATCH, 256, dtype=dtype, requires_grad=True)
            sparseout_triton(x, 0.3, q, 7).backward(torch.empty(BATCH, 256, dtype=dtype))
        return call

    def bridgeout(target, copies):
        def call():
            w = torch.empty(256, 784, requires_grad=True)
            t = torch.zeros(256, 784, dtype=torch.bool) if target else None
            out = bridgeout_weight_triton(w, 0.3, 1.5, 7, target=t, copies=copies)
            out.backward(torch.empty_like(out))
        return call

    return [Variant("sparseout q=1.5 fp32 fwd+bwd", "regularizers", "-", sparseout(1.5, torch.float32)),
            Variant("sparseout q=2 (dropout) fwd+bwd", "regularizers", "-", sparseout(2.0, torch.float32)),
            Variant("sparseout q=1.5 bf16 fwd+bwd", "regularizers", "-", sparseout(1.5, torch.bfloat16)),
            Variant("sparseout_mask", "regularizers", "-", lambda: sparseout_mask((BATCH, 256), 0.3, 7)),
            Variant("batch bridgeout (target mask) fwd+bwd", "regularizers", "-", bridgeout(True, None)),
            Variant("bridgeout per example (copies=4) fwd+bwd", "regularizers", "-", bridgeout(False, 4))]


#: The CPU test's selection: every hot kernel, tf32 and bf16 GEMMs in both layouts, a 4x4-output layer (rows that
#: straddle images), the official optimizer and the evolution kernels.
CI_SUBSET = ("conv 64->64 3x3 s1 32x32 tf32 NCHW", "conv 64->64 3x3 s1 32x32 bf16 channels-last",
             "conv 512->512 3x3 s1 4x4 bf16 NCHW", "linear 784->256 (MLP) bf16", "linear 784->256 (MLP) fp32",
             "batchnorm 64x32x32 fp32 NCHW", "batchnorm 256 (BatchNorm1d) fp32, ReLU", "energies K=10 fp32",
             "masked step Adadelta (official setup)", "make_children S=8 D=963", "select_and_best S=8")

GPU_MODELS = {"resnet18": dict(name="resnet18", in_channels=3, input_size=32, width=64),
              "mlp": dict(name="mlp", in_channels=1, input_size=28, width=256)}


def variants() -> list[Variant]:
    """Every variant of the report, in report order."""
    out = []
    _, layers = _benchmark_layers(GPU_MODELS["resnet18"])
    convs = _distinct_convs(layers)
    precisions = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False),
                  ("fp16", torch.float16, False))
    for label, dtype, tf32 in precisions:
        for channels_last in (False, True):
            if channels_last and label in ("fp32", "fp16"):
                continue
            layout = "channels-last" if channels_last else "NCHW"
            for module, shape in convs:
                k = module.kernel_size[0]
                name = (f"conv {module.in_channels}->{module.out_channels} {k}x{k} s{module.stride[0]} "
                        f"{shape[1]}x{shape[2]} {label} {layout}")
                out.append(Variant(name, "conv", label, _conv_call(module, shape, dtype, tf32, channels_last, False)))
    module, shape = convs[1]
    out.append(Variant(f"conv 64->64 3x3 tf32 NCHW, eval-mode BatchNorm folded", "conv", "tf32",
                       _conv_call(module, shape, torch.float32, True, False, True)))
    odd = nn.Conv2d(5, 7, 5, stride=2, padding=2)
    out.append(Variant("conv odd 5->7 5x5 s2 p2 9x9 B=3 S=4 tf32", "conv", "tf32",
                       _conv_call(odd, (5, 9, 9), torch.float32, True, False, False, members=4, batch=3)))
    out.append(Variant("conv odd 5->7 5x5 s2 p2 9x9 B=3 S=4 bf16 channels-last", "conv", "bf16",
                       _conv_call(odd, (5, 9, 9), torch.bfloat16, False, True, False, members=4, batch=3)))
    for label, dtype, tf32 in precisions:
        out.append(Variant(f"linear 512->10 (ResNet-18 classifier) {label}", "linear", label,
                           _linear_call(512, 10, BATCH, dtype, tf32)))
        out.append(Variant(f"linear 784->256 (MLP) {label}", "linear", label, _linear_call(784, 256, BATCH, dtype, tf32)))
        out.append(Variant(f"linear 256->256 (MLP) {label}", "linear", label, _linear_call(256, 256, BATCH, dtype, tf32)))
    out.append(Variant("linear 256->256 tf32, eval-mode BatchNorm folded", "linear", "tf32",
                       _linear_call(256, 256, BATCH, torch.float32, True, fold=True)))
    out.append(Variant("linear odd 37->23 B=5 S=4 tf32", "linear", "tf32",
                       _linear_call(37, 23, 5, torch.float32, True, members=4)))
    out.append(Variant("linear odd 37->23 B=5 S=4 bf16", "linear", "bf16",
                       _linear_call(37, 23, 5, torch.bfloat16, False, members=4)))
    for c, hw in ((64, 32), (128, 16), (512, 4)):
        out.append(Variant(f"batchnorm {c}x{hw}x{hw} fp32 NCHW", "batchnorm", "-",
                           _batchnorm_call((c, hw, hw), torch.float32)))
    out.append(Variant("batchnorm 64x32x32 bf16 NCHW", "batchnorm", "-", _batchnorm_call((64, 32, 32), torch.bfloat16)))
    out.append(Variant("batchnorm 64x32x32 fp32 channels-last", "batchnorm", "-",
                       _batchnorm_call((64, 32, 32), torch.float32, channels_last=True)))
    out.append(Variant("batchnorm 256 (BatchNorm1d) fp32, ReLU", "batchnorm", "-",
                       _batchnorm_call((256,), torch.float32, relu=True)))
    out.append(Variant("batchnorm odd 7x9x9 B=3 S=4 fp32", "batchnorm", "-",
                       _batchnorm_call((7, 9, 9), torch.float32, members=4, batch=3)))
    out.append(Variant("energies K=10 fp32", "energies", "-", _energies_call(torch.float32)))
    out.append(Variant("energies K=10 bf16", "energies", "-", _energies_call(torch.bfloat16)))
    out.append(Variant("energies K=1000 fp32", "energies", "-", _energies_call(torch.float32, classes=1000)))
    out.append(Variant("masked step SGD momentum 0.9, weight decay", "optimizer", "-",
                       _optimizer_call(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4))))
    out.append(Variant("masked step SGD nesterov", "optimizer", "-",
                       _optimizer_call(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))))
    out.append(Variant("masked step Adam", "optimizer", "-", _optimizer_call(lambda p: torch.optim.Adam(p))))
    out.append(Variant("masked step AdamW amsgrad", "optimizer", "-",
                       _optimizer_call(lambda p: torch.optim.AdamW(p, amsgrad=True))))
    out.append(Variant("masked step Adadelta (official setup)", "optimizer", "-",
                       _optimizer_call(lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6,
                                                                      weight_decay=1e-5))))
    return out + _evolution_calls() + _regularizer_calls()


# ----- running ---------------------------------------------------------------------------------------------------
def compile_variants(selected: list[Variant], arch: int, log=print) -> list[dict]:
    """Rows for every distinct compiled kernel launched by ``selected`` on ``sm_<arch>``; a variant that fails to
    compile gives a row with its error."""
    rows, seen = [], {}
    with compile_probe.compile_only(arch) as recorder:
        for variant in selected:
            start = time.perf_counter()
            try:
                variant.call()
                error = None
            except Exception as exc:  # noqa: BLE001 - a compile failure is a result of the report
                error = f"{type(exc).__name__}: {str(exc).strip()[-400:]}"
                if os.environ.get("EDROPOUT_COMPILE_TRACE"):
                    traceback.print_exc()
            launches = recorder.take()
            seconds = time.perf_counter() - start
            if error is not None:
                rows.append({"arch": arch, "variant": variant.name, "group": variant.group,
                             "precision": variant.precision, "error": error})
                log(f"sm_{arch} FAIL {variant.name}: {error}")
                continue
            for launch in launches:
                key = launch.metadata.hash
                if key in seen:
                    seen[key]["also_launched_by"].append(variant.name)
                    continue
                row = {"arch": arch, "variant": variant.name, "group": variant.group,
                       "precision": variant.precision, "also_launched_by": [], "error": None,
                       **compile_probe.analyse(launch, arch, variant.precision == "fp32" and launch.kernel in GEMMS)}
                seen[key] = row
                rows.append(row)
            log(f"sm_{arch} ok {variant.name}: {len(launches)} launch(es), {seconds:.1f} s")
    return rows


def floor_failures(row: dict) -> list[str]:
    """The floors of issue 15 that a compiled kernel misses (hot kernels only; sm_90)."""
    if row.get("error"):
        return ["does not compile"]
    if row["kernel"] not in HOT:
        return []
    out = []
    if row.get("spill_store_bytes") or row.get("spill_load_bytes"):
        out.append("spills")
    if row.get("registers") and row["registers"] > MAX_REGISTERS:
        out.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    loop = row.get("main_loop") or {}
    if row["precision"] in ("tf32", "bf16") and loop.get("mma", 0) and row["pipelined"] != "yes":
        out.append(f"main loop not pipelined ({row['pipelined']})")
    return out


def _fmt_loop(row):
    loop = row.get("main_loop")
    if not loop:
        return "-", "-", "-", "-"
    mma = f"{loop['mma']}× {'/'.join(loop['mma_kind'])}" if loop["mma"] else (f"{loop['ffma']} FFMA" if loop["ffma"] else "-")
    copies = (f"{loop['async_copies']} {'/'.join(loop['async_kinds'])}" if loop["async_copies"] else "0")
    sync = f"{loop['global_loads']} LDG, {loop['shared_stores']} STS"
    widths = "/".join(str(w) for w in loop["load_bytes_per_lane"]) or "-"
    return str(loop["instructions"]), mma, f"{copies}; {sync}", widths


def markdown(report: dict) -> str:
    info = report["info"]
    lines = [f"# GPU compile report ({', '.join(compile_probe.ARCHS[a]['name'] for a in report['archs'])})", "",
             f"Compiled on a CPU machine (no GPU) with a stand-in Triton driver: triton {info['triton']}, torch "
             f"{info['torch']}, {info['date_utc']}. Command: `{info['command']}`. ptxas: "
             + "; ".join(f"sm_{a}: {'`' + os.path.basename(p) + '` ' + v if p else 'missing (stopped at PTX)'}"
                         for a, (p, v) in info["ptxas"].items()) + ".", "",
             "Registers and spills from `ptxas -v`; shared memory from Triton's metadata; the main loop is the SASS "
             "loop with the most tensor-core instructions (else the most global loads). Loop ops: async copies "
             "(LDGSTS = cp.async, UTMALDG = TMA) and synchronous global loads (LDG) and shared stores (STS) in the "
             "loop. Pipelined: yes = tensor cores fed only by async copies; fma = exact fp32 (no tensor cores); "
             "n/a = no tensor cores. B/lane: bytes per lane of the loop's global loads (16 = vectorised).", ""]
    for arch in report["archs"]:
        rows = [r for r in report["rows"] if r["arch"] == arch]
        failures = [r for r in rows if r.get("error")]
        lines += [f"## {compile_probe.ARCHS[arch]['name']}: {len(rows) - len(failures)} kernels compiled, "
                  f"{len(failures)} failures", "",
                  "| variant | kernel | warps/stages | regs | spills (B) | smem (B) | loop instrs | MMA in loop | "
                  "loop ops | B/lane | pipelined | floors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | - | - | **{r['error']}** |")
                continue
            n, mma, ops, widths = _fmt_loop(r)
            spills = f"{r.get('spill_store_bytes')}/{r.get('spill_load_bytes')}"
            floors = "; ".join(floor_failures(r)) or ("ok" if r["kernel"] in HOT else "-")
            lines.append(f"| {r['variant']} | {r['kernel'].strip('_')} | {r['num_warps']}/{r['num_stages']} | "
                         f"{r.get('registers')} | {spills} | {r['shared_bytes']} | {n} | {mma} | {ops} | {widths} | "
                         f"{r['pipelined']} | {floors} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def info_block() -> dict:
    import triton

    ptxas = {}
    for arch in compile_probe.ARCHS:
        path = compile_probe.ptxas_path(arch)
        version = ""
        if path:
            import subprocess
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            version = out.strip().splitlines()[-1] if out.strip() else ""
        ptxas[arch] = (path, version)
    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "ptxas": ptxas}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(compile_probe.ARCHS), choices=list(compile_probe.ARCHS))
    parser.add_argument("--only", nargs="+", help="groups to compile (conv, linear, batchnorm, energies, optimizer, "
                                                  "evolution, regularizers)")
    parser.add_argument("--subset", choices=["ci"], help="ci: one representative variant per kernel and precision "
                                                         "(the CPU test's selection)")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--stem", default="gpu_compile_report")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the report compiles for a GPU target instead of interpreting")
    selected = [v for v in variants() if (not args.only or v.group in args.only)
                and (args.subset is None or v.name in CI_SUBSET)]
    rows = []
    for arch in args.arch:
        rows += compile_variants(selected, arch)
    report = {"info": info_block(), "archs": args.arch, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.stem)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    failures = sum(bool(r.get("error")) for r in rows)
    print(f"wrote {stem}.json and {stem}.md: {len(rows) - failures} kernels, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
