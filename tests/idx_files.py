"""Small idx files written into a temporary directory, read back through the real Fashion-MNIST loader (imported
as ``idx_files``): no test depends on data outside the repository."""
import gzip

import numpy as np

FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
         "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}


def write_idx(path, array, dtype=np.uint8):
    """``array`` as an idx file (gzipped when the name ends in .gz): magic number, big-endian sizes, data."""
    array = np.asarray(array).astype(dtype)
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim]) + b"".join(int(s).to_bytes(4, "big")
                                                                         for s in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_like(directory, n_train=256, n_test=128, size=28, seed=0):
    """The four standard files with random images and learnable labels (a label shifts its image's mean)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = np.clip(rng.normal(100, 40, (n, size, size)) + 12 * labels[:, None, None], 0, 255)
        write_idx(directory / FILES[f"{split}_x"], images)
        write_idx(directory / FILES[f"{split}_y"], labels)
    return directory
