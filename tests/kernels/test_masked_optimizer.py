"""Fused masked optimizer step vs. torch.optim followed by restoring the pruned elements.

The reference is the obvious (slow) definition: run the ordinary ``optimizer.step()`` and put every pruned
element of the parameter and of every state tensor back to its pre-step value (0 for a state tensor the
step created). The kernel must match it to float32 rounding, leave pruned elements bit-identical, ignore
gradients of pruned elements (they are poisoned with NaN/huge values here) and decline unsupported setups.
"""
import copy

import pytest
import torch

from edropout_kernels.masked_optimizer import fused_masked_step, supports
from kernel_helpers import DEVICE
from tolerances import assert_close

STEP = dict(rtol=1e-6, atol=1e-7)  # one elementwise update of float32 values: tighter than the table's "op" row
SHAPES = [(17, 3, 3, 3), (5, 130), (17,), (17,), (4, 6, 7)]  # conv, linear, bias, BN vector, 3-D


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------

def keep_mask(p, mask):
    """Full bool mask of p's shape from (row_keep, col_keep) under the [R, C, T] view."""
    r = p.shape[0]
    c = p.shape[1] if p.dim() >= 2 else 1
    keep = torch.ones(r, c, p.numel() // (r * c), dtype=torch.bool, device=p.device)
    rk, ck = mask if mask is not None else (None, None)
    if rk is not None:
        keep &= rk.view(r, 1, 1)
    if ck is not None:
        keep &= ck.view(1, c, 1)
    return keep.view(p.shape)


@torch.no_grad()
def reference_masked_step(opt, masks):
    """torch.optim step, then pruned elements of params and state tensors back to pre-step values."""
    before = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            st = opt.state.get(p, {})
            before[p] = (p.detach().clone(),
                         {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape})
    opt.step()
    for p, (p0, st0) in before.items():
        keep = keep_mask(p, masks.get(p))
        p.copy_(torch.where(keep, p, p0))
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                old = st0.get(k, torch.zeros_like(v))  # a state the step created starts at zero
                v.copy_(torch.where(keep, v, old))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE)) for s in SHAPES]


def random_masks(params, gen, step):
    """Masks that change every step; includes all-kept, all-pruned and None vectors."""
    masks = {}
    for j, p in enumerate(params):
        r = p.shape[0]
        c = p.shape[1] if p.dim() >= 2 else 1
        kind = (step + j) % 5
        if kind == 0:
            continue  # parameter absent from the dict: fully kept
        rk = torch.rand(r, generator=gen) < 0.6
        ck = torch.rand(c, generator=gen) < 0.7 if p.dim() >= 2 else None
        if kind == 1:
            rk = torch.zeros(r, dtype=torch.bool)  # every row pruned
        elif kind == 2:
            rk = torch.ones(r, dtype=torch.bool)  # every row kept (explicit vector)
        elif kind == 3:
            rk = None
        masks[p] = (None if rk is None else rk.to(DEVICE), None if ck is None else ck.to(DEVICE))
    return masks


def set_grads(params_a, params_b, masks_a, gen, poison=True, step=0):
    """Same random non-zero grads on both sets; pruned elements of the kernel's grads get poisoned.

    The scale changes with the step so second moments also shrink sometimes (exercises amsgrad's max).
    """
    scale = 3.0 if step % 3 == 0 else 0.3
    for pa, pb in zip(params_a, params_b):
        gr = torch.randn(pa.shape, generator=gen).to(DEVICE)
        gr = scale * (gr + 0.1 * torch.sign(gr))  # bounded away from zero
        pb.grad = gr.clone()
        if poison:
            keep = keep_mask(pa, masks_a.get(pa))
            bad = torch.where(torch.rand(pa.shape, generator=gen).to(DEVICE) < 0.5, float("nan"), 1e30)
            gr = torch.where(keep, gr, bad)
        pa.grad = gr


def translate(masks, src, dst):
    return {d: masks[s] for s, d in zip(src, dst) if s in masks}


def assert_same(opt_k, params_k, opt_r, params_r, tag):
    for j, (pk, pr) in enumerate(zip(params_k, params_r)):
        assert torch.isfinite(pk).all(), f"{tag}: non-finite param {j}"
        assert_close(pk.detach(), pr.detach(), dtype=torch.float32, **STEP, msg=lambda m: f"{tag}: param {j}: {m}")
        sk, sr = opt_k.state.get(pk, {}), opt_r.state.get(pr, {})
        assert set(sk) == set(sr), f"{tag}: state keys {sorted(sk)} vs {sorted(sr)}"
        for key in sr:
            a, b = sk[key], sr[key]
            assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (tag, key)
            assert_close(a, b, dtype=torch.float32, **STEP, msg=lambda m: f"{tag}: state {key} of param {j}: {m}")


CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_dampening": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    "sgd_wd_maximize": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.05, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_amsgrad_wd": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.6), amsgrad=True, weight_decay=1e-2)),
    "adam_large_lerp_weight": (torch.optim.Adam, dict(lr=3e-2, betas=(0.3, 0.9), maximize=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.5), weight_decay=0.1, amsgrad=True)),
    "adadelta_official": (torch.optim.Adadelta, dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)),
    "adadelta_wd": (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1)),
}


def run_pair(cls, kw, steps, seed=0, scheduler=False, block_size=128):
    params_k = make_params(seed)
    params_r = [torch.nn.Parameter(p.detach().clone()) for p in params_k]
    opt_k, opt_r = cls(params_k, **kw), cls(params_r, **kw)
    sch = []
    if scheduler:
        sch = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1) for o in (opt_k, opt_r)]
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        masks = random_masks(params_k, gen, step)
        set_grads(params_k, params_r, masks, gen, step=step)
        assert fused_masked_step(opt_k, masks, block_size=block_size)
        reference_masked_step(opt_r, translate(masks, params_k, params_r))
        assert_same(opt_k, params_k, opt_r, params_r, f"step {step}")
        for s in sch:
            s.step()
    return opt_k, opt_r


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
    cls, kw = CASES[case]
    opt_k, _ = run_pair(cls, kw, steps=6)
    if cls is not torch.optim.SGD:
        assert len(opt_k.state) == len(SHAPES)
        for st in opt_k.state.values():
            assert st["step"].item() == 6  # counters advance even while a parameter is fully pruned


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                    (torch.optim.Adam, dict(lr=1e-2))], ids=["sgd", "adam"])
def test_step_lr_scheduler(cls, kw):
    opt_k, _ = run_pair(cls, kw, steps=7, scheduler=True)
    assert opt_k.param_groups[0]["lr"] == pytest.approx(kw["lr"] * 0.01)


def test_default_block_two_groups_and_missing_grad():
    params = make_params(3)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-2, "weight_decay": 0.1}]
    opt_k, opt_r = torch.optim.AdamW(groups(params)), torch.optim.AdamW(groups(ref))
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        masks = random_masks(params, gen, step)
        set_grads(params, ref, masks, gen)
        params[4].grad = ref[4].grad = None  # no grad: skipped, as torch skips it
        assert fused_masked_step(opt_k, masks)
        reference_masked_step(opt_r, translate(masks, params, ref))
        assert_same(opt_k, params, opt_r, ref, f"step {step}")
    assert params[4] not in opt_k.state


@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "adam_amsgrad_wd", "adadelta_official"])
def test_pruned_elements_bit_identical(case):
    cls, kw = CASES[case]
    params = make_params(7)
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(8)
    for step in range(3):
        masks = random_masks(params, gen, step)
        set_grads(params, [torch.nn.Parameter(p.detach().clone()) for p in params], masks, gen)
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
                  for p in params]
        assert fused_masked_step(opt, masks, block_size=128)
        for p, (p0, st0) in zip(params, before):
            pruned = ~keep_mask(p, masks.get(p))
            assert torch.equal(p.detach()[pruned].view(torch.int32), p0[pruned].view(torch.int32))
            for k, v in opt.state[p].items():
                if v.shape != p.shape:
                    continue
                old = st0.get(k, torch.zeros_like(v))
                assert torch.equal(v[pruned].view(torch.int32), old[pruned].view(torch.int32)), k
            if pruned.any() and not pruned.all():
                assert not torch.equal(p.detach()[~pruned], p0[~pruned])  # kept ones did move


def test_negative_control_ignoring_masks_is_detected():
    """The comparison is sharp: stepping without masks must fail against the masked reference."""
    params = make_params(11)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_k, opt_r = torch.optim.Adam(params, lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    masks = random_masks(params, gen, 1)
    set_grads(params, ref, masks, gen, poison=False)
    assert fused_masked_step(opt_k, {}, block_size=128)
    reference_masked_step(opt_r, translate(masks, params, ref))
    with pytest.raises(AssertionError):
        assert_same(opt_k, params, opt_r, ref, "control")


def _unchanged_after_false(opt, params):
    snap = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    assert fused_masked_step(opt, {}) is False
    assert all(torch.equal(a, b.detach()) for a, b in zip(snap, params))
    assert str(opt.state_dict()) == str(state)


def _with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("build", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, differentiable=True),
    lambda ps: torch.optim.Adam(ps, lr=0.1, capturable=True),
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.1),
    lambda ps: torch.optim.LBFGS(ps),
    lambda ps: type("MySGD", (torch.optim.SGD,), {})(ps, lr=0.1),
], ids=["differentiable", "capturable", "fused_adam", "rmsprop", "lbfgs", "subclass"])
def test_unsupported_options_return_false(build):
    params = _with_grads([torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))])
    opt = build(params)
    assert not supports(opt)
    _unchanged_after_false(opt, params)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, device=DEVICE)),
    lambda: torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, device=DEVICE)),
    lambda: torch.nn.Parameter(torch.randn(3, 4, device=DEVICE).t()),  # non-contiguous
], ids=["float64", "complex", "non_contiguous"])
def test_unsupported_tensors_return_false(make):
    params = [torch.nn.Parameter(torch.randn(5, device=DEVICE)), make()]
    _with_grads(params)
    opt = torch.optim.Adam(params, lr=0.1)
    assert supports(opt)  # class and options are fine; the tensor is not
    _unchanged_after_false(opt, params)


def test_sparse_grad_returns_false():
    p = torch.nn.Parameter(torch.randn(6, 3, device=DEVICE))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 0]]), torch.tensor([1.0, 2.0]), (6, 3),
                                     check_invariants=True).to(DEVICE)
    opt = torch.optim.SGD([p], lr=0.1)
    _unchanged_after_false(opt, [p])


def test_bad_mask_shape_returns_false():
    params = _with_grads([torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))])
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    snap = params[0].detach().clone()
    assert fused_masked_step(opt, {params[0]: (torch.ones(5, dtype=torch.bool, device=DEVICE), None)}) is False
    assert torch.equal(snap, params[0].detach()) and len(opt.state) == 0


@pytest.mark.parametrize("case,bad", [("sgd_momentum_dampening", float("nan")), ("adam_amsgrad_wd", float("inf")),
                                      ("adadelta_official", -float("inf"))])
@pytest.mark.parametrize("fresh", [True, False])
def test_a_step_whose_value_is_not_finite_changes_nothing_once_undone(case, bad, fresh):
    """``only_if_finite`` NaN or infinite: the kernel writes no element; ``undo()`` restores step counters and
    lazily created state, so the next step matches the masked reference of an optimizer that never saw the
    skipped call (SGD's first momentum step included: buffer = gradient). A finite value is the ordinary step."""
    cls, kw = CASES[case]
    params = make_params(21)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_k, opt_r = cls(params, **kw), cls(ref, **kw)
    gen = torch.Generator().manual_seed(22)
    if not fresh:
        masks = random_masks(params, gen, 0)
        set_grads(params, ref, masks, gen)
        assert fused_masked_step(opt_k, masks, only_if_finite=torch.tensor(2.5, device=DEVICE))
        reference_masked_step(opt_r, translate(masks, params, ref))
        assert_same(opt_k, params, opt_r, ref, "flag True")
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt_k.state_dict())
    masks = random_masks(params, gen, 1)
    set_grads(params, ref, masks, gen, poison=False)
    taken = fused_masked_step(opt_k, masks, block_size=128, only_if_finite=torch.tensor(bad, device=DEVICE))
    assert taken
    assert all(torch.equal(a.view(torch.int32), p.detach().view(torch.int32)) for a, p in zip(values, params))
    taken.undo()
    assert str(opt_k.state_dict()) == str(state)
    masks = random_masks(params, gen, 2)
    set_grads(params, ref, masks, gen, step=2)
    assert fused_masked_step(opt_k, masks, block_size=128)
    reference_masked_step(opt_r, translate(masks, params, ref))
    assert_same(opt_k, params, opt_r, ref, "after the skipped step")
