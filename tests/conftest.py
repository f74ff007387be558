"""Shared fixtures for the engine tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def no_data_outside_the_repository(monkeypatch):
    """The default Fashion-MNIST directory points nowhere, so no test passes only where the Debian package is
    installed; tests that need idx files write small ones (``idx_files``)."""
    import edropout.app.data

    monkeypatch.setattr(edropout.app.data, "FASHION_MNIST_DIR", "/nonexistent/edropout-tests/fashion-mnist")


@pytest.fixture(autouse=True)
def thread_count_restored():
    """A test that sets torch's CPU thread count (the CLI's --threads, a benchmark config) gives it back: the next
    test's sums would otherwise round differently from a subprocess's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
