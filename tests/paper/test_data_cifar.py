"""CIFAR-10 batches: read from a fixture in the real format, refuse anything but arrays."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from iif.errors import InputError
from iif_paper.data.cifar import load_cifar10, read_batch, write_fake_cifar10


def test_reads_the_real_layout(tmp_path):
    folder = write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    x, y = load_cifar10("train", folder)
    assert x.shape == (100, 3, 32, 32) and x.dtype == np.float32 and x.max() <= 1
    assert y.shape == (100,) and y.dtype == np.int64
    xt, _ = load_cifar10("test", folder)
    assert xt.shape == (20, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(read_batch(folder / "test_batch")[0].reshape(20, -1),
                                  raw[b"data"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_refuses_objects_that_could_run_code(tmp_path):
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}, f)
    with pytest.raises(InputError, match="refusing to load"):
        read_batch(tmp_path / "data_batch_1")


def test_missing_folder_and_files_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("IIF_CIFAR10_DIR", raising=False)
    with pytest.raises(InputError, match="IIF_CIFAR10_DIR"):
        load_cifar10("train")
    with pytest.raises(InputError, match="data_batch_1"):
        load_cifar10("train", tmp_path)
