"""MNIST IDX files: writing and reading round-trip, the fake-MNIST fixture, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from iif_paper.data import load_mnist
from iif_paper.data.mnist import read_idx, write_fake_mnist, write_idx


def test_idx_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "b.gz", arr.astype(np.int32))


def test_fake_mnist_loads_like_mnist(tmp_path):
    write_fake_mnist(tmp_path, n_train=50, n_test=20)
    x, y = load_mnist("train", root=tmp_path)
    assert x.shape == (50, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (50,) and y.dtype == np.int64 and y.max() < 10
    assert load_mnist("test", root=tmp_path, flatten=False)[0].shape == (20, 1, 28, 28)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist("train", root=tmp_path)
