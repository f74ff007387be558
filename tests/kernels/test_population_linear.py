"""population_linear and population_batchnorm against float64 PyTorch references, per member."""

import pytest
import torch
import torch.nn.functional as F

from edropout_kernels import kept_first_order, population_batchnorm, population_linear
from kernel_helpers import DEVICE, ON_CUDA, make_keep, nonzero_randn
from tolerances import assert_close, tol

def linear_reference(x, w, b, in_keep, out_keep, members, scale=None, shift=None, relu=False):
    """Mask inputs per member (where, so non-finite pruned inputs vanish), F.linear in float64."""
    batch = x.shape[0] // members
    out = []
    for s in range(members):
        xs = torch.where(in_keep[s], x[s * batch:(s + 1) * batch].double(), 0.0)
        y = F.linear(xs, w.double().nan_to_num(0.0), None if b is None else b.double())
        if scale is not None:
            y = y * scale.double()
        if shift is not None:
            y = y + shift.double()
        if relu:
            y = y.relu()
        out.append(torch.where(out_keep[s], y, 0.0))
    return torch.cat(out)


def test_kept_first_order_lists_kept_then_pruned_ascending():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    idx, n = kept_first_order(keep)
    assert n.tolist() == [3, 0, 5]
    assert idx.tolist() == [[0, 2, 3, 1, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert idx.dtype == torch.int32 and n.dtype == torch.int32


CASES = [
    # members, batch, inputs, outputs, in-mask, out-mask, bias, scale/shift, relu
    (1, 1, 3, 17, "all", "all", True, False, False),
    (4, 5, 17, 130, "random", "random", True, True, True),
    (4, 33, 130, 3, "none1", "random", True, False, True),
    (4, 5, 130, 17, "random", "none1", False, True, False),
    (4, 1, 17, 17, "all", "random", True, False, False),
]


@pytest.mark.parametrize("members,batch,n_in,n_out,in_kind,out_kind,has_bias,has_affine,relu", CASES)
def test_population_linear_matches_reference(members, batch, n_in, n_out, in_kind, out_kind,
                                             has_bias, has_affine, relu):
    gen = torch.Generator().manual_seed(members * 1000 + batch * 100 + n_in + n_out)
    x = nonzero_randn(members * batch, n_in, gen=gen)
    w = nonzero_randn(n_out, n_in, gen=gen, scale=0.3)
    b = nonzero_randn(n_out, gen=gen) if has_bias else None
    scale = nonzero_randn(n_out, gen=gen, scale=0.2, offset=1.0) if has_affine else None
    shift = nonzero_randn(n_out, gen=gen) if has_affine else None
    in_keep = make_keep(in_kind, members, n_in, gen)
    out_keep = make_keep(out_kind, members, n_out, gen)
    # Pruned inputs of a member hold NaN and weights nobody uses are NaN: the kernel must not read them.
    row_keep = in_keep.repeat_interleave(batch, dim=0)
    x = torch.where(row_keep, x, float("nan"))
    unused = ~(in_keep.any(0)[None, :] & out_keep.any(0)[:, None])
    w = torch.where(unused, float("nan"), w)

    out = torch.full((members * batch, n_out), float("nan"), device=DEVICE)
    y = population_linear(x, w, b, in_keep, out_keep, members=members, scale=scale, shift=shift,
                          relu=relu, allow_tf32=ON_CUDA, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = linear_reference(x, w, b, in_keep, out_keep, members, scale, shift, relu)
    assert_close(y, ref, path="kernel", scaled=True)
    pruned = ~out_keep.repeat_interleave(batch, dim=0)
    assert (y[pruned] == 0).all(), "pruned output columns must be exactly 0"

    # Negative control: the reference of a neighbouring state (one kept input flipped) differs.
    s = members - 1
    flipped = in_keep.clone()
    j = int(in_keep[s].nonzero()[0]) if in_keep[s].any() else 0
    flipped[s, j] = ~flipped[s, j]
    if out_keep[s].any():
        x_ctrl = torch.where(row_keep, x, 1.0)  # finite values where the flipped mask reads them
        other = linear_reference(x_ctrl, w, b, flipped, out_keep, members, scale, shift, False)
        base = linear_reference(x_ctrl, w, b, in_keep, out_keep, members, scale, shift, False)
        assert not torch.allclose(other, base, **tol(torch.float32, DEVICE, "kernel"))


def test_population_linear_half_precision():
    gen = torch.Generator().manual_seed(7)
    members, batch, n_in, n_out = 4, 5, 17, 33
    x = nonzero_randn(members * batch, n_in, gen=gen).to(torch.bfloat16)
    w = nonzero_randn(n_out, n_in, gen=gen, scale=0.3)  # float32: cast to x's dtype by the wrapper
    b = nonzero_randn(n_out, gen=gen)
    in_keep = make_keep("random", members, n_in, gen)
    out_keep = make_keep("random", members, n_out, gen)
    y = population_linear(x, w, b, in_keep, out_keep, members=members, relu=True)
    assert y.dtype == torch.bfloat16
    ref = linear_reference(x.float(), w.to(torch.bfloat16).float(), b, in_keep, out_keep, members, relu=True)
    assert_close(y, ref, path="kernel", scaled=True)  # bfloat16 row of the table


def test_population_linear_rejects_bad_arguments():
    x = torch.randn(6, 4, device=DEVICE)
    w = torch.randn(5, 4, device=DEVICE)
    keep_in = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    keep_out = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError):
        population_linear(x, w, None, keep_in, keep_out, members=4)  # 6 rows into 4 members
    with pytest.raises(ValueError):
        population_linear(x, w[:, :3], None, keep_in, keep_out, members=2)
    with pytest.raises(ValueError):
        population_linear(x, w, None, keep_in[:, :3], keep_out, members=2)


def batchnorm_reference(y, members, gamma, beta, eps, keep, relu):
    """Per-member biased batch statistics over rows (and H, W), affine, zero pruned channels."""
    batch = y.shape[0] // members
    dims = [0] + list(range(2, y.dim()))
    view = [1, -1] + [1] * (y.dim() - 2)
    out = []
    for s in range(members):
        ys = y[s * batch:(s + 1) * batch].double()
        mean = ys.mean(dims, keepdim=True)
        var = ys.var(dims, unbiased=False, keepdim=True)
        r = (ys - mean) / torch.sqrt(var + eps) * gamma.double().view(view) + beta.double().view(view)
        if relu:
            r = r.relu()
        out.append(torch.where(keep[s].view(view), r, 0.0))
    return torch.cat(out)


@pytest.mark.parametrize("members,shape,kind,relu", [
    (4, (5, 17), "random", True),
    (1, (1, 130), "all", False),
    (4, (3, 17, 5, 3), "none1", True),
    (1, (2, 3, 4, 4), "all", False),
])
def test_population_batchnorm_matches_reference(members, shape, kind, relu):
    gen = torch.Generator().manual_seed(sum(shape) + members)
    full = (members * shape[0],) + shape[1:]
    channels = shape[1]
    y = nonzero_randn(*full, gen=gen, scale=3.0, offset=5.0)  # offset: stresses the variance formula
    gamma = nonzero_randn(channels, gen=gen)
    beta = nonzero_randn(channels, gen=gen)
    keep = make_keep(kind, members, channels, gen)
    out = torch.full_like(y, float("nan"))
    got = population_batchnorm(y, members, gamma, beta, 1e-5, out_keep=keep, relu=relu, out=out)
    ref = batchnorm_reference(y, members, gamma, beta, 1e-5, keep, relu)
    assert_close(got, ref, path="kernel", scaled=True)
    view = [members, 1, channels] + [1] * (y.dim() - 2)
    pruned = (~keep).view(view).expand(members, shape[0], *shape[1:]).reshape(full)
    assert (got[pruned] == 0).all()
    if shape[0] * (y[0].numel() // channels) > 1:
        # The float64 reference agrees with F.batch_norm (training mode) for member 0.
        b0 = F.batch_norm(y[:shape[0]].double(), None, None, gamma.double(), beta.double(), True, 0.0, 1e-5)
        if relu:
            b0 = b0.relu()
        kv = keep[0].view([1, -1] + [1] * (y.dim() - 2))
        assert_close(torch.where(kv, b0, 0.0), ref[:shape[0]])
        # Negative control: pooled statistics over all members would give another answer.
        if members > 1:
            pooled = batchnorm_reference(y, 1, gamma, beta, 1e-5, keep[:1], relu)
            assert not torch.allclose(pooled[:shape[0]], ref[:shape[0]], atol=1e-3)


def test_population_batchnorm_without_affine_or_mask_and_channels_last():
    gen = torch.Generator().manual_seed(3)
    y = nonzero_randn(8, 5, 3, 4, gen=gen).contiguous(memory_format=torch.channels_last)
    got = population_batchnorm(y, 2)
    ones, zeros = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    ref = batchnorm_reference(y, 2, ones, zeros, 1e-5, torch.ones(2, 5, dtype=torch.bool, device=DEVICE), False)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, ref, path="kernel", scaled=True)
