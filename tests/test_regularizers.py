"""Sparseout and (Batch) Bridgeout (METHOD.md §7–8): pure PyTorch, CPU.

Statistical checks use fixed seeds, so they are deterministic; their tolerances are 5 standard errors of
the estimate (computed in the test from the sampling distribution), i.e. a correct implementation would
fail with probability < 1e-6 per checked number under a fresh seed, while a wrong variance formula
(off by a factor |w|^{q/2} or (1−p)) is many standard errors away.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edropout.regularizers import (BatchBridgeoutConv2d, BatchBridgeoutLinear, Bridgeout,
                                   BridgeoutConv2d, BridgeoutLinear, Sparseout, apply_batch_bridgeout,
                                   apply_bridgeout, bridgeout_weight, draw_keep_mask,
                                   remove_bridgeout, smallest_magnitude_mask, sparseout)
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (layer inits, dropout draws)."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny ops run far faster on one thread than on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _eta(keep, p, dtype=torch.float64):
    return keep.to(dtype) / (1 - p) - 1


def _bernoulli_var_rel_se(p, n):
    """Relative standard error of a sample variance of n draws of η (standardised Bernoulli(1−p))."""
    pi = 1 - p
    kurtosis = (1 - 6 * pi * (1 - pi)) / (pi * (1 - pi)) + 3
    return math.sqrt((kurtosis - 1) / n)


# ----------------------------------------------------------------------------------------- Sparseout

def test_sparseout_q2_is_inverted_dropout_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g)
    m = torch.rand(64, 33, generator=g) >= 0.3
    assert torch.equal(sparseout(x, 0.3, 2.0, mask=m), x * (m.float() / 0.7))
    # Same global seed -> the very draws and values of F.dropout, forward and backward.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = Sparseout(0.3, 2.0)(xa)
    torch.manual_seed(5)
    yb = F.dropout(xb, 0.3, training=True)
    assert torch.equal(ya, yb)
    ya.backward(x)
    yb.backward(x)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.5, 3.0])
def test_sparseout_forward_is_the_formula(q):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, dtype=torch.float64, generator=g)
    x[:7] = 0.0
    m = torch.rand(500, generator=g) >= 0.4
    want = x + torch.sign(x) * x.abs() ** (q / 2) * _eta(m, 0.4)
    assert_close(sparseout(x, 0.4, q, mask=m), want)


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0])
def test_sparseout_noise_mean_and_variance(q):
    p, n = 0.3, 40000
    x = torch.tensor([-2.0, -0.5, 0.1, 0.7, 3.0], dtype=torch.float64)
    y = sparseout(x.expand(n, -1), p, q, generator=torch.Generator().manual_seed(2))
    var_want = x.abs() ** q * p / (1 - p)
    mean_se = var_want.sqrt() / math.sqrt(n)
    assert ((y.mean(0) - x).abs() <= 5 * mean_se).all()
    rel = (y.var(0) / var_want - 1).abs()
    assert (rel <= 5 * _bernoulli_var_rel_se(p, n)).all(), rel


@pytest.mark.parametrize("q", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_sparseout_backward_is_autograd_with_noise_factor_held_constant(q):
    p = 0.4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, dtype=torch.float64, generator=g)
    x[:4] = 0.0
    m = torch.rand(40, generator=g) >= p

    def frozen(z):  # y = x·f with f = 1 + |x|^{(q−2)/2}·η computed from the detached input
        ax = z.detach().abs()
        c = torch.where(ax > 0, ax.clamp_min(1e-300) ** ((q - 2) / 2),
                        torch.full_like(ax, 1.0 if q <= 2 else 0.0))
        return z * (1 + c * _eta(m, p))

    jac = torch.autograd.functional.jacobian(lambda z: sparseout(z, p, q, mask=m), x)
    jac_ref = torch.autograd.functional.jacobian(frozen, x)
    assert torch.isfinite(jac).all()
    assert_close(jac, jac_ref, atol=0.0)
    assert_close(sparseout(x, p, q, mask=m), frozen(x))  # y = x·f
    if q == 2.0:  # the factor really is constant: numerical gradient agrees
        assert torch.autograd.gradcheck(lambda z: sparseout(z, p, q, mask=m), (x.clone().requires_grad_(),))


def test_sparseout_gradient_safe_at_zero_and_tiny_inputs():
    x = torch.tensor([0.0, 1e-45, -1e-40, 1e-30, 1.0], requires_grad=True)
    for q in (0.1, 1.0, 1.9):
        x.grad = None
        y = sparseout(x, 0.9, q, mask=torch.tensor([True, False, True, False, True]))
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_sparseout_expected_gradient_is_an_lq_penalty_gradient():
    """Averaged over masks, the held-constant backward of a squared loss equals the gradient of
    (t − w·x)² + (2/q)·p/(1−p)·Σ w_j²|x_j|^q: an L_q penalty on the activations (METHOD.md §7)."""
    p, q, n = 0.3, 1.0, 20000
    x = torch.tensor([0.05, 0.3, -1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.8, 0.3], dtype=torch.float64)
    t = 0.7
    xs = x.expand(n, -1).clone().requires_grad_()
    y = sparseout(xs, p, q, generator=torch.Generator().manual_seed(4))
    ((t - y @ w) ** 2).sum().backward()
    grads = xs.grad
    want = -2 * w * (t - w @ x) + 2 * w ** 2 * p / (1 - p) * torch.sign(x) * x.abs() ** (q - 1)
    assert ((grads.mean(0) - want).abs() <= 5 * grads.std(0) / math.sqrt(n)).all()


def test_sparseout_learns_sparser_activations_as_q_falls(one_thread):
    """The claim of METHOD.md §7 is about what training learns: with q < 2 the penalty pushes small
    activations to zero. (The noisy output itself is *less* often zero than dropout's, which zeroes a
    share p of the units; Sparseout with q < 2 zeroes none, so the test measures trained activations.)
    Fixed data and seeds; the share of near-zero hidden ReLU activations must rise as q falls."""
    def near_zero_share(q, seed):
        torch.manual_seed(seed)
        x = torch.randn(256, 10)
        y = torch.tanh(x @ torch.randn(10, 1))
        net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), Sparseout(0.5, q), nn.Linear(64, 1))
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(300):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            h = net[1](net[0](x))
        return (h.abs() < 1e-2 * h.std()).float().mean().item()

    shares = [sum(near_zero_share(q, s) for s in (0, 1)) / 2 for q in (2.0, 1.5, 1.0)]
    assert shares[0] < shares[1] < shares[2], shares


def test_sparseout_eval_identity_and_validation():
    x = torch.randn(5, 6)
    layer = Sparseout(0.5, 1.5).eval()
    assert layer(x) is x
    assert sparseout(x, 0.5, 1.0, training=False) is x
    with pytest.raises(ValueError, match=r"0 <= p < 1"):
        Sparseout(p=1.0)
    with pytest.raises(ValueError, match=r"q=2"):
        Sparseout(p=0.5, q=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        sparseout(x, 0.5, 1.0, mask=torch.ones(5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- Bridgeout

def _weights(out_f=4, in_f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[0, 0] = 0.0  # zero weight: no noise, finite gradient
    return w


def test_bridgeout_linear_per_example_noise_moments():
    p, q, n = 0.3, 1.5, 8000
    layer = BridgeoutLinear(5, 4, p=p, q=q, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.weight.copy_(_weights())
    eye = torch.eye(5).repeat(n, 1)                      # n·5 examples, each reads one column of W̃_b
    with torch.no_grad():
        cols = (layer(eye) - layer.bias).reshape(n, 5, 4).transpose(1, 2)  # (n, out, in) draws of W̃
    noise = cols.double() - layer.weight.double()
    var_want = layer.weight.double().abs() ** q * p / (1 - p)
    assert torch.equal(noise[:, 0, 0], torch.zeros(n, dtype=torch.float64))
    nz = var_want > 0
    mean_se = (var_want / n).sqrt()
    assert ((noise.mean(0) - 0).abs() <= 5 * mean_se + 1e-6)[nz].all()
    rel = (noise.var(0)[nz] / var_want[nz] - 1).abs()
    assert (rel <= 5 * _bernoulli_var_rel_se(p, n)).all(), rel  # also fails if examples shared one draw


def test_bridgeout_linear_matches_explicit_per_example_weights():
    layer = BridgeoutLinear(5, 3, p=0.3, q=1.5, generator=torch.Generator().manual_seed(7))
    x = torch.randn(6, 2, 5)                             # per-example noise is shared across dim 1
    y = layer(x)
    keep = draw_keep_mask((6, 3, 5), 0.3, generator=torch.Generator().manual_seed(7))
    wt = bridgeout_weight(layer.weight, 0.3, 1.5, keep=keep)
    want = torch.stack([F.linear(x[b], wt[b], layer.bias) for b in range(6)])
    assert_close(y, want)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, groups=2, bias=False),
                                dict(padding=1, padding_mode="reflect", dilation=1)])
def test_bridgeout_conv2d_matches_loop_over_examples(kw):
    layer = BridgeoutConv2d(4, 6, 3, p=0.4, q=1.2, generator=torch.Generator().manual_seed(3), **kw)
    x = torch.randn(3, 4, 7, 7)
    y = layer(x)
    keep = draw_keep_mask((3,) + tuple(layer.weight.shape), 0.4,
                          generator=torch.Generator().manual_seed(3))
    wt = bridgeout_weight(layer.weight, 0.4, 1.2, keep=keep)
    plain = nn.Conv2d(4, 6, 3, **kw)
    plain.load_state_dict(layer.state_dict())
    want = []
    for b in range(3):
        with torch.no_grad():
            plain.weight.copy_(wt[b])
        want.append(plain(x[b:b + 1]))
    assert_close(y, torch.cat(want))
    assert layer(x[0]).shape == y.shape[1:]             # unbatched input


def test_bridgeout_gradient_is_autograd_of_the_formula():
    p, q = 0.3, 1.5
    w0 = torch.randn(4, 5, dtype=torch.float64) + 0.1
    w0[w0.abs() < 0.05] = 0.3                           # away from 0: the naive formula is safe here
    keep = draw_keep_mask((4, 5), p, generator=torch.Generator().manual_seed(0))
    w = w0.clone().requires_grad_()
    bridgeout_weight(w, p, q, keep=keep).pow(2).sum().backward()
    w_ref = w0.clone().requires_grad_()
    (w_ref + w_ref.abs() ** (q / 2) * _eta(keep, p)).pow(2).sum().backward()
    assert_close(w.grad, w_ref.grad)
    assert torch.autograd.gradcheck(lambda v: bridgeout_weight(v, p, q, keep=keep), (w0.clone().requires_grad_(),))


def test_bridgeout_gradient_finite_at_zero_weight():
    p, q = 0.3, 0.8
    w = torch.tensor([0.0, 1e-40, -0.5, 2.0], requires_grad=True)
    keep = torch.tensor([False, False, False, True])
    bridgeout_weight(w, p, q, keep=keep).sum().backward()
    eta = _eta(keep, p, torch.float32)
    want = 1 + torch.tensor([0.0, 0.0, -(q / 2) * 0.5 ** (q / 2 - 1), (q / 2) * 2.0 ** (q / 2 - 1)]) * eta
    assert_close(w.grad, want, atol=1e-8)


def test_wrapped_layer_gradient_equals_formula_gradient():
    layer = BatchBridgeoutLinear(5, 4, p=0.3, q=1.5, tau=0.6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        layer.weight.copy_(_weights(seed=3) + 0.01)
    x = torch.randn(8, 5, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    keep = draw_keep_mask((4, 5), 0.3, generator=torch.Generator().manual_seed(9))
    target = smallest_magnitude_mask(w, 0.6).float()
    wt = w + target * w.abs() ** 0.75 * _eta(keep, 0.3, torch.float32)
    F.linear(x2, wt, layer.bias.detach()).pow(2).sum().backward()
    assert_close(layer.weight.grad, w.grad)
    assert_close(x.grad, x2.grad)


def test_per_example_conv_gradients_equal_loop_gradients():
    layer = BridgeoutConv2d(2, 3, 3, padding=1, p=0.3, q=1.5, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    keep = draw_keep_mask((3, 3, 2, 3, 3), 0.3, generator=torch.Generator().manual_seed(5))
    wt = w + w.abs() ** 0.75 * _eta(keep, 0.3, torch.float32)
    sum(F.conv2d(x2[b:b + 1], wt[b], layer.bias.detach(), padding=1).pow(2).sum() for b in range(3)).backward()
    assert_close(layer.weight.grad, w.grad, path="net")
    assert_close(x.grad, x2.grad, path="net")


def test_smallest_magnitude_mask_targets_tau_share_of_each_filter():
    w = torch.randn(6, 3, 3, 3)
    mask = smallest_magnitude_mask(w, 0.75)
    k = round(0.75 * 27)
    rows, aw = mask.reshape(6, -1), w.abs().reshape(6, -1)
    assert (rows.sum(1) == k).all()
    for r in range(6):
        assert aw[r][rows[r]].max() <= aw[r][~rows[r]].min()
    assert not smallest_magnitude_mask(w, 0.0).any() and smallest_magnitude_mask(w, 1.0).all()


def test_batch_bridgeout_one_draw_per_batch_only_on_targeted_weights():
    layer = BatchBridgeoutLinear(6, 4, bias=False, p=0.5, q=1.5, tau=0.5,
                                 generator=torch.Generator().manual_seed(2))
    eye = torch.eye(6)
    with torch.no_grad():
        y = layer(torch.cat([eye, eye, eye]))                 # 18 examples in one forward call
        y2 = layer(eye)                                       # the next mini-batch
    wt = y[:6].T
    assert torch.equal(y[:6], y[6:12]) and torch.equal(y[:6], y[12:])  # every example saw the same W̃
    target = smallest_magnitude_mask(layer.weight, 0.5)
    changed = wt != layer.weight
    assert torch.equal(wt[~target], layer.weight[~target])           # untargeted weights untouched
    assert changed.any() and not (changed & ~target).any()
    assert not torch.equal(y2, y[:6])                                 # a fresh draw per batch


def test_batch_bridgeout_conv2d_shares_one_weight_across_the_batch():
    layer = BatchBridgeoutConv2d(3, 5, 3, padding=1, p=0.3, q=1.5,
                                 generator=torch.Generator().manual_seed(4))
    x = torch.randn(1, 3, 6, 6).expand(4, -1, -1, -1)
    y = layer(x)
    assert all(torch.equal(y[0], y[b]) for b in range(1, 4))
    keep = draw_keep_mask(layer.weight.shape, 0.3, generator=torch.Generator().manual_seed(4))
    wt = bridgeout_weight(layer.weight, 0.3, 1.5, keep=keep,
                          target=smallest_magnitude_mask(layer.weight, 0.75))
    assert_close(y, F.conv2d(x, wt, layer.bias, padding=1))


@pytest.mark.parametrize("cls", [BridgeoutLinear, BatchBridgeoutLinear])
def test_bridgeout_eval_is_identity(cls):
    layer = cls(5, 3).eval()
    plain = nn.Linear(5, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), plain(x))


def _mlp_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("apply", [apply_bridgeout, apply_batch_bridgeout])
def test_apply_and_remove_keep_names_parameters_and_classifier(apply):
    model = _mlp_cnn()
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        before = model(x)
    assert apply(model) == ["0", "3"]
    assert isinstance(model[0], Bridgeout) and isinstance(model[0], nn.Conv2d)
    assert type(model[5]) is nn.Linear                               # classifier untouched
    assert {n: p for n, p in model.named_parameters()} == params     # same names, same objects
    assert not torch.equal(model(x), before)                         # noisy in training mode
    with pytest.raises(TypeError, match="remove_bridgeout"):
        apply(model)
    model(x).sum().backward()
    assert remove_bridgeout(model) == ["0", "3"]
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert not any(k.startswith("bridgeout") for k in vars(model[0]))
    assert {n: p for n, p in model.named_parameters()} == params
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_apply_with_explicit_layers_and_bad_names():
    model = _mlp_cnn()
    assert apply_batch_bridgeout(model, tau=0.5, layers=["3", model[5]]) == ["3", "5"]
    assert model[3].bridgeout_tau == 0.5 and type(model[0]) is nn.Conv2d
    remove_bridgeout(model)
    with pytest.raises(KeyError):
        apply_bridgeout(model, layers=["nope"])
    with pytest.raises(TypeError, match="plain nn.Linear"):
        apply_bridgeout(model, layers=["1"])
    with pytest.raises(ValueError, match="0 <= p < 1"):
        apply_bridgeout(model, p=1.5)
    with pytest.raises(ValueError, match="tau"):
        apply_batch_bridgeout(model, tau=2.0)
