"""A backend is an object behind one interface: a new one is a subclass registered by name or passed as an
instance, and ``EDropout`` runs with it unchanged. The toy backend here scores with its own definition of an
energy (pruned output channels' weights and biases zeroed on a copy of the model, margin written out), so the
run checks the pruner's use of the interface against the reference backend, not shared scoring code."""
import copy

import pytest
import torch

from edropout import EDropout
from edropout import backends
from edropout import evolution as evo
from edropout.backends import Backend, ReferenceBackend, make_backend, register_backend
from edropout.export import export_pruned
from edropout.state_view import StateView
from nets import randomise_bn, small_net
from tolerances import assert_close


class ZeroedWeightsBackend(ReferenceBackend):
    """Scores each state on a copy of the model whose pruned units' weights and biases are zero (exact for nets
    without BatchNorm, where a unit's output is its producer's), and counts the calls of every method."""

    def __init__(self):
        self.calls = {"score": 0, "children": 0, "select": 0, "training_logits": 0, "optimizer_step": 0}

    def score(self, states, x, y):
        self.calls["score"] += 1
        out = []
        for state in states:
            model = copy.deepcopy(self.model).eval()
            modules = dict(model.named_modules())
            bits = torch.cat([state.cpu(), torch.ones(1, dtype=torch.bool)])  # index D: never pruned
            with torch.no_grad():
                for point in self.units.mask_points:
                    keep = bits[point.index]
                    modules[point.module_name].weight[~keep] = 0
                    modules[point.module_name].bias[~keep] = 0
                logits = model(x)
            target = logits.gather(1, y[:, None]).squeeze(1)
            others = torch.stack([torch.cat([row[:t], row[t + 1:]]).max() for row, t in zip(logits, y)])
            out.append((others - target).mean().float())
        return torch.stack(out)

    def children(self, *args, **kwargs):
        self.calls["children"] += 1
        return super().children(*args, **kwargs)

    def select(self, *args):
        self.calls["select"] += 1
        return super().select(*args)

    def training_logits(self, state, x):
        self.calls["training_logits"] += 1
        return super().training_logits(state, x)

    def optimizer_step(self, optimizer, view):
        self.calls["optimizer_step"] += 1
        super().optimizer_step(optimizer, view)


def _run(backend, x, y, steps=4):
    model = small_net("lenet").double().train()
    pruner = EDropout(model, x[:2], population_size=6, seed=2, backend=backend, rescore_parents=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    history = []
    for i in range(steps):
        pruner.step(x[i:i + 8], y[i:i + 8], opt)
        history.append((pruner.population.clone(), pruner.stored_energies.clone(), pruner.best_state.clone()))
    return pruner, model, history


@pytest.mark.parametrize("how", ["registered_name", "instance"])
def test_a_new_backend_runs_edropout_like_the_reference(how, batch, monkeypatch):
    x, y = batch
    x = x.double()
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    if how == "registered_name":
        register_backend("zeroed", ZeroedWeightsBackend)
        spec = "zeroed"
    else:
        spec = ZeroedWeightsBackend()
    toy, toy_model, toy_history = _run(spec, x, y)
    ref, ref_model, ref_history = _run("reference", x, y)
    assert isinstance(toy.backend, ZeroedWeightsBackend) and (how == "registered_name" or toy.backend is spec)
    assert toy.backend.calls == {"score": 4, "children": 4, "select": 4, "training_logits": 4, "optimizer_step": 4}
    for (pop_t, e_t, best_t), (pop_r, e_r, best_r) in zip(toy_history, ref_history):
        assert torch.equal(pop_t, pop_r) and torch.equal(best_t, best_r)
        assert_close(e_t, e_r, rtol=1e-6)  # float32 energies of float64 logits
    assert len({tuple(e.tolist()) for _, e, _ in toy_history}) > 1 and not toy.best_state.all()
    for a, b in zip(toy_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_backend_objects_are_checked(batch):
    x, _ = batch
    with pytest.raises(TypeError, match="subclass of edropout.backends.Backend"):
        register_backend("bad", object)
    with pytest.raises(ValueError, match="unknown backend 42"):
        EDropout(small_net("lenet"), x[:2], backend=42)
    with pytest.raises(TypeError):
        Backend()  # the interface alone scores nothing
    shared = make_backend("batched")
    EDropout(small_net("lenet"), x[:2], backend=shared)
    with pytest.raises(ValueError, match="already bound to another model"):
        EDropout(small_net("mlp"), x[:2], backend=shared)


@pytest.mark.parametrize("name", ["resnet18", "concat"])
def test_state_view_matches_the_exported_network(name, batch):
    """Keep-masks, kept positions and pruning rate of a state against the physically pruned network."""
    x, _ = batch
    model = randomise_bn(small_net(name))
    units = EDropout(model, x[:2], backend="reference").units
    g = torch.Generator().manual_seed(4)
    state = evo.keep_one_per_group(torch.rand(1, units.num_units, generator=g) < 0.5, units.group_of_unit, g)[0]
    view = StateView(model, units, state)
    small = dict(export_pruned(model, units, state, x[:2]).named_parameters())
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert view.pruning_rate == pytest.approx(1 - sum(p.numel() for p in small.values()) / total, abs=1e-12)
    names = {p: n for n, p in params.items()}
    for name_, param in params.items():
        keep = view.parameter_keeps.get(param)
        kept = param.numel() if keep is None else int(keep.expand_as(param).sum())
        assert kept == small[name_].numel(), name_
    for param, (rows, cols) in view.row_col_keeps.items():
        keep = torch.ones_like(param, dtype=torch.bool)
        if rows is not None:
            keep &= rows.view(-1, *[1] * (param.dim() - 1))
        if cols is not None:
            keep &= cols.view(1, -1, *[1] * (param.dim() - 2))
        assert torch.equal(keep, view.parameter_keeps.get(param, torch.ones(())).expand_as(param))
        positions = view.kept_positions[names[param]]
        gathered = param.detach()
        for dim, index in positions.items():
            gathered = gathered.index_select(dim, index)
        assert torch.equal(gathered, small[names[param]].detach())
    for bn, keep in view.statistics_keeps.items():
        assert not keep.all() and bn.running_mean is not None and keep.shape == bn.running_mean.shape
