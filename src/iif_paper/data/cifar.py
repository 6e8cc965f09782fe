"""CIFAR-10 from a user's ``cifar-10-batches-py`` folder, read without trusting its pickles.

The folder holds Python pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``), each a
dict with ``data`` (10000 x 3072 uint8) and ``labels``. They are read with a restricted
unpickler that only rebuilds dicts, lists, strings, numbers and plain numpy arrays: any other
object in the file (which could run code when unpickled) is refused with a clear error.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from iif.errors import InputError

ENV_VAR = "IIF_CIFAR10_DIR"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")

# The only globals a CIFAR-10 batch needs: numpy's array reconstruction (old and new module
# paths) and its dtype. Nothing that can call arbitrary code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 pickles the raw bytes of an array (protocol 2)
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise InputError(f"refusing to load {module}.{name} from a CIFAR-10 batch: only plain "
                         f"arrays and containers are allowed")


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images (n, 3, 32, 32) uint8 and labels (n,) int64."""
    with open(path, "rb") as f:
        try:
            batch = _SafeUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise InputError(f"{path} is not a readable CIFAR-10 batch: {exc}") from None
    if not isinstance(batch, dict):
        raise InputError(f"{path}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise InputError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise InputError(f"{path}: data {data.shape} and labels {labels.shape} do not form a "
                         f"CIFAR-10 batch")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str = "train",
                 root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 in [0, 1] of shape (n, 3, 32, 32) and labels int64; ``root`` defaults to
    ``$IIF_CIFAR10_DIR``."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else cifar10_dir()
    if folder is None:
        raise InputError(f"no CIFAR-10 folder: pass root= or set ${ENV_VAR} to a "
                         f"cifar-10-batches-py folder")
    names = TRAIN_FILES if split == "train" else TEST_FILES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(f"CIFAR-10 files {missing} not found in {folder}")
    parts = [read_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    return images, np.concatenate([p[1] for p in parts])


def cifar10_dir() -> Path | None:
    """``$IIF_CIFAR10_DIR`` when it names a folder, else None."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value and Path(value).is_dir() else None


def write_fake_cifar10(folder: str | os.PathLike, per_batch: int = 20, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py`` folder of random images in the real layout (pickled dicts
    with bytes keys), for tests and demos without the real files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_FILES + TEST_FILES:
        batch = {b"batch_label": name.encode(),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder
