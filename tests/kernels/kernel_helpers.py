"""Shared helpers of the population kernel tests: device, keep-masks and non-zero inputs.

Tolerances come from tests/tolerances.py."""

import os

import torch

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_CUDA else "cpu"


def make_keep(kind, members, channels, gen):
    """Keep-mask [members, channels]: "all", "random", or "none1" (member 1 keeps nothing)."""
    if kind == "all":
        return torch.ones(members, channels, dtype=torch.bool, device=DEVICE)
    keep = torch.rand(members, channels, generator=gen) < 0.6
    keep[:, 0] = True
    if kind == "none1":
        keep[min(1, members - 1)] = False
    return keep.to(DEVICE)


def nonzero_randn(*shape, gen, scale=1.0, offset=0.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 1e-2, torch.full_like(t, 0.5), t) * scale + offset
    return t.float().to(DEVICE)

