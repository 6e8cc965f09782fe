"""MNIST from the canonical gzip-compressed IDX files in a local folder."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ENV_VAR = "IIF_MNIST_DIR"


def default_mnist_dir() -> Path:
    """``$IIF_MNIST_DIR`` if set, else ``../shared/data/mnist`` beside the working copy."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / "mnist"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data" / "mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if type_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code {type_code:#x}")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    arr = np.frombuffer(data, dtype=dtypes[type_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(tuple(dims))


def load_mnist(
    split: str = "train", root: str | os.PathLike | None = None, flatten: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 1], shape (n, 784) (or (n, 1, 28, 28)), labels int64."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else default_mnist_dir()
    images_name, labels_name = FILES[split]
    for name in (images_name, labels_name):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"MNIST file {folder / name} not found; point root= or ${ENV_VAR} at a folder "
                f"holding the canonical IDX files"
            )
    images = read_idx(folder / images_name).astype(np.float32) / 255.0
    labels = read_idx(folder / labels_name).astype(np.int64)
    images = images.reshape(len(images), -1) if flatten else images[:, None]
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as a gzip-compressed IDX file (the format ``read_idx`` reads), e.g.
    to make an MNIST-format fixture or a subset of a local copy."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {arr.dtype}")
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    path = Path(path)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    return path


def write_fake_mnist(folder: str | os.PathLike, n_train: int = 600, n_test: int = 100,
                     seed: int = 0) -> Path:
    """A small MNIST-format folder of class-dependent random images (for tests and demos
    without the real files): each class is a noisy copy of its own random template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.25
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        noise = rng.random((n, 28, 28)) < 0.1
        images = (templates[labels] ^ noise).astype(np.uint8) * 255
        write_idx(folder / FILES[split][0], images)
        write_idx(folder / FILES[split][1], labels)
    return folder
