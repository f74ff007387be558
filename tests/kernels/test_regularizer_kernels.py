"""Triton Sparseout / Bridgeout kernels against the PyTorch reference (edropout.regularizers).

The kernels' own Bernoulli draws are read out (`sparseout_mask`, `bridgeout_mask`) and fed to the
reference, so forward values and gradients must agree to float32 rounding; agreement of the gradients
shows that the backward regenerates exactly the forward's noise from the seed.
"""
import math

import pytest
import torch

from edropout.regularizers import bridgeout_weight, smallest_magnitude_mask, sparseout
from edropout_kernels.bridgeout import bridgeout_mask, bridgeout_weight_triton
from edropout_kernels.sparseout import sparseout_mask, sparseout_triton
from kernel_helpers import DEVICE
from tolerances import assert_close


def _input(shape, seed=0, zeros=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[:zeros] = 0.0
    return x.to(DEVICE)


def test_keep_mask_is_seeded_bernoulli():
    p, shape = 0.3, (3, 1031)                            # not a multiple of the block size
    m = sparseout_mask(shape, p, seed=11, device=DEVICE)
    n = m.numel()
    assert m.dtype == torch.bool and m.shape == shape
    assert torch.equal(m, sparseout_mask(shape, p, seed=11, device=DEVICE))
    assert not torch.equal(m, sparseout_mask(shape, p, seed=12, device=DEVICE))
    rate_se = math.sqrt(p * (1 - p) / n)                 # binomial standard error of the keep rate
    assert abs(m.float().mean().item() - (1 - p)) < 5 * rate_se
    assert sparseout_mask(shape, 0.0, seed=3, device=DEVICE).all()
    # The Bridgeout draws for copy c, element i are the flat draws at offset c·numel + i.
    assert torch.equal(bridgeout_mask((4, 5), p, 11, copies=3, device=DEVICE).flatten(),
                       sparseout_mask((60,), p, 11, device=DEVICE))


@pytest.mark.parametrize("q", [2.0, 1.5, 0.7, 3.0])
def test_sparseout_kernel_matches_reference(q):
    p, seed = 0.4, 1234
    x = _input((37, 61))
    dy = _input((37, 61), seed=1, zeros=0)
    mask = sparseout_mask(x.shape, p, seed, device=DEVICE)
    xk = x.clone().requires_grad_()
    yk = sparseout_triton(xk, p, q, seed)
    yk.backward(dy)
    xr = x.clone().requires_grad_()
    yr = sparseout(xr, p, q, mask=mask)
    yr.backward(dy)
    assert_close(yk, yr)
    assert torch.isfinite(xk.grad).all()
    assert_close(xk.grad, xr.grad)
    if q == 2.0:                                         # dropout: kept units scaled, others zeroed
        assert torch.equal(yk == 0, ~mask | (x == 0))


def test_sparseout_kernel_stores_no_noise_and_depends_on_seed():
    x = _input((8, 300)).requires_grad_()
    y = sparseout_triton(x, 0.5, 1.0, seed=7)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == x.shape and saved[0].dtype == x.dtype  # x only
    y.sum().backward()
    g7 = x.grad.clone()
    x.grad = None
    sparseout_triton(x, 0.5, 1.0, seed=8).sum().backward()
    assert not torch.equal(g7, x.grad)


def test_sparseout_kernel_half_precision():
    x = _input((16, 100)).half()
    mask = sparseout_mask(x.shape, 0.3, 5, device=DEVICE)
    y = sparseout_triton(x, 0.3, 1.5, 5)
    assert y.dtype == torch.float16
    want = sparseout(x.float(), 0.3, 1.5, mask=mask).half()
    assert_close(y, want, path="kernel")


@pytest.mark.parametrize("copies", [None, 3])
@pytest.mark.parametrize("targeted", [False, True])
def test_bridgeout_kernel_matches_reference(copies, targeted):
    p, q, seed = 0.3, 1.5, 99
    w = _input((6, 3, 3, 3), seed=2)                     # conv weight with exact zeros
    target = smallest_magnitude_mask(w, 0.75) if targeted else None
    keep = bridgeout_mask(w.shape, p, seed, copies=copies, device=DEVICE)
    wk = w.clone().requires_grad_()
    out = bridgeout_weight_triton(wk, p, q, seed, target=target, copies=copies)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out.backward(grad_out)
    wr = w.clone().requires_grad_()
    ref = bridgeout_weight(wr, p, q, keep=keep, target=target)
    ref.backward(grad_out)
    assert out.shape == ref.shape
    assert_close(out, ref)
    assert torch.isfinite(wk.grad).all()
    assert_close(wk.grad, wr.grad)
    if targeted:                                         # untargeted weights pass through unchanged
        untouched = ~target.expand_as(out)
        assert torch.equal(out[untouched], w.expand_as(out)[untouched])


def test_bridgeout_kernel_stores_no_noise():
    w = _input((5, 7)).requires_grad_()
    out = bridgeout_weight_triton(w, 0.3, 1.5, seed=1, copies=4)
    assert all(t.numel() <= w.numel() for t in out.grad_fn.saved_tensors)  # never the (4, 5, 7) noise


def test_kernel_arguments_are_checked():
    x = _input((4, 4))
    with pytest.raises(ValueError, match="0 <= p < 1"):
        sparseout_triton(x, 1.0, 1.5, 0)
    with pytest.raises(ValueError, match="q"):
        sparseout_triton(x, 0.5, 0.0, 0)
    with pytest.raises(ValueError, match="target mask shape"):
        bridgeout_weight_triton(x, 0.3, 1.5, 0, target=torch.ones(3, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        sparseout_triton(x.double(), 0.5, 1.5, 0)
