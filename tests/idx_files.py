"""Writing data sets in the idx format (Fashion-MNIST's), so that tests can feed the loaders any directory."""
import gzip

import numpy as np


def write_idx(path, array):
    """One gzipped idx file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_random_dataset(directory, train: int, test: int, size: int, seed: int = 0):
    """The four standard files of a random image set (``size``×``size``, 10 classes): the loader's whole input
    without scikit-learn's import time."""
    rng = np.random.default_rng(seed)
    write_idx(directory / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (train, size, size)))
    write_idx(directory / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (train,)))
    write_idx(directory / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (test, size, size)))
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (test,)))
