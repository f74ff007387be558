"""The kept-channel GEMM's parts against independent definitions: kept channel lists of many layers, the compact
operand gathers, the implicit GEMM's two row mappings and multi-chunk K loop, the batchnorm's tiling, the masked
optimizer's cached pointer table, and the tf32 policy."""

import pytest
import torch
import torch.nn.functional as F

import edropout_kernels as ek
from edropout_kernels._gather import GATHER_BLOCK_J, gather_kept_activations, gather_kept_weights, padded_channels
from edropout_kernels import masked_optimizer
from kernel_helpers import DEVICE, ON_CUDA, make_keep, nonzero_randn
from tolerances import assert_close
from test_population_conv2d import conv_reference
from test_population_linear import batchnorm_reference, linear_reference


def _lists(keep):
    """Independent definition: kept ids ascending, then pruned ids ascending, and the count, per member."""
    index = [[j for j in range(keep.shape[1]) if keep[s, j]] + [j for j in range(keep.shape[1]) if not keep[s, j]]
             for s in range(keep.shape[0])]
    return index, [int(keep[s].sum()) for s in range(keep.shape[0])]


def test_kept_first_orders_match_per_layer_definition():
    gen = torch.Generator().manual_seed(5)
    keeps = [make_keep(kind, 5, n, gen) for kind, n in (("random", 7), ("none1", 1), ("all", 4), ("random", 33))]
    lists = ek.kept_first_orders(keeps)
    for keep, kept in zip(keeps, lists):
        index, count = _lists(keep.cpu())
        assert kept.index.tolist() == index and kept.count.tolist() == count
        assert kept.index.dtype == torch.int32 and kept.count.dtype == torch.int32
    # the same lists as one layer at a time
    single = ek.kept_first_order(keeps[3])
    assert torch.equal(single.index, lists[3].index) and torch.equal(single.count, lists[3].count)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch,spatial", [(2, (3, 5)), (37, (2, 2)), (5, ()), (3, (7, 9))])
def test_gather_kept_activations_writes_kept_channels_then_zeros(channels_last, batch, spatial):
    """Maps of 15, 4, 1 and 63 taps: one program takes several images (a partial block at the end of a member's
    images when ``batch`` is not a multiple of the rows per program) or several tap blocks of one image."""
    gen = torch.Generator().manual_seed(2 + batch)
    members, channels = 3, 70
    x = nonzero_randn(members * batch, channels, *spatial, gen=gen)
    if channels_last and spatial:
        x = x.contiguous(memory_format=torch.channels_last)
    keep = make_keep("none1", members, channels, gen)
    out = gather_kept_activations(x, ek.kept_first_order(keep), members)
    pad = padded_channels(channels)
    assert out.shape == (members * batch, *spatial, pad) and pad % 64 == 0
    for s in range(members):
        kept = keep[s].nonzero().flatten()
        n = kept.numel()
        rows = slice(s * batch, (s + 1) * batch)
        assert torch.equal(out[rows, ..., :n], x[rows][:, kept].movedim(1, -1))
        end = min(pad, (n + GATHER_BLOCK_J - 1) // GATHER_BLOCK_J * GATHER_BLOCK_J)
        assert (out[rows, ..., n:end] == 0).all(), "zeros after the kept channels up to the gather block"


@pytest.mark.parametrize("n_out,n_in,taps", [(9, 20, (3, 2)), (70, 37, ()), (45, 90, (1, 1)), (37, 5, (3, 3))])
def test_gather_kept_weights_orders_kept_outputs_and_inputs_first(n_out, n_in, taps):
    """Linear and 1x1 weights (32 output rows per program, kept rows ending inside a block), 3x3 and 3x2 taps."""
    gen = torch.Generator().manual_seed(3 + n_out)
    members = 4
    w = nonzero_randn(n_out, n_in, *taps, gen=gen)
    keep_in = make_keep("random", members, n_in, gen)
    keep_out = make_keep("none1", members, n_out, gen)
    out = gather_kept_weights(w, ek.kept_first_order(keep_in), ek.kept_first_order(keep_out))
    n_taps = w[0, 0].numel()
    assert out.shape == (members, n_out, n_taps, padded_channels(n_in))
    for s in range(members):
        rows, cols = keep_out[s].nonzero().flatten(), keep_in[s].nonzero().flatten()
        expect = w[rows][:, cols].reshape(rows.numel(), cols.numel(), n_taps).transpose(1, 2)
        assert torch.equal(out[s, :rows.numel(), :, :cols.numel()], expect)
        end = min(padded_channels(n_in), (cols.numel() + GATHER_BLOCK_J - 1) // GATHER_BLOCK_J * GATHER_BLOCK_J)
        assert (out[s, :rows.numel(), :, cols.numel():end] == 0).all()


@pytest.mark.parametrize("block_m,block_k", [(16, 16), (32, 32), (64, 16)])
def test_population_conv2d_row_mappings_and_k_chunks(block_m, block_k):
    """4x4 outputs: block_m 16 keeps every row tile inside one image (contiguous rows), 32 and 64 straddle images;
    70 input channels with block_k 16 or 32 take several K chunks per tap."""
    gen = torch.Generator().manual_seed(block_m + block_k)
    members, batch, c_in, c_out = 3, 3, 70, 11
    x = nonzero_randn(members * batch, c_in, 7, 7, gen=gen)
    w = nonzero_randn(c_out, c_in, 3, 3, gen=gen, scale=0.1)
    b = nonzero_randn(c_out, gen=gen)
    keep_in = make_keep("random", members, c_in, gen)
    keep_out = make_keep("none1", members, c_out, gen)
    x = torch.where(keep_in.repeat_interleave(batch, 0)[:, :, None, None], x, float("nan"))
    y = population_conv2d_call(x, w, b, keep_in, keep_out, members, block_m, block_k)
    ref = conv_reference(x, w, b, keep_in, keep_out, members, 2, 1)
    assert y.shape == ref.shape == (members * batch, c_out, 4, 4)
    assert_close(y, ref, path="kernel", scaled=True)


def population_conv2d_call(x, w, b, keep_in, keep_out, members, block_m, block_k):
    return ek.population_conv2d(x, w, b, ek.kept_first_order(keep_in), ek.kept_first_order(keep_out), members=members,
                                stride=2, padding=1, allow_tf32=ON_CUDA, block_m=block_m, block_n=16,
                                block_k=block_k)


def test_population_linear_takes_precomputed_kept_lists_and_rejects_bad_blocks():
    gen = torch.Generator().manual_seed(4)
    members, batch, n_in, n_out = 4, 3, 130, 21
    x = nonzero_randn(members * batch, n_in, gen=gen)
    w = nonzero_randn(n_out, n_in, gen=gen, scale=0.2)
    keep_in, keep_out = make_keep("random", members, n_in, gen), make_keep("random", members, n_out, gen)
    kept_in, kept_out = ek.kept_first_orders([keep_in, keep_out])
    y = ek.population_linear(x, w, None, kept_in, kept_out, members=members, allow_tf32=ON_CUDA)
    assert_close(y, linear_reference(x, w, None, keep_in, keep_out, members), path="kernel", scaled=True)
    with pytest.raises(ValueError, match="block_k"):
        ek.population_linear(x, w, None, kept_in, kept_out, members=members, block_k=128)
    with pytest.raises(ValueError, match="list"):
        ek.population_linear(x, w, None, kept_out, kept_in, members=members)


@pytest.mark.parametrize("shape,channels_last", [((3, 2, 33, 33), False), ((300, 3), False), ((5, 6, 4, 4), True)])
def test_population_batchnorm_merges_statistics_over_many_tiles(shape, channels_last):
    """33x33 pixels take two pixel tiles per image and three image tiles; 300 rows of a [N, C] input take two image
    tiles: the per-tile statistics merge must give the float64 batch statistics."""
    gen = torch.Generator().manual_seed(sum(shape))
    members = 2
    y = nonzero_randn(members * shape[0], *shape[1:], gen=gen, scale=2.0, offset=3.0)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    gamma, beta = nonzero_randn(c, gen=gen), nonzero_randn(c, gen=gen)
    keep = make_keep("random", members, c, gen)
    got = ek.population_batchnorm(y, members, gamma, beta, 1e-5, out_keep=keep)
    assert_close(got, batchnorm_reference(y, members, gamma, beta, 1e-5, keep, False), path="kernel", scaled=True)


def test_masked_step_reuses_its_device_pointer_table():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    masks = {model[0].weight: (torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=DEVICE), None)}
    masked_optimizer._TABLES.clear()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for _ in range(3):  # gradients rewritten in place (zero_grad(set_to_none=False)): the same addresses
        for p in model.parameters():
            p.grad.fill_(1.0)
        assert ek.fused_masked_step(opt, masks)
    assert len(masked_optimizer._TABLES) == 1, "the same tensors must reuse one device table"
    assert all(float(opt.state[p]["step"]) == 3.0 for p in model.parameters())


def test_tf32_policy_follows_pytorch_switches():
    cudnn, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        assert ek.tf32_allowed("conv2d") and not ek.tf32_allowed("linear")
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("high")
        assert not ek.tf32_allowed("conv2d") and ek.tf32_allowed("linear")
        assert torch.backends.cuda.matmul.allow_tf32  # the same switch, spelled the other way
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)
    with pytest.raises(ValueError):
        ek.tf32_allowed("conv3d")
