"""Compile Triton kernels for a GPU target on a machine without a GPU, and read what the compiler made of them.

``compile_only(arch)`` installs a stand-in Triton driver that reports ``GPUTarget("cuda", arch, 32)``. Inside it
the real launch wrappers of ``edropout_kernels`` are called with CPU tensors: Triton specialises and compiles
each launch exactly as it would on that GPU (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ``ptxas`` inside the
triton wheel), and the stand-in launcher records the launch instead of running it (outputs stay uninitialised).
``analyse(launch)`` then reads the artefacts: registers and spills (``ptxas -v``), shared memory, and the main
loop of the SASS (``cuobjdump -sass``): its length, its tensor-core and async-copy instructions, the width of its
global loads and whether it is software-pipelined. Works with triton 3.6 and 3.9.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from edropout_kernels._checks import allow_cpu_launches

#: Device limits the stand-in reports (dynamic shared memory per block, from the CUDA programming guide).
ARCHS = {90: {"name": "sm_90 (H100/H200)", "max_shared_mem": 232448},
         80: {"name": "sm_80 (A100)", "max_shared_mem": 166912}}
MAX_THREADS = 1024


@dataclass
class Launch:
    """One intercepted launch: the kernel's name, the grid, and the compiled metadata (hash, warps, stages...)."""

    kernel: str
    grid: tuple
    metadata: object
    constants: dict = field(default_factory=dict)


class _Recorder:
    """The launches intercepted since the last ``take()``."""

    def __init__(self):
        self.launches: list[Launch] = []

    def take(self) -> list[Launch]:
        out, self.launches = self.launches, []
        return out


class _Utils:
    """Device utilities of the stand-in: properties of the target, no module loading."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": ARCHS[self.arch]["max_shared_mem"], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, MAX_THREADS  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


def _launcher_cls(recorder: _Recorder):
    class _Launcher:
        """Replaces the CUDA launcher: records the grid instead of launching."""

        def __init__(self, src, metadata):
            self.src, self.metadata = src, metadata

        def __call__(self, grid_x, grid_y, grid_z, *args):
            fn = getattr(self.src, "fn", None)
            constants = getattr(self.src, "constexprs", None) or getattr(self.src, "constants", None) or {}
            names = getattr(fn, "arg_names", None)
            named = {}
            for key, value in dict(constants).items():
                index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
                label = names[index] if names is not None and isinstance(index, int) else str(key)
                named[label] = value
            recorder.launches.append(Launch(getattr(fn, "__name__", str(self.src)), (grid_x, grid_y, grid_z),
                                            self.metadata, named))

    return _Launcher


class _StandInDriver:
    """A Triton driver for a GPU that is not there: it names the target, compiles, and records launches."""

    def __init__(self, arch: int, recorder: _Recorder):
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _launcher_cls(recorder)

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # one device id per target, so Triton's per-device caches never mix targets

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_device_interface(self):
        return torch.cuda


def ptxas_path(arch: int) -> str | None:
    """The ``ptxas`` Triton uses for ``arch``, or None when the installed triton has none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - any failure means: no usable ptxas
        return None
    return path if path and os.path.exists(path) else None


def _tool(name: str) -> str | None:
    try:
        path = getattr(triton.knobs.nvidia, name).path
    except Exception:  # noqa: BLE001
        return None
    return path if path and os.path.exists(path) else None


@contextlib.contextmanager
def compile_only(arch: int):
    """Within the block every Triton launch compiles for ``sm_<arch>`` and is recorded, not run; yields the
    recorder. Where triton has no ``ptxas`` for the target, compilation stops at PTX (empty cubin)."""
    recorder = _Recorder()
    previous = driver._active
    driver.set_active(_StandInDriver(arch, recorder))
    patched = None
    if ptxas_path(arch) is None:
        from triton.backends.nvidia.compiler import CUDABackend
        patched = CUDABackend.make_cubin
        CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    try:
        with allow_cpu_launches():
            yield recorder
    finally:
        driver._active = previous
        if patched is not None:
            from triton.backends.nvidia.compiler import CUDABackend
            CUDABackend.make_cubin = patched


# ----- reading the artefacts --------------------------------------------------------------------------------
def artefacts(launch: Launch) -> dict:
    """{extension: text or bytes} of the compiled kernel (ttgir, ptx, cubin), from Triton's cache."""
    from triton.runtime.cache import get_cache_manager

    meta = launch.metadata
    group = get_cache_manager(meta.hash).get_group(f"{meta.name}.json") or {}
    out = {}
    for filename, path in group.items():
        ext = filename.rsplit(".", 1)[-1]
        if ext in ("ttgir", "ptx"):
            with open(path) as f:
                out[ext] = f.read()
        elif ext == "cubin":
            with open(path, "rb") as f:
                out[ext] = f.read()
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_usage(ptx: str, arch: int) -> dict | None:
    """Registers, spill bytes and stack frame from ``ptxas -v`` on the kernel's PTX (same ptxas and target as
    Triton), or None without a ptxas."""
    path = ptxas_path(arch)
    if path is None:
        return None
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip()[-500:]}
    log = run.stderr
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    stack = _PTXAS_STACK.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_MMA = re.compile(r"^(?:@!?U?P\w+\s+)?(HGMMA|HMMA|IMMA|QGMMA|IGMMA)\b")
_ASYNC = re.compile(r"^(?:@!?U?P\w+\s+)?(LDGSTS|UTMALDG|UBLKCP|UTMAPF)\b")
_GLOAD = re.compile(r"^(?:@!?U?P\w+\s+)?(LDG)\b")
_GSTORE = re.compile(r"^(?:@!?U?P\w+\s+)?(STG)\b")
_STS = re.compile(r"^(?:@!?U?P\w+\s+)?(STS)\b")
_FFMA = re.compile(r"^(?:@!?U?P\w+\s+)?(FFMA)\b")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA\s+(?:\w+\s+)?`?\(?(?:0x)?([0-9a-f]+)")
_WIDTH = re.compile(r"\.(128|64|U16|S16|U8|S8)\b")


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction of the cubin."""
    tool = _tool("cuobjdump")
    if tool is None or not cubin:
        return []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_LINE.finditer(text)]


def _width(instr: str) -> int:
    """Bytes per lane of a global load or async copy."""
    m = _WIDTH.search(instr.split(",")[0])
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[m.group(1)] if m else 4


def _opcode(instr: str) -> str:
    """The opcode with its modifiers, without a predicate (e.g. ``HGMMA.64x64x8.F32.TF32``)."""
    words = instr.split()
    return words[1] if words[0].startswith("@") else words[0]


def main_loop(code: list[tuple[int, str]]) -> dict | None:
    """The kernel's main loop: among the loops (backward branches) the one with the most tensor-core
    instructions (else the most global loads), innermost on a tie; what it contains."""
    loops = []
    for addr, instr in code:
        m = _BRANCH.match(instr)
        if m and int(m.group(1), 16) < addr:  # a branch to itself is the trap after EXIT, not a loop
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        return None

    def body(loop):
        lo, hi = loop
        return [i for a, i in code if lo <= a <= hi]

    def score(loop):
        instrs = body(loop)
        mma = sum(bool(_MMA.match(i)) for i in instrs)
        loads = sum(bool(_GLOAD.match(i) or _ASYNC.match(i)) for i in instrs)
        return (mma, loads if mma == 0 else 0, -(loop[1] - loop[0]))

    lo, hi = max(loops, key=score)
    instrs = body((lo, hi))
    mma = [i for i in instrs if _MMA.match(i)]
    asyncs = [i for i in instrs if _ASYNC.match(i)]
    loads = [i for i in instrs if _GLOAD.match(i)]
    return {"instructions": len(instrs), "mma": len(mma),
            "mma_kind": sorted({_opcode(i) for i in mma}),
            "async_copies": len(asyncs), "async_kinds": sorted({_ASYNC.match(i).group(1) for i in asyncs}),
            "global_loads": len(loads), "shared_stores": sum(bool(_STS.match(i)) for i in instrs),
            "global_stores": sum(bool(_GSTORE.match(i)) for i in instrs),
            "ffma": sum(bool(_FFMA.match(i)) for i in instrs),
            "load_bytes_per_lane": sorted({_width(i) for i in loads + asyncs})}


def pipelined(loop: dict | None, exact_fp32_dot: bool = False) -> str:
    """"yes": tensor-core loop fed only by async copies (cp.async / TMA), whose waits let later stages stay in
    flight; "partial": async copies and synchronous loads through registers into shared memory; "no": tensor
    cores fed by synchronous loads; "fma": an exact-fp32 dot (no tensor cores); "n/a": no tensor cores."""
    if loop is None:
        return "n/a"
    if loop["mma"] == 0:
        return "fma" if exact_fp32_dot else "n/a"
    if loop["async_copies"] and loop["shared_stores"] == 0:
        return "yes"
    return "partial" if loop["async_copies"] else "no"


_LOAD_LAYOUT = re.compile(r"(?:tt\.load|async_copy_global_to_local)\b.*?tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, #(\w+)>")
_BLOCKED = re.compile(r"#(\w+) = #ttg\.blocked<\{sizePerThread = \[(\d+), (\d+)\], threadsPerWarp = \[(\d+), (\d+)\], "
                      r"warpsPerCTA = \[(\d+), (\d+)\], order = \[(\d), (\d)\]")


def load_layouts(ttgir: str) -> list[str]:
    """The 2-D global loads of the kernel as "RxC dtype: v elements/lane along dim d, l lanes along it"."""
    blocked = {m.group(1): m.groups()[1:] for m in _BLOCKED.finditer(ttgir)}
    out = []
    for m in _LOAD_LAYOUT.finditer(ttgir):
        rows, cols, dtype, name = m.groups()
        if name not in blocked:
            continue
        spt0, spt1, tpw0, tpw1, _, _, o0, _ = (int(v) for v in blocked[name])
        fast = o0
        per_lane = (spt0, spt1)[fast]
        lanes = (tpw0, tpw1)[fast]
        out.append(f"{rows}x{cols} {dtype}: {per_lane}/lane x {lanes} lanes along dim {fast}")
    return sorted(set(out))


def analyse(launch: Launch, arch: int, exact_fp32_dot: bool = False) -> dict:
    """Everything the report records about one compiled launch."""
    files = artefacts(launch)
    meta = launch.metadata
    row = {"kernel": launch.kernel, "grid": list(launch.grid), "num_warps": meta.num_warps,
           "num_stages": getattr(meta, "num_stages", None), "shared_bytes": meta.shared,
           "constants": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                         for k, v in launch.constants.items()},
           "stopped_at": "cubin" if files.get("cubin") else "ptx"}
    usage = ptxas_usage(files["ptx"], arch) if "ptx" in files else None
    row.update(usage or {"registers": None, "spill_store_bytes": None, "spill_load_bytes": None})
    loop = main_loop(sass(files.get("cubin", b"")))
    row["main_loop"] = loop
    row["pipelined"] = pipelined(loop, exact_fp32_dot) if files.get("cubin") else "unknown (no cubin)"
    row["load_layouts"] = load_layouts(files.get("ttgir", ""))
    return row
