"""Margin and cross-entropy energies of every population member in one kernel launch.

Logits are ``[S*B, K]`` (member-major) and the B targets are shared by all members. One program
per member streams its rows in [rows x classes] tiles with an online max / sum-exp, so softmax is
never materialised, and reduces to the member's mean in registers: no atomics, no zero-init launch,
deterministic. A non-finite member result is reported as +float("inf") so that such a state is never selected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_device, check_float, pow2_between, split_rows

__all__ = ["population_energies"]


@triton.jit
def _population_energies_kernel(
    z_ptr, t_ptr, margin_ptr, ce_ptr,
    B, K, stride_zm, stride_zk,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s = tl.program_id(0)
    margin_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    ce_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        r = r0 + tl.arange(0, BLOCK_B)
        r_ok = r < B
        y = tl.load(t_ptr + r, mask=r_ok, other=0)
        y_ok = (y >= 0) & (y < K)
        row = (s.to(tl.int64) * B + r) * stride_zm
        # An out-of-range target gives NaN, hence a +inf member energy below.
        z_y = tl.load(z_ptr + row + y * stride_zk, mask=r_ok & y_ok, other=float("nan")).to(tl.float32)
        run_max = tl.full((BLOCK_B,), -float("inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        other_max = tl.full((BLOCK_B,), -float("inf"), tl.float32)
        nan_seen = tl.zeros((BLOCK_B,), dtype=tl.int32)  # max() may skip NaN: track it explicitly
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            m = r_ok[:, None] & k_ok[None, :]
            z = tl.load(z_ptr + row[:, None] + k[None, :] * stride_zk, mask=m, other=-float("inf")).to(tl.float32)
            nan_seen = tl.maximum(nan_seen, tl.max((z != z).to(tl.int32), axis=1))
            other_max = tl.maximum(other_max, tl.max(tl.where(k[None, :] == y[:, None], -float("inf"), z), axis=1))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            # Subtract 0 instead of -inf while a row has seen only -inf, to avoid inf - inf = NaN.
            ref = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
            run_max = new_max
        ref = tl.where(run_max == -float("inf"), 0.0, run_max)
        ce = ref + tl.log(tl.where(r_ok, run_sum, 1.0)) - z_y  # padding rows: no log(0)
        margin = tl.where(nan_seen > 0, float("nan"), other_max - z_y)
        margin_sum += tl.where(r_ok, margin, 0.0)
        ce_sum += tl.where(r_ok, ce, 0.0)
    margin_mean = tl.sum(margin_sum, axis=0) / B
    ce_mean = tl.sum(ce_sum, axis=0) / B
    # abs(v) < inf is False for NaN and +-inf alike.
    tl.store(margin_ptr + s, tl.where(tl.abs(margin_mean) < float("inf"), margin_mean, float("inf")))
    tl.store(ce_ptr + s, tl.where(tl.abs(ce_mean) < float("inf"), ce_mean, float("inf")))


def population_energies(logits, targets, members):
    """Return ``(margin [S], cross_entropy [S])`` float32, each the mean over a member's B samples.

    margin per sample = ``max_{j != y} z_j - z_y`` (the EDropout default energy);
    cross-entropy per sample = ``logsumexp(z) - z_y``. ``logits``: ``[S*B, K]`` float32/float16/
    bfloat16, member-major; ``targets``: ``[B]`` integer class ids shared by all members.
    Non-finite member results (including from an out-of-range target) come out as +inf, never NaN.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S*B, K], got shape {tuple(logits.shape)}")
    check_float("logits", logits)
    rows, classes = logits.shape
    batch = split_rows(rows, members)
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape [{batch}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, got {targets.dtype}")
    check_device(logits, targets)
    if batch == 0 or classes == 0:
        raise ValueError("population_energies needs at least one sample and one class")
    targets = targets.contiguous()
    margin = torch.empty(members, device=logits.device, dtype=torch.float32)
    ce = torch.empty(members, device=logits.device, dtype=torch.float32)
    block_k = pow2_between(classes, 16, 1024)
    # tiles of at most 1024 logits (8192 took 255 registers and a 2000-instruction loop body at K = 10; 2048 with
    # 8 warps spilled)
    block_b = pow2_between(batch, 1, max(1, 1024 // block_k))
    _population_energies_kernel[(members,)](
        logits, targets, margin, ce, batch, classes, logits.stride(0), logits.stride(1),
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=4 if block_b * block_k <= 1024 else 8,  # 8 only where K alone exceeds 1024
    )
    return margin, ce
