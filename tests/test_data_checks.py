"""The idx reader checks magic numbers, shapes, counts and values, and every error names the file."""
import gzip

import numpy as np
import pytest

from edropout.app.data import load_fashion_mnist
from edropout.app.errors import DataError
from idx_files import FILES, write_fashion_like, write_idx


@pytest.fixture
def data_dir(tmp_path):
    return write_fashion_like(tmp_path, n_train=40, n_test=20)


def test_good_files_load(data_dir):
    data = load_fashion_mnist(str(data_dir))
    assert data.train_x.shape == (40, 1, 28, 28) and data.test_y.shape == (20,)


def _replace(data_dir, key, raw: bytes):
    with gzip.open(data_dir / FILES[key], "wb") as f:
        f.write(raw)
    return str(data_dir / FILES[key])


def test_a_wrong_magic_number_is_refused_naming_the_file(data_dir):
    path = _replace(data_dir, "train_x", b"\x1f\x8b\x08\x03" + bytes(100))
    with pytest.raises(DataError, match=f"{path} is not an idx file: its magic number is 1f8b0803"):
        load_fashion_mnist(str(data_dir))


def test_a_labels_file_passed_as_images_is_refused(data_dir):
    write_idx(data_dir / FILES["train_x"], np.arange(40) % 10)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz holds a 1-dimensional array, but images "
                                        r"\[N, H, W\] must be 3-dimensional"):
        load_fashion_mnist(str(data_dir))


def test_a_truncated_file_is_refused(data_dir):
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (40, 28, 28)) + bytes(40 * 28 * 28 - 5)
    path = _replace(data_dir, "train_x", raw)
    with pytest.raises(DataError, match=f"{path}: its header announces shape \\(40, 28, 28\\) \\(31360 bytes of "
                                        f"data\\) but the file holds 31355 bytes"):
        load_fashion_mnist(str(data_dir))


@pytest.mark.parametrize("split", ["train", "test"])
def test_images_and_labels_must_have_the_same_count(split, data_dir):
    n = 40 if split == "train" else 20
    write_idx(data_dir / FILES[f"{split}_y"], np.arange(n - 7) % 10)
    with pytest.raises(DataError, match=f"{FILES[split + '_x']} holds {n} images but .*{FILES[split + '_y']} "
                                        f"holds {n - 7} labels"):
        load_fashion_mnist(str(data_dir))


def test_labels_out_of_range_are_refused(data_dir):
    write_idx(data_dir / FILES["test_y"], np.arange(20))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels must lie in \[0, 10\), got \[0, 19\]"):
        load_fashion_mnist(str(data_dir))


def test_constant_images_are_refused_naming_the_file(data_dir):
    write_idx(data_dir / FILES["train_x"], np.full((40, 28, 28), 7))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: every training pixel has the same value"):
        load_fashion_mnist(str(data_dir))


def test_non_finite_images_are_refused_naming_the_file(data_dir):
    images = np.random.default_rng(0).random((20, 28, 28)).astype(np.float32)
    images[3, 4, 5] = np.nan
    images[0, 0, 0] = np.inf
    write_idx(data_dir / FILES["test_x"], images, ">f4")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: 2 pixels are NaN or infinite"):
        load_fashion_mnist(str(data_dir))


def test_images_must_be_square(data_dir):
    write_idx(data_dir / FILES["train_x"], np.zeros((40, 28, 20)))
    with pytest.raises(DataError, match="images of 28×20 pixels; the models take square images"):
        load_fashion_mnist(str(data_dir))
