"""The accuracy benchmark's validation split and one-cycle schedule, checked against their definitions."""
import math

import pytest
import torch

from edropout.app.data import Dataset, split_validation
from edropout.app.training import make_optimizer, one_cycle


def _dataset(n=37):
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)  # image i holds the value i
    return Dataset("toy", x, torch.arange(n) % 5, torch.zeros(3, 1, 1, 1), torch.zeros(3, dtype=torch.long), 5)


def test_validation_split_is_a_fixed_disjoint_partition_of_the_training_images():
    rest, val_x, val_y = split_validation(_dataset(), 9, seed=3)
    train_ids = rest.train_x.flatten().long().tolist()
    val_ids = val_x.flatten().long().tolist()
    assert len(val_ids) == 9 and len(train_ids) == 28
    assert sorted(train_ids + val_ids) == list(range(37))
    assert val_y.tolist() == [i % 5 for i in val_ids] and rest.train_y.tolist() == [i % 5 for i in train_ids]
    assert torch.equal(rest.test_x, _dataset().test_x)
    again = split_validation(_dataset(), 9, seed=3)[1]
    other = split_validation(_dataset(), 9, seed=4)[1]
    assert torch.equal(again, val_x) and not torch.equal(other, val_x)
    assert val_ids != list(range(9))  # shuffled, not the first images


@pytest.mark.parametrize("count", [0, 37, -1])
def test_validation_split_rejects_impossible_sizes(count):
    with pytest.raises(ValueError, match="validation_images"):
        split_validation(_dataset(), count)


@pytest.mark.parametrize("name", ["sgd", "adadelta", "adam"])
def test_one_cycle_warms_up_to_the_peak_then_anneals_to_about_zero(name):
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = make_optimizer(name, params, lr=0.4)
    schedule = one_cycle(optimizer, 0.4, total_steps=100, pct_start=0.3)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = max(range(100), key=lrs.__getitem__)
    assert abs(peak - 29) <= 1 and math.isclose(lrs[peak], 0.4, rel_tol=1e-3)
    assert lrs[0] == pytest.approx(0.4 / 25) and lrs[-1] < 1e-3
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:]))
