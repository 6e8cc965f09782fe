"""Mislabel detection (DESIGN §3): flip a fraction of the labels, train on the noisy labels,
rank the training samples by self-influence and measure how well the flipped ones come first.

Convention: scores follow the project's sign (positive = including the sample raises the test
loss). A mislabelled sample has to be memorised: including it lowers its own loss the most, so
its self-influence is the most *negative*. The detection score is ``-self_influence`` and the
ranking inspects the most negative self-influence first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from iif.errors import InputError
from iif.evaluation.metrics import auc


def _as_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"labels must be a non-empty 1-d array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError("labels must be integer class indices")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"labels must be integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def flip_labels(
    labels: Any, fraction: float = 0.1, num_classes: int | None = None, seed: int = 0
) -> tuple[Any, Any]:
    """Give exactly ``round(fraction * n)`` randomly chosen samples a different class.

    ``labels`` (n,) integer classes 0..C-1 (C = ``num_classes`` or ``max(labels) + 1``). Each
    chosen sample gets a class drawn uniformly among the C - 1 others. Returns
    ``(noisy_labels (n,), flipped_mask (n,) bool)``: torch tensors (labels' dtype and device)
    for a tensor input, numpy arrays otherwise.
    """
    arr = _as_labels(labels)
    n = arr.size
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0 <= fraction <= 1:
        raise InputError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if arr.min() < 0:
        raise InputError(f"labels must be >= 0, found {int(arr.min())}")
    n_cls = int(arr.max()) + 1 if num_classes is None else num_classes
    if isinstance(n_cls, bool) or not isinstance(n_cls, (int, np.integer)) or n_cls < 2:
        raise InputError(f"need at least 2 classes to flip labels, got {n_cls!r}")
    if arr.max() >= n_cls:
        raise InputError(f"labels out of range: found {int(arr.max())} with {n_cls} classes")
    count = int(round(fraction * n))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=count, replace=False)
    noisy = arr.copy()
    noisy[chosen] = (arr[chosen] + rng.integers(1, n_cls, size=count)) % n_cls
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    if isinstance(labels, torch.Tensor):
        return (torch.as_tensor(noisy, device=labels.device).to(labels.dtype),
                torch.as_tensor(mask, device=labels.device))
    return noisy, mask


def _pair(self_influence: Any, flipped_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(self_influence, torch.Tensor):
        self_influence = self_influence.detach().cpu().numpy()
    if isinstance(flipped_mask, torch.Tensor):
        flipped_mask = flipped_mask.detach().cpu().numpy()
    si, mask = np.asarray(self_influence, dtype=float), np.asarray(flipped_mask)
    if si.ndim != 1 or mask.shape != si.shape or mask.dtype != bool:
        raise InputError(f"need 1-d self-influence and a boolean mask of the same length, got "
                         f"{si.shape} and {mask.dtype} {mask.shape}")
    if not np.all(np.isfinite(si)):
        raise InputError("self-influence contains NaN or inf")
    return si, mask


def mislabel_auc(self_influence: Any, flipped_mask: Any) -> float:
    """ROC AUC of detecting the flipped samples with score ``-self_influence`` (both (n,))."""
    si, mask = _pair(self_influence, flipped_mask)
    return auc(-si, mask)


def detection_curve(
    self_influence: Any, flipped_mask: Any,
    fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
) -> dict[float, float]:
    """Share of the flipped samples found among the ``x * n`` samples (rounded half up, at
    least one) of most negative self-influence, for every x in ``fractions``: ``{x: found}``.
    Inputs are (n,); ties keep index order."""
    si, mask = _pair(self_influence, flipped_mask)
    total = int(mask.sum())
    if total == 0:
        raise InputError("no sample is flipped")
    order = np.argsort(si, kind="stable")
    found = np.cumsum(mask[order])
    curve = {}
    for x in fractions:
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating)) or not 0 < x <= 1:
            raise InputError(f"fractions must be in (0, 1], got {x!r}")
        k = max(1, int(np.floor(float(x) * si.size + 0.5)))
        curve[float(x)] = float(found[k - 1]) / total
    return curve
