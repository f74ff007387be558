"""One training forward/backward with a state applied, either on the kept channels only (the compact backend's
kept-channel forward) or as the masked dense forward: what the kept-channel tests compare."""
import torch.nn.functional as F
import torch

from edropout.backends import CompactBackend
from edropout.energy import margin_energy
from edropout.masked_update import frozen_statistics
from edropout.masking import masked
from edropout.state_view import StateView


def training_pass(model, units, state, x, y, kept_only):
    """Logits, parameter gradients, buffers and the random state after one training forward/backward."""
    model.zero_grad(set_to_none=True)
    with frozen_statistics(StateView(model, units, state).statistics_keeps):
        if kept_only:
            logits = CompactBackend().bind(model, units, margin_energy).kept_channel_logits(state, x)
            assert logits is not None  # really the kept-channel interpreter, not a fallback
        else:
            with masked(model, units, state):
                logits = model(x)
        F.cross_entropy(logits, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}, torch.get_rng_state()
