"""apply_dropout / remove_dropout / disable_dropout: the Dropout baseline of the pruning-curves benchmark."""
import pytest
import torch
import torch.nn as nn

from edropout.app.models import build_model
from edropout.regularizers import ActivationDropout, apply_dropout, disable_dropout, remove_dropout


def test_dropout_after_every_relu_then_removed():
    torch.manual_seed(0)
    model = build_model("alexnet", width=2)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    keys = list(model.state_dict())
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    before = model(x)
    names = apply_dropout(model, 0.3)
    assert len(names) == len(relus) == sum(isinstance(m, ActivationDropout) for m in model.modules())
    assert all(m[1].p == 0.3 for m in model.modules() if isinstance(m, ActivationDropout))
    assert torch.equal(model(x), before)                    # identity in eval mode
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(model(x), model(x))              # noisy in training mode
    with pytest.raises(TypeError, match="remove_dropout"):
        apply_dropout(model, 0.3)
    assert remove_dropout(model) == names
    restored = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert all(a is b for a, b in zip(restored, relus)) and list(model.state_dict()) == keys


def test_disable_dropout_and_bad_p():
    model = build_model("alexnet", width=2)
    assert len(disable_dropout(model)) == 2
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(ValueError, match="0 <= p < 1"):
        apply_dropout(model, 1.0)
