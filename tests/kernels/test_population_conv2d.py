"""population_conv2d against a float64 F.conv2d reference, member by member."""

import pytest
import torch
import torch.nn.functional as F

from edropout_kernels import population_conv2d
from kernel_helpers import DEVICE, ON_CUDA, make_keep, nonzero_randn
from tolerances import assert_close, tol

def conv_reference(x, w, b, in_keep, out_keep, members, stride, padding, scale=None, shift=None, relu=False):
    batch = x.shape[0] // members
    out = []
    for s in range(members):
        xs = torch.where(in_keep[s].view(1, -1, 1, 1), x[s * batch:(s + 1) * batch].double(), 0.0)
        y = F.conv2d(xs, w.double().nan_to_num(0.0), None if b is None else b.double(),
                     stride=stride, padding=padding)
        if scale is not None:
            y = y * scale.double().view(1, -1, 1, 1)
        if shift is not None:
            y = y + shift.double().view(1, -1, 1, 1)
        if relu:
            y = y.relu()
        out.append(torch.where(out_keep[s].view(1, -1, 1, 1), y, 0.0))
    return torch.cat(out)


CASES = [
    # members, batch, C, O, H, W, (kh, kw), stride, padding, in-mask, out-mask, bias, affine+relu
    (1, 1, 3, 17, 7, 7, (3, 3), 1, 1, "all", "all", True, False),
    (4, 5, 17, 3, 5, 5, (1, 1), 2, 0, "random", "none1", False, True),
    (4, 2, 17, 17, 6, 5, (3, 3), 2, 1, "none1", "random", True, True),
    (4, 1, 3, 130, 5, 4, (3, 3), 1, 0, "random", "random", True, False),
    (1, 3, 5, 7, 6, 5, (3, 2), (2, 1), (1, 0), "random", "random", True, True),
]


@pytest.mark.parametrize("members,batch,c_in,c_out,h,w,ksize,stride,padding,in_kind,out_kind,has_bias,epi", CASES)
def test_population_conv2d_matches_reference(members, batch, c_in, c_out, h, w, ksize, stride, padding,
                                             in_kind, out_kind, has_bias, epi):
    gen = torch.Generator().manual_seed(members * 1000 + batch * 100 + c_in + c_out + h)
    x = nonzero_randn(members * batch, c_in, h, w, gen=gen)
    weight = nonzero_randn(c_out, c_in, *ksize, gen=gen, scale=0.3)
    bias = nonzero_randn(c_out, gen=gen) if has_bias else None
    scale = nonzero_randn(c_out, gen=gen, scale=0.2, offset=1.0) if epi else None
    shift = nonzero_randn(c_out, gen=gen) if epi else None
    in_keep = make_keep(in_kind, members, c_in, gen)
    out_keep = make_keep(out_kind, members, c_out, gen)
    # Pruned input channels hold NaN, weights nobody uses are NaN: the kernel must never read them.
    x = torch.where(in_keep.repeat_interleave(batch, 0).view(members * batch, c_in, 1, 1), x, float("nan"))
    unused = ~(in_keep.any(0)[None, :] & out_keep.any(0)[:, None])
    weight = torch.where(unused.view(c_out, c_in, 1, 1), float("nan"), weight)

    ref = conv_reference(x, weight, bias, in_keep, out_keep, members, stride, padding, scale, shift, epi)
    out = torch.full(ref.shape, float("nan"), device=DEVICE)
    y = population_conv2d(x, weight, bias, in_keep, out_keep, members=members, stride=stride,
                          padding=padding, scale=scale, shift=shift, relu=epi, allow_tf32=ON_CUDA, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, ref, path="kernel", scaled=True)
    pruned = (~out_keep).repeat_interleave(batch, 0)[:, :, None, None].expand_as(y)
    assert (y[pruned] == 0).all(), "pruned output channels must be exactly 0"

    # Negative control: dropping one more kept output channel changes the reference.
    s = members - 1
    if out_keep[s].any():
        flipped = out_keep.clone()
        flipped[s, int(out_keep[s].nonzero()[0])] = False
        other = conv_reference(x, weight, bias, in_keep, flipped, members, stride, padding, scale, shift, False)
        base = conv_reference(x, weight, bias, in_keep, out_keep, members, stride, padding, scale, shift, False)
        assert not torch.allclose(other, base, **tol(torch.float32, DEVICE, "kernel"))


def test_population_conv2d_channels_last_in_and_out():
    gen = torch.Generator().manual_seed(11)
    members, batch = 4, 2
    x = nonzero_randn(members * batch, 6, 5, 5, gen=gen).contiguous(memory_format=torch.channels_last)
    weight = nonzero_randn(9, 6, 3, 3, gen=gen, scale=0.3)
    in_keep = make_keep("random", members, 6, gen)
    out_keep = make_keep("none1", members, 9, gen)
    y = population_conv2d(x, weight, None, in_keep, out_keep, members=members, padding=1, relu=True,
                          allow_tf32=ON_CUDA)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, conv_reference(x, weight, None, in_keep, out_keep, members, 1, 1, relu=True), path="kernel",
                 scaled=True)


def test_population_conv2d_rejects_unsupported():
    x = torch.randn(4, 4, 5, 5, device=DEVICE)
    keep = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        population_conv2d(x, w, None, keep, keep, members=2, groups=2)
    with pytest.raises(ValueError, match="dilation"):
        population_conv2d(x, w, None, keep, keep, members=2, dilation=2)
    with pytest.raises(ValueError, match="grouped"):
        population_conv2d(x, w[:, :2], None, keep, keep, members=2)
    with pytest.raises(ValueError):
        population_conv2d(x, w, None, keep, keep, members=2, padding="same")
