"""Evaluation metrics, defined once (DESIGN §3): LDS and mislabel-detection AUC.

LDS: for M random training subsets S_m and the true test losses ``L[m, s]`` of models trained
on them, the attribution predicts ``q[m, s] = sum_{i in S_m} score(i, s)``; the LDS is the mean
over test samples s of Spearman(L[:, s], q[:, s]), reported with its standard error. Scores
follow the project's sign (positive = including i raises the test loss), so a good method has
q increasing with L and a positive LDS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from iif.errors import InputError


@dataclass
class LDSResult:
    """LDS over test samples: ``mean`` and its standard error ``stderr``; ``per_test`` (n_test,)
    Spearman correlations (NaN where a column is constant), ``n_subsets`` M."""

    mean: float
    stderr: float
    per_test: np.ndarray
    n_subsets: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lds": self.mean, "stderr": self.stderr, "n_subsets": self.n_subsets,
                "n_test": int(np.sum(np.isfinite(self.per_test))), **self.info}


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column of ``a`` with the same column of ``b`` (both
    (M, n)), ties ranked by their average; NaN for a constant column."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"spearman_columns needs two (M, n) arrays of one shape, got "
                         f"{a.shape} and {b.shape}")
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / denom, np.nan)


def subset_predictions(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``q[m, s] = sum_{i in S_m} scores[s, i]``: (M, n_test) from scores (n_test, N) and a
    boolean membership matrix (M, N)."""
    scores, subsets = np.asarray(scores, dtype=float), np.asarray(subsets)
    if subsets.dtype != bool:
        raise InputError("subsets must be a boolean (M, N) membership matrix")
    if scores.ndim != 2 or subsets.ndim != 2 or scores.shape[1] != subsets.shape[1]:
        raise InputError(f"scores (n_test, N) and subsets (M, N) disagree: {scores.shape} and "
                         f"{subsets.shape}")
    if not np.all(np.isfinite(scores)):
        raise InputError("scores contain NaN or inf")
    return subsets.astype(float) @ scores.T


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> LDSResult:
    """Linear datamodeling score of ``scores`` (n_test, N) against the true ``losses``
    (M, n_test) of models trained on ``subsets`` (M, N, boolean)."""
    q = subset_predictions(scores, subsets)
    losses = np.asarray(losses, dtype=float)
    if losses.shape != q.shape:
        raise InputError(f"losses must be (M, n_test) = {q.shape}, got {losses.shape}")
    if not np.all(np.isfinite(losses)):
        raise InputError("losses contain NaN or inf (a retrained model diverged?)")
    per_test = spearman_columns(losses, q)
    valid = per_test[np.isfinite(per_test)]
    if valid.size == 0:
        raise InputError("no test sample has a defined Spearman correlation")
    stderr = float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else float("nan")
    return LDSResult(float(valid.mean()), stderr, per_test, int(q.shape[0]))


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney) in O(n log n): the probability that a random positive
    scores above a random negative, ties counting half. Higher score = more likely positive
    (for mislabel detection pass ``-self_influence``)."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives)
    if scores.ndim != 1 or positives.shape != scores.shape or positives.dtype != bool:
        raise InputError("auc needs 1-d scores and a boolean mask of the same length")
    if not np.all(np.isfinite(scores)):
        raise InputError("scores contain NaN or inf")
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("auc needs at least one positive and one negative sample")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def random_subsets(n_subsets: int, n_train: int, fraction: float = 0.5,
                   seed: int = 0) -> np.ndarray:
    """M random subsets of exactly ``round(fraction * N)`` training samples: (M, N) boolean."""
    if isinstance(n_subsets, bool) or int(n_subsets) < 2:
        raise InputError(f"need at least 2 subsets, got {n_subsets!r}")
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {fraction!r}")
    size = int(round(fraction * n_train))
    if not 0 < size < n_train:
        raise InputError(f"fraction {fraction} of {n_train} samples gives an empty or full "
                         f"subset")
    rng = np.random.default_rng(seed)
    out = np.zeros((int(n_subsets), n_train), dtype=bool)
    for m in range(int(n_subsets)):
        out[m, rng.choice(n_train, size, replace=False)] = True
    return out
