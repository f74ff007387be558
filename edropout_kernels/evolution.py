"""Binary differential evolution of the pruning population (METHOD.md section 3) in single launches.

``make_children`` draws every random number inside the kernel with counter-based Philox keyed by
``seed`` and counters built from ``(step, member, gene)``, so the children are a pure function of
``(population, F, C, seed, step)``: reproducible, resumable, and independent of block size or grid.
``draw_evolution_randoms`` runs the same kernel in a draws-only mode and returns exactly the numbers it
used, so a plain PyTorch operator can reproduce the children bit for bit.
``select_and_best`` does greedy selection and the argmin in one more launch, without a host sync.

Random streams (Philox-4x32-10, key = ``seed``, counters ``(c0, c1, c2, c3)``):

* genes: ``(d, i, step mod 2**31, 2 * (step >> 31))`` -> ``u`` from output 0, ``r`` from output 1;
* parents: ``(0, i, step mod 2**31, 2 * (step >> 31) + 1)`` -> outputs 0, 1, 2 pick ``a``, ``b``, ``c``.

Uniforms are ``(x >> 8) * 2**-24`` (exact float32 in ``[0, 1)``). Parents: ``a`` is drawn from the
``S - 1`` members other than ``i``, ``b`` from the ``S - 2`` left, ``c`` from the ``S - 3`` left (each as
``x mod n`` and then skipping the excluded indices in increasing order), which gives every ordered
triple of distinct members ``!= i`` the same probability up to the modulo bias, at most ``S / 2**32``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["make_children", "draw_evolution_randoms", "select_and_best", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 1024  # genes per program
_MAX_STEP = 2**61
_MAX_SEED = 2**63


@triton.jit
def _uniform(x):
    """uint32 -> float32 in [0, 1): the top 24 bits, scaled exactly."""
    return (x >> 8).to(tl.int32).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _skip(v, e):
    """Insertion step for drawing without replacement: move past an excluded index ``e``."""
    return v + (v >= e).to(tl.int32)


@triton.jit
def _evolve_kernel(
    pop_ptr, child_ptr, abc_ptr, u_ptr, r_ptr,
    S, D, F, C, seed, step_lo, step_hi2,
    WRITE_CHILD: tl.constexpr, WRITE_DRAWS: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    zero = tl.zeros([BLOCK], dtype=tl.int32)

    # parents a, b, c: one scalar Philox call per member (every block recomputes the same numbers)
    pa, pb, pc, _ = tl.philox(seed, 0, i, step_lo, step_hi2 + 1)
    n1 = (S - 1).to(tl.uint32)
    a = _skip((pa % n1).to(tl.int32), i)
    lo = tl.minimum(a, i)
    hi = tl.maximum(a, i)
    b = _skip(_skip((pb % (n1 - 1)).to(tl.int32), lo), hi)
    e1 = tl.minimum(lo, b)
    e3 = tl.maximum(hi, b)
    e2 = (lo + hi + b) - e1 - e3
    c = _skip(_skip(_skip((pc % (n1 - 2)).to(tl.int32), e1), e2), e3)

    # per-gene uniforms
    x0, x1, _, _ = tl.philox(seed, offs, zero + i, zero + step_lo, zero + step_hi2)
    u = _uniform(x0)
    r = _uniform(x1)

    if WRITE_DRAWS:
        row = i.to(tl.int64) * D
        tl.store(u_ptr + row + offs, u, mask=inb)
        tl.store(r_ptr + row + offs, r, mask=inb)
        abc = tl.where(offs == 0, a, tl.where(offs == 1, b, c))
        tl.store(abc_ptr + i * 3 + offs, abc.to(tl.int64), mask=offs < 3)  # block 0 only
    if WRITE_CHILD:
        s_i = tl.load(pop_ptr + i.to(tl.int64) * D + offs, mask=inb, other=0)
        s_a = tl.load(pop_ptr + a.to(tl.int64) * D + offs, mask=inb, other=0)
        s_b = tl.load(pop_ptr + b.to(tl.int64) * D + offs, mask=inb, other=0)
        s_c = tl.load(pop_ptr + c.to(tl.int64) * D + offs, mask=inb, other=0)
        flip = ((s_b == s_c) & (s_a == 0)).to(tl.uint8)
        v = tl.where(u <= F, s_a, flip)
        child = tl.where(r < C, v, s_i)
        tl.store(child_ptr + i.to(tl.int64) * D + offs, child, mask=inb)


@triton.jit
def _select_kernel(
    pop_ptr, energy_ptr, child_ptr, child_energy_ptr, out_energy_ptr, best_ptr,
    S, D, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    # this member's decision (vector form: identical lanes), NaN counts as +inf
    e = tl.load(energy_ptr + i + zero)
    ce = tl.load(child_energy_ptr + i + zero)
    e = tl.where(e != e, float("inf"), e)
    ce = tl.where(ce != ce, float("inf"), ce)
    take = (ce < e) & (offs < D)
    row = i.to(tl.int64) * D
    child = tl.load(child_ptr + row + offs, mask=take, other=0)
    tl.store(pop_ptr + row + offs, child, mask=take)

    # one program writes the new energies and the argmin (ties: lowest index)
    idx = tl.arange(0, BLOCK_S)
    valid = idx < S
    es = tl.load(energy_ptr + idx, mask=valid, other=0.0)
    ces = tl.load(child_energy_ptr + idx, mask=valid, other=0.0)
    es = tl.where(es != es, float("inf"), es)
    ces = tl.where(ces != ces, float("inf"), ces)
    new = tl.where(ces < es, ces, es)
    new = tl.where(valid, new, float("inf"))
    m = tl.min(new, axis=0)
    best = tl.min(tl.where((new == m) & valid, idx, BLOCK_S), axis=0)
    # masks built as vectors: the interpreter mishandles scalar & vector masks
    tl.store(out_energy_ptr + idx, new, mask=valid & ((idx * 0 + i + j) == 0))
    tl.store(best_ptr + zero, best.to(tl.int64) + zero, mask=(tl.arange(0, BLOCK) + i + j) == 0)


def _check_block(block_size: int) -> None:
    if block_size < 4 or block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two >= 4")


def _check_common(S: int, D: int, seed: int, step: int) -> None:
    if S < 4:
        raise ValueError(f"differential evolution needs a population of at least 4, got {S}")
    if D < 1 or D >= 2**31 - 2**20:
        raise ValueError(f"bad state length {D}")
    if not (0 <= int(seed) < _MAX_SEED):
        raise ValueError("seed must be in [0, 2**63)")
    if not (0 <= int(step) < _MAX_STEP):
        raise ValueError("step must be in [0, 2**61)")


def _step_counters(step: int):
    step = int(step)
    return step & 0x7FFFFFFF, 2 * (step >> 31)


def make_children(population: torch.Tensor, F: float = 0.9, C: float = 0.9, seed: int = 0, step: int = 0,
                  *, out: torch.Tensor | None = None, block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Children of a bool population ``[S, D]`` by binary DE in one launch.

    For member ``i`` with distinct random parents ``a, b, c != i`` and per-gene uniforms ``u, r``:
    ``v = s_a if u <= F else (1 - s_a if s_b == s_c else 0)``; ``child = v if r < C else s_i``.
    ``F`` and ``C`` are compared in float32. Returns a new bool tensor (or fills ``out``).
    """
    if population.dtype != torch.bool or population.dim() != 2:
        raise ValueError("population must be a bool tensor [S, D]")
    S, D = population.shape
    _check_common(S, D, seed, step)
    _check_block(block_size)
    if not (0.0 <= F <= 1.0 and 0.0 <= C <= 1.0):
        raise ValueError("F and C must lie in [0, 1]")
    pop = population.contiguous()
    if out is None:
        out = torch.empty_like(pop)
    elif out.shape != pop.shape or out.dtype != torch.bool or not out.is_contiguous() or out.device != pop.device:
        raise ValueError("out must be a contiguous bool tensor shaped like the population")
    if out.data_ptr() == pop.data_ptr():
        raise ValueError("out must not alias the population (members read each other's rows)")
    lo, hi2 = _step_counters(step)
    pop_u8, out_u8 = pop.view(torch.uint8), out.view(torch.uint8)
    grid = (S, triton.cdiv(D, block_size))
    _evolve_kernel[grid](pop_u8, out_u8, pop_u8, pop_u8, pop_u8, S, D, float(F), float(C), int(seed), lo, hi2,
                         WRITE_CHILD=True, WRITE_DRAWS=False, BLOCK=block_size)
    return out


def draw_evolution_randoms(S: int, D: int, seed: int = 0, step: int = 0, *, device=None,
                           block_size: int = DEFAULT_BLOCK):
    """The exact draws ``make_children`` uses for ``(S, D, seed, step)``, from the same kernel.

    Returns ``abc`` int64 ``[S, 3]``, ``u`` float32 ``[S, D]`` (mutation) and ``r`` float32 ``[S, D]``
    (crossover). Meant for tests and for reference implementations.
    """
    _check_common(S, D, seed, step)
    _check_block(block_size)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    abc = torch.full((S, 3), -1, dtype=torch.int64, device=device)
    u = torch.full((S, D), float("nan"), dtype=torch.float32, device=device)
    r = torch.full((S, D), float("nan"), dtype=torch.float32, device=device)
    dummy = torch.empty(1, dtype=torch.uint8, device=device)
    lo, hi2 = _step_counters(step)
    grid = (S, triton.cdiv(D, block_size))
    _evolve_kernel[grid](dummy, dummy, abc, u, r, S, D, 0.0, 0.0, int(seed), lo, hi2,
                         WRITE_CHILD=False, WRITE_DRAWS=True, BLOCK=block_size)
    return abc, u, r


def select_and_best(population: torch.Tensor, energies: torch.Tensor, children: torch.Tensor,
                    child_energies: torch.Tensor, *, block_size: int = DEFAULT_BLOCK):
    """Greedy DE selection and argmin in one launch.

    Member ``i`` takes its child iff ``child_energies[i] < energies[i]`` (strict: ties keep the parent;
    NaN counts as +inf, so a NaN child is never taken). ``population`` is updated IN PLACE; the new
    energies are a NEW tensor (NaN stored as +inf; ``energies`` itself is left untouched because every
    program of the launch reads it). Returns ``(population, new_energies, best_index)`` with
    ``best_index`` a 0-d int64 device tensor (lowest index among ties): no host synchronisation.
    """
    if population.dtype != torch.bool or population.dim() != 2 or not population.is_contiguous():
        raise ValueError("population must be a contiguous bool tensor [S, D]")
    S, D = population.shape
    _check_block(block_size)
    if children.shape != population.shape or children.dtype != torch.bool:
        raise ValueError("children must be a bool tensor shaped like the population")
    if energies.shape != (S,) or child_energies.shape != (S,):
        raise ValueError("energies and child_energies must have shape [S]")
    if not energies.is_floating_point() or child_energies.dtype != energies.dtype:
        raise ValueError("energies must be floating point and of one dtype")
    children = children.contiguous()
    energies, child_energies = energies.contiguous(), child_energies.contiguous()
    new_energies = torch.empty_like(energies)
    best = torch.empty((), dtype=torch.int64, device=population.device)
    grid = (S, triton.cdiv(D, block_size))
    _select_kernel[grid](population.view(torch.uint8), energies, children.view(torch.uint8), child_energies,
                         new_energies, best, S, D, BLOCK=block_size, BLOCK_S=triton.next_power_of_2(S))
    return population, new_energies, best
