"""scikit-learn's 8x8 digits (1,797 images shipped with scikit-learn): the fast default."""

from __future__ import annotations

import numpy as np


def load_digits(
    n_train: int | None = None, n_test: int | None = 200, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return ``((x_train, y_train), (x_test, y_test))``: float32 pixels in [0, 1] of shape
    (n, 64) and int64 labels, split at random with ``seed``."""
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = n_test or 0
    test, rest = order[:n_test], order[n_test:]
    train = rest if n_train is None else rest[:n_train]
    return (x[train], y[train]), (x[test], y[test])
