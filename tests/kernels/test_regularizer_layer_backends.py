"""The regularizer layers with backend="triton" against backend="torch" fed the very same draws.

A triton layer records the Philox seed of its forward (`last_seed` / `bridgeout_last_seed`); the kernels'
read-out functions (`sparseout_mask`, `bridgeout_mask`) turn it into the keep mask, which the torch layer is
fed through its `draw_keep` hook. Forward values and the gradients of input, weight and bias must then agree
to float32 rounding: this checks the layers' wiring (copies per example, Batch Bridgeout's target mask,
grouped / padded / strided convolutions, extra batch dims) on shapes that are not multiples of anything.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from edropout.regularizers import (Sparseout, apply_batch_bridgeout, apply_bridgeout, remove_bridgeout)
from edropout_kernels.bridgeout import bridgeout_mask
from edropout_kernels.sparseout import sparseout_mask
from kernel_helpers import DEVICE
from tolerances import assert_close


def _randn(*shape, seed=0, zeros=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[:zeros] = 0.0
    return x.to(DEVICE)


def _close(a, b):
    assert a.shape == b.shape
    assert_close(a, b)


@pytest.mark.parametrize("q", [2.0, 1.5, 0.7])
def test_sparseout_layer_triton_matches_torch(q):
    p, shape = 0.35, (3, 5, 7, 11)
    x = _randn(*shape, zeros=4)                            # exact zeros: the safe-gradient branch
    dy = _randn(*shape, seed=1)
    fast = Sparseout(p, q, generator=torch.Generator().manual_seed(5), backend="triton")
    xt = x.clone().requires_grad_()
    yt = fast(xt)
    yt.backward(dy)
    mask = sparseout_mask(shape, p, fast.last_seed, device=DEVICE)
    ref = Sparseout(p, q)
    ref.draw_keep = lambda s, device: mask
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(dy)
    _close(yt, yr)
    _close(xt.grad, xr.grad)
    fast.eval()
    assert fast(x) is x                                    # identity in eval mode, no launch


def test_sparseout_layer_triton_seeds_follow_the_generator():
    x = _randn(4, 9)
    a = Sparseout(0.5, 1.5, generator=torch.Generator().manual_seed(1), backend="triton")
    b = Sparseout(0.5, 1.5, generator=torch.Generator().manual_seed(1), backend="triton")
    first = a(x)
    assert torch.equal(first, b(x))                        # same generator state, same noise
    assert not torch.equal(first, a(x))                    # a fresh seed per forward call


def _conv_cases():
    """(layer, input) pairs with odd sizes, strides, padding modes, groups and extra batch dims."""
    torch.manual_seed(0)
    return [
        ("linear", nn.Linear(13, 7), _randn(5, 13, seed=2)),
        ("linear_3d", nn.Linear(11, 6, bias=False), _randn(3, 4, 11, seed=3)),
        ("conv", nn.Conv2d(3, 5, (3, 2), stride=2, padding=1), _randn(3, 3, 9, 7, seed=4)),
        ("conv_grouped_reflect", nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
         _randn(2, 4, 5, 6, seed=5)),
    ]


@pytest.mark.parametrize("kind", ["bridgeout", "batch"])
@pytest.mark.parametrize("case", range(4))
def test_bridgeout_layers_triton_match_torch(kind, case):
    name, plain, x = _conv_cases()[case]
    p, q = 0.3, 1.5
    with torch.no_grad():
        plain.weight.view(-1)[:3] = 0.0                    # exact zeros: abs_pow's safe branch
    fast, ref = nn.Sequential(copy.deepcopy(plain)).to(DEVICE), nn.Sequential(copy.deepcopy(plain)).to(DEVICE)
    gen = torch.Generator().manual_seed(7)
    if kind == "batch":
        apply_batch_bridgeout(fast, p, q, tau=0.6, layers=["0"], generator=gen, backend="triton")
        apply_batch_bridgeout(ref, p, q, tau=0.6, layers=["0"])
    else:
        apply_bridgeout(fast, p, q, layers=["0"], generator=gen, backend="triton")
        apply_bridgeout(ref, p, q, layers=["0"])
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt = fast(xt)
    dy = _randn(*yt.shape, seed=8)
    yt.backward(dy)
    layer = fast[0]
    copies = None if kind == "batch" else x.shape[0]          # one noisy weight per example
    keep = bridgeout_mask(layer.weight.shape, p, layer.bridgeout_last_seed, copies=copies, device=DEVICE)

    def fed(shape):
        assert tuple(shape) == tuple(keep.shape), (shape, keep.shape)
        return keep

    ref[0].draw_keep = fed
    yr = ref(xr)
    yr.backward(dy)
    _close(yt, yr)
    _close(xt.grad, xr.grad)
    _close(fast[0].weight.grad, ref[0].weight.grad)
    if plain.bias is not None:
        _close(fast[0].bias.grad, ref[0].bias.grad)
    assert "backend='triton'" in repr(fast[0])
    remove_bridgeout(fast)
    assert type(fast[0]) is type(plain) and not hasattr(fast[0], "bridgeout_backend")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'torch' .* or 'triton'"):
        Sparseout(0.3, 1.5, backend="cuda")
    with pytest.raises(ValueError, match="'torch' .* or 'triton'"):
        apply_batch_bridgeout(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), backend="Triton")


def test_triton_on_cpu_without_interpreter_fails_clearly():
    """In a fresh interpreter without TRITON_INTERPRET: no GPU -> construction fails; with a GPU -> a CPU
    forward fails. Either way a RuntimeError that names TRITON_INTERPRET=1 and backend='torch'."""
    script = textwrap.dedent("""
        import torch
        from edropout.regularizers import Sparseout, apply_batch_bridgeout
        for make in (lambda: Sparseout(0.3, 1.5, backend="triton")(torch.randn(4)),
                     lambda: apply_batch_bridgeout(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)),
                                                   backend="triton")):
            try:
                make()
            except RuntimeError as exc:
                assert "TRITON_INTERPRET=1" in str(exc) and "backend='torch'" in str(exc), exc
            else:
                if not torch.cuda.is_available():
                    raise SystemExit("no error")
        m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        if torch.cuda.is_available():   # built fine on a GPU machine; a CPU forward must still fail clearly
            apply_batch_bridgeout(m, backend="triton")
            try:
                m(torch.randn(2, 3))
            except RuntimeError as exc:
                assert "TRITON_INTERPRET=1" in str(exc), exc
            else:
                raise SystemExit("no error on CPU forward")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
