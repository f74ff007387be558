"""After convergence, training the exported network equals masked dense training."""
import copy

import pytest
import torch

from edropout import EDropout
from nets import randomise_bn, small_net


def _converged_pair(name, x, y, make_optimizer):
    model = randomise_bn(small_net(name)).train()
    pruners, optimizers = [], []
    for compact in (True, False):
        m = copy.deepcopy(model)
        # the reference backend scores and trains the first step identically in both (masked dense forward)
        p = EDropout(m, x[:2], population_size=5, seed=1, train_exported_after_convergence=compact, backend="reference")
        o = make_optimizer(m.parameters())
        p.step(x, y, o)
        p.finalize()
        pruners.append(p)
        optimizers.append(o)
    assert torch.equal(pruners[0].best_state, pruners[1].best_state) and not pruners[0].best_state.all()
    return pruners, optimizers


@pytest.mark.parametrize("name", ["lenet", "resnet18", "concat", "mlp"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_exported_training_matches_masked_training(name, opt, batch):
    x, y = batch
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            # Adam turns noise-level gradients (summation-order noise, ~1e-9) into ±lr steps; a larger eps keeps
            # the comparison well-conditioned while still exercising the transfer of exp_avg/exp_avg_sq/step
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-3)}[opt]
    (compact, dense), (opt_c, opt_d) = _converged_pair(name, x, y, make)
    scheduler = torch.optim.lr_scheduler.StepLR(opt_c, 2, 0.5)
    scheduler_d = torch.optim.lr_scheduler.StepLR(opt_d, 2, 0.5)
    for i in range(4):
        xb, yb = x[i:i + 8], y[i:i + 8]
        lc, ld = compact.step(xb, yb, opt_c).loss, dense.step(xb, yb, opt_d).loss
        assert lc == pytest.approx(ld, rel=1e-5, abs=1e-6)
        assert opt_c.param_groups[0]["lr"] == opt_d.param_groups[0]["lr"]
        scheduler.step()
        scheduler_d.step()
    assert compact.training_network is not compact.model and dense.training_network is dense.model
    compact.sync()
    # parameters everywhere (pruned ones stay zero in both); buffers where kept (pruned channels' BatchNorm
    # statistics are never used, and the dense path keeps updating them from zero inputs)
    # relative to each tensor's scale: compact and dense convolutions sum in different orders, and a few steps
    # through BatchNorm amplify those float32 differences (measured below 1e-5 of the scale)
    close = lambda a, b: (a.double() - b.double()).abs().max() <= 1e-5 * b.double().abs().max() + 1e-7
    for (key, pc), pd in zip(compact.model.named_parameters(), dense.model.parameters()):
        assert close(pc.detach(), pd.detach()), key
    sc, sd = compact.export().state_dict(), dense.export().state_dict()
    for key in sd:
        assert close(sc[key], sd[key]), key
    params_c, params_d = list(compact.model.parameters()), list(dense.model.parameters())
    for pc, pd in zip(params_c, params_d):
        for key, value in opt_d.state[pd].items():
            if torch.is_tensor(value) and value.shape == pd.shape:
                # state tensors accumulate raw gradients, whose float32 summation order differs between the
                # compact and dense convolutions: a looser bound than for the weights
                # (measured up to 5e-5 of the tensor's scale on BatchNorm nets)
                assert (opt_c.state[pc][key] - value).abs().max() <= 2e-4 * value.abs().max(), key


def test_converged_step_trains_a_smaller_network(batch):
    x, y = batch
    (compact, _), (opt_c, _) = _converged_pair("resnet18", x, y, lambda p: torch.optim.SGD(p, lr=0.01))
    compact.step(x, y, opt_c)
    small = sum(p.numel() for p in compact.training_network.parameters())
    assert small == int(compact.units.kept_parameters(compact.best_state[None])[0])
    assert small < sum(p.numel() for p in compact.model.parameters())
