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

from .errors import DataError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where dataset-fashion-mnist installs it
FASHION_MNIST_DIR = DEBIAN_FASHION_MNIST_DIR  # the default --data-dir
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


def _normalise(train, test, source: str):
    """Standardise by the training images' mean and standard deviation; constant images cannot be."""
    mean, std = train.mean(), train.std()
    if len(train) < 2 or float(train.max()) == float(train.min()):
        raise DataError(f"{source}: every training pixel has the same value ({float(mean):g}), so the images "
                        f"cannot be normalised and carry nothing to learn; check that this is the right file")
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
    train_x, test_x = _normalise(x[train], x[test], "scikit-learn digits")
    return Dataset("digits", train_x, y[train], test_x, y[test], 10)


# idx type codes (the third byte of the magic number) and their big-endian numpy types
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: str, dims: int, what: str) -> np.ndarray:
    """An idx file's array, after checking its magic number, its number of dimensions (``dims``: 3 for images
    [N, H, W], 1 for labels [N]) and that its length matches its header; errors name the file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read it ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an idx file: its magic number is {data[:4].hex() or 'missing'}, expected "
                        f"00 00, a type code (08 for unsigned bytes) and the number of dimensions")
    if data[3] != dims:
        raise DataError(f"{path} holds a {data[3]}-dimensional array, but {what} must be {dims}-dimensional; "
                        f"is it the right file?")
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) < header or len(data) - header != expected:
        raise DataError(f"{path}: its header announces shape {shape} ({expected} bytes of data) but the file holds "
                        f"{max(len(data) - header, 0)} bytes; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _images(path: str) -> torch.Tensor:
    """Images [N, 1, H, W] as float32 (unsigned bytes scaled to [0, 1]); square, 8×8 or larger, finite."""
    array = _read_idx(path, 3, "images [N, H, W]")
    if array.shape[1] != array.shape[2] or array.shape[1] < 8:
        raise DataError(f"{path}: images of {array.shape[1]}×{array.shape[2]} pixels; the models take square "
                        f"images of 8×8 pixels or more")
    images = torch.tensor(array.astype(np.float32)).unsqueeze(1)
    if array.dtype == np.uint8:
        images = images / 255.0
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise DataError(f"{path}: {bad} pixels are NaN or infinite; clean the file")
    return images


def _labels(path: str, count: int, images_path: str, classes: int) -> torch.Tensor:
    """Labels [N] in [0, classes), as many as the images they belong to."""
    array = _read_idx(path, 1, "labels [N]")
    if array.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers, got idx type {array.dtype}")
    if len(array) != count:
        raise DataError(f"{images_path} holds {count} images but {path} holds {len(array)} labels; every image "
                        f"needs one label")
    if len(array) and (array.min() < 0 or array.max() >= classes):
        raise DataError(f"{path}: labels must lie in [0, {classes}), got [{array.min()}, {array.max()}]")
    return torch.tensor(array.astype(np.int64))


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}")


def load_fashion_mnist(directory: str | None = None) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, 28×28) from the four standard idx files in ``directory``."""
    directory = directory or FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        raise DataError(
            f"Fashion-MNIST directory {directory} does not exist. Install the data with "
            f"'apt-get install dataset-fashion-mnist' (files land in {DEBIAN_FASHION_MNIST_DIR}) or pass --data-dir "
            f"pointing to a directory with train-images-idx3-ubyte[.gz] and the three other idx files")
    paths = {k: _find(directory, stem) for k, stem in FASHION_FILES.items()}
    tx, vx = _images(paths["train_x"]), _images(paths["test_x"])
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(f"{paths['train_x']} holds {tuple(tx.shape[2:])} images but {paths['test_x']} holds "
                        f"{tuple(vx.shape[2:])} images; train and test images must have one size")
    ty = _labels(paths["train_y"], len(tx), paths["train_x"], 10)
    vy = _labels(paths["test_y"], len(vx), paths["test_x"], 10)
    tx, vx = _normalise(tx, vx, paths["train_x"])
    return Dataset("fashion-mnist", tx, ty, vx, vy, 10)


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


def split_validation(data: Dataset, count: int, seed: int = 0):
    """Hold out ``count`` training images, chosen by a fixed permutation from ``seed``, as a validation set.

    Returns ``(data with the remaining training images, val_x, val_y)``; the test images are untouched (the
    paper's Fashion-MNIST split is 54,000 train / 6,000 validation / 10,000 test)."""
    if not 0 < count < len(data.train_y):
        raise ValueError(f"validation_images must lie in (0, {len(data.train_y)}) for this data set, got {count}")
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count], order[count:]
    rest = Dataset(data.name, data.train_x[kept], data.train_y[kept], data.test_x, data.test_y, data.num_classes)
    return rest, data.train_x[held], data.train_y[held]


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
