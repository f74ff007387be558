"""A forward hook on the model itself (not on a submodule) is honoured by the kept-channel backend: scoring and the
training forward fall back to paths that call the model, so energies and logits equal the hooked masked forward."""
import pytest
import torch
import torch.nn.functional as F

from edropout import EDropout
from edropout.masking import masked
from nets import small_net


def _doubling(module, inputs, output):
    return 2.0 * output


@pytest.mark.filterwarnings("ignore:compact backend:RuntimeWarning")
@pytest.mark.parametrize("name", ["lenet", "concat"])
def test_root_hook_reaches_scoring_and_training(name):
    torch.manual_seed(0)
    model = small_net(name).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4 if name == "concat" else 10, (6,))
    pruner = EDropout(model, x[:2], population_size=4, backend="compact", seed=0)
    model.register_forward_hook(_doubling)
    state = pruner.population[0]
    # independent definition: the hooked model called with the state masked, margin energy written out
    with torch.no_grad(), masked(model, pruner.units, state):
        model.eval()
        logits = model(x)
        model.train()
    others = logits.clone()
    others[torch.arange(6), y] = -float("inf")
    margin = (others.max(dim=1).values - logits[torch.arange(6), y]).mean()
    energies = EDropout(model, x[:2], population_size=4, backend="compact", seed=0,
                        score_in_eval_mode=True).score_states(state.unsqueeze(0), x, y)
    # energies come back in float32 whatever the model's dtype
    torch.testing.assert_close(energies[0].double(), margin, rtol=1e-6, atol=1e-6)
    with masked(model, pruner.units, state):
        dense = model(x)
    trained = pruner.backend.training_logits(state, x)
    torch.testing.assert_close(trained, dense, rtol=1e-10, atol=1e-10)
    assert F.cross_entropy(trained, y).isfinite()
