"""A training loss whose finiteness only the device has judged so far (``EDropout.step`` on the fused update).

The fused masked update reads the loss on the device and writes nothing when it is False, so ``step``
need not wait to learn it. The host reads the loss with its next read of the device (the next step's convergence
read, or a read of the step's ``StepInfo``, of ``skipped_batches``, ``sync``/``state_dict``/``export``); a
non-finite loss is then reported for the iteration it belonged to, after the update's host-side bookkeeping
(optimizer step counters, lazily created state) is undone.
"""
from __future__ import annotations

import torch


class DeferredLossCheck:
    """The loss of iteration ``iteration`` (a 0-d device tensor), the value the update ran under (``every``:
    finite exactly when the update ran; the loss itself, or across ranks the sum of every rank's loss) and the
    update (``taken.undo()`` puts back its host-side bookkeeping). ``skipped``: None until read."""

    def __init__(self, iteration: int, loss: torch.Tensor, every: torch.Tensor, taken):
        self.iteration, self._taken = iteration, taken
        # what the host reads: the loss, and ``every`` when it is another tensor
        self.tensors = (loss,) if every is loss else (loss, every)
        self.skipped = None

    def settle(self, ran: bool) -> bool:
        """Record whether the update ran (``every`` was finite); when it did not (it wrote nothing) undo its
        bookkeeping. Returns whether the iteration's update was skipped."""
        self.skipped = not ran
        if self.skipped:
            self._taken.undo()
        return self.skipped
