"""Limits fail gracefully: torch-pruning's grouping runs under a time and memory budget and a blow-up falls back
from released memory with a warning naming the part; window attention (reshapes, permutations, roll) gets groups
whose export equals the masked model; a channel shuffle, which torch-pruning maps as if channels kept their order,
is refused for the channels it moves instead of exporting a different network."""
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from edropout import EDropout, units as units_module
from edropout.budget import BudgetExceeded, budget, resident_bytes
from nets import randomise_bn, small_net


def _blow_up(module, *args, **kwargs):
    """A grouping that allocates without end, as torch-pruning's index mappings do on swin_t."""
    hoard = []
    while True:
        hoard.append(bytearray(1 << 20))


def _stall(module, *args, **kwargs):
    while True:
        time.sleep(0.01)


def _out_of_memory(module, *args, **kwargs):
    raise MemoryError


@pytest.mark.parametrize("failure, reason", [(_blow_up, "more than 0.1 GiB of extra memory"),
                                             (_stall, "ran longer than 0.5 s"),
                                             (_out_of_memory, "ran out of memory")])
def test_a_grouping_past_its_budget_falls_back_from_released_memory(failure, reason, batch, monkeypatch):
    x, y = batch
    # one limit at a time, the other far away (the machine may be busy)
    monkeypatch.setattr(units_module, "GROUPING_EXTRA_BYTES", 100 * 2 ** 20 if failure is _blow_up else 2 ** 40)
    monkeypatch.setattr(units_module, "GROUPING_SECONDS", 0.5 if failure is _stall else 600)
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failure)
    model = small_net("resnet18")
    before = resident_bytes()
    with pytest.warns(RuntimeWarning, match=rf"^(?=.*grouping.* at the group rooted at layers\.[\w.]+)"
                                            rf"(?=.*{reason})(?=.*ignored_layers)"):
        pruner = EDropout(model, x[:2])
    assert not pruner.units.traced and pruner.num_units > 0
    assert resident_bytes() - before < 60 * 2 ** 20  # the hoard is gone
    assert torch.isfinite(pruner.energies(x, y)).all()  # the per-layer fallback scores
    with pytest.raises(RuntimeError, match="export"):
        pruner.export()


def test_the_budget_never_fires_after_its_block():
    with pytest.raises(BudgetExceeded):
        with budget(0.1, 2 ** 40):
            while True:
                time.sleep(0.005)
    for _ in range(5):  # blocks that end about when the budget runs out: it may fire inside, never later
        try:
            with budget(0.05, 2 ** 40):
                time.sleep(0.045)
        except BudgetExceeded:
            pass
        time.sleep(0.1)


class WindowBlock(nn.Module):
    """A Swin block on (B, H, W, C): LayerNorm, cyclic shift (roll), window partition (view, permute, reshape),
    multi-head attention from one qkv Linear, window merge, reverse shift, residual; then an MLP."""

    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, hh, ww, c = x.shape
        w = self.window
        h = torch.roll(self.norm1(x), shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = h.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        qkv = self.qkv(h).reshape(h.shape[0], w * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        h = self.proj((attn @ qkv[2]).transpose(1, 2).reshape(h.shape[0], w * w, c))
        h = h.view(b, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        x = x + torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
    """Swin's downsampling: four strided slices concatenated along channels, LayerNorm, Linear reduction."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        parts = [x[:, i::2, j::2, :] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(parts, -1)))


class SwinLike(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.blocks = nn.Sequential(WindowBlock(dim, 2, 2, 0), WindowBlock(dim, 2, 2, 1), PatchMerging(dim),
                                    WindowBlock(2 * dim, 2, 2, 0))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, 4)

    def forward(self, x):
        h = self.blocks(self.embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(h).mean(dim=(1, 2)))


def _export_matches(pruner, model, x, seed=2):
    """Export a random state; the small network must compute the masked model's outputs and hold exactly the
    parameters the pruning rate promises."""
    state = torch.rand(pruner.num_units, generator=torch.Generator().manual_seed(seed)) < 0.6
    for group in pruner.units.groups:
        state[group.first_bit] = True
    pruner.best_state = state
    small = pruner.export()
    with torch.no_grad(), pruner.apply(state):
        masked_out = model(x)
    with torch.no_grad():
        small_out = small(x)
    assert (small_out - masked_out).abs().max() <= 1e-5 * (1 + masked_out.abs().max())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert pruner.pruning_rate == pytest.approx(1 - count(small) / count(model), abs=1e-12)
    assert count(small) < count(model)


def test_window_attention_gets_groups_whose_export_equals_the_masked_model(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SwinLike().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # groups through LayerNorm / head reshapes stay unpruned
        pruner = EDropout(model, x[:2], backend="compact")
    assert pruner.units.traced
    assert {g.module_name for g in pruner.units.groups} >= {"blocks.0.fc1", "blocks.1.fc1", "blocks.3.fc1"}
    _export_matches(pruner, model, x)
    ref = EDropout(model, x[:2], backend="reference").score_states(pruner.population, x, y)
    assert torch.allclose(pruner.energies(x, y), ref, rtol=1e-4, atol=1e-5)


class ShuffleNet(nn.Module):
    """ShuffleNet's channel shuffle (view, transpose, view) between two convs, beside an ordinary conv pair."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        n, ch, hh, ww = h.shape
        h = h.view(n, 2, ch // 2, hh, ww).transpose(1, 2).contiguous().view(n, ch, hh, ww)
        h = torch.relu(self.c(torch.relu(self.b(h))))
        return self.fc(h.mean(dim=(2, 3)))


def test_a_channel_shuffle_is_refused_for_the_channels_it_moves(batch):
    x, _ = batch
    torch.manual_seed(0)
    model = randomise_bn(ShuffleNet()).eval()
    with pytest.warns(RuntimeWarning, match="group rooted at a is not prunable: its removed channels reach a "
                                            "later layer as non-zero values .*channel shuffle"):
        pruner = EDropout(model, x[:2])
    assert pruner.units.traced
    assert sorted(g.module_name for g in pruner.units.groups) == ["b", "c"]
    _export_matches(pruner, model, x)


def test_an_op_that_revives_pruned_channels_is_refused(batch):
    """conv -> BatchNorm (masked) -> sigmoid -> conv: a pruned channel reaches the next conv as 0.5."""
    x, _ = batch

    class Revive(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.b(torch.sigmoid(self.bn(self.a(x))))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = randomise_bn(Revive()).eval()
    with pytest.warns(RuntimeWarning, match="group rooted at a is not prunable"):
        pruner = EDropout(model, x[:2])
    assert [g.module_name for g in pruner.units.groups] == ["b"]
    _export_matches(pruner, model, x)
