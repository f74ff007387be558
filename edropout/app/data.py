"""Data sets that ship on the machine: scikit-learn's digits (the default) and Fashion-MNIST from idx files.

Nothing is downloaded at run time. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` or
any directory holding the four standard idx files (gzipped or not).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                 "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
DATASETS = ("digits", "fashion-mnist")


@dataclass
class Dataset:
    """Normalised image tensors [N, C, H, W] and integer labels, already split into train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def input_size(self) -> int:
        return self.train_x.shape[-1]


def _normalise(train, test):
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (test - mean) / std


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images), split with a fixed permutation."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    train_x, test_x = _normalise(x[train], x[test])
    return Dataset("digits", train_x, y[train], test_x, y[test], 10)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}")


def load_fashion_mnist(directory: str | None = None) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, 28×28) from the four standard idx files in ``directory``."""
    directory = directory or FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST directory {directory} does not exist. Install the data with "
            f"'apt-get install dataset-fashion-mnist' (files land in {FASHION_MNIST_DIR}) or pass --data-dir "
            f"pointing to a directory with train-images-idx3-ubyte[.gz] and the three other idx files")
    arrays = {k: _read_idx(_find(directory, stem)) for k, stem in FASHION_FILES.items()}
    tx = torch.tensor(arrays["train_x"], dtype=torch.float32).unsqueeze(1) / 255.0
    vx = torch.tensor(arrays["test_x"], dtype=torch.float32).unsqueeze(1) / 255.0
    tx, vx = _normalise(tx, vx)
    return Dataset("fashion-mnist", tx, torch.tensor(arrays["train_y"], dtype=torch.long), vx,
                   torch.tensor(arrays["test_y"], dtype=torch.long), 10)


def load_dataset(name: str, data_dir: str | None = None, limit: int | None = None) -> Dataset:
    """A data set by name; ``limit`` keeps the first N training and N test images (for quick runs)."""
    if name == "digits":
        data = load_digits()
    elif name == "fashion-mnist":
        data = load_fashion_mnist(data_dir)
    else:
        raise ValueError(f"unknown data set {name!r}: use one of {DATASETS}")
    if limit:
        data = Dataset(data.name, data.train_x[:limit], data.train_y[:limit], data.test_x[:limit],
                       data.test_y[:limit], data.num_classes)
    return data


def load_benchmark_data(config: dict) -> Dataset:
    """A benchmark config's data set (``data``, default Fashion-MNIST; ``data_dir``) cut to its first
    ``train_images`` / ``test_images`` images when those are given: the quick CPU runs use a subset."""
    data = load_dataset(config.get("data", "fashion-mnist"), config.get("data_dir"))
    n_train, n_test = config.get("train_images"), config.get("test_images")
    if n_train:
        data.train_x, data.train_y = data.train_x[:n_train], data.train_y[:n_train]
    if n_test:
        data.test_x, data.test_y = data.test_x[:n_test], data.test_y[:n_test]
    return data


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, drop_last=True):
    """Shuffled mini-batches for one epoch (the last partial batch dropped so BatchNorm sees full batches)."""
    order = torch.randperm(len(y), generator=generator)
    stop = len(y) - (len(y) % batch_size if drop_last and len(y) >= batch_size else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
