"""Shared fixtures for the engine tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
