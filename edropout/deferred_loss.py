"""A training loss whose finiteness only the device has judged so far (``EDropout.step`` on the fused update).

The fused masked update reads ``isfinite(loss)`` on the device and writes nothing when it is False, so ``step``
need not wait to learn it. The host reads the loss with its next read of the device (the next step's convergence
read, or a read of the step's ``StepInfo``, of ``skipped_batches``, ``sync``/``state_dict``/``export``); a
non-finite loss is then reported for the iteration it belonged to, after the update's host-side bookkeeping
(optimizer step counters, lazily created state) is undone.
"""
from __future__ import annotations

import torch


class DeferredLossCheck:
    """The loss of iteration ``iteration`` (a 0-d device tensor), the flag the update ran under (0-d bool on the
    device: the loss is finite, on every rank when distributed) and the update (``taken.undo()`` puts back its
    host-side bookkeeping). ``skipped``: None until read."""

    def __init__(self, iteration: int, loss: torch.Tensor, flag: torch.Tensor, taken):
        self.iteration, self.loss, self.flag, self._taken = iteration, loss, flag, taken
        self.skipped = None

    def settle(self, flag: bool) -> bool:
        """Record the flag's host value; when it is False (the update wrote nothing) undo the update's
        bookkeeping. Returns whether the iteration's update was skipped."""
        self.skipped = not flag
        if self.skipped:
            self._taken.undo()
        return self.skipped
