"""The shape IF, TracIn and TRAK share: ``scores = -(test features) . solve(training features)``.

One :class:`KernelEstimator` per model (and per checkpoint for TracIn) holds the parts:

- the training features of this process's block (the engine shards them): stored ``(N, D)``,
  or recomputed ``chunk_size`` samples at a time from ``featurise`` when they are not kept
  (IF's ``cg`` solver, TracIn);
- the solve ``v -> K v`` on (D, r) columns: the identity (TracIn), the damped curvature (IF),
  TRAK's kernel;
- ``featurise(x, targets) -> (n, D)``, the same features for test samples, or
  ``test_featurise``: the gradients of the task's measurement (IF, TracIn) when it is not the
  loss.

:meth:`KernelEstimator.products` gives ``phi_s^T K phi_i`` (n_test, N) over the whole training
set (gathered across processes), :meth:`KernelEstimator.self_products` the diagonal
``phi_i^T K phi_i``. The methods weigh them: IF by ``-1/N``, TracIn by ``-lr_c`` summed over
checkpoints (:func:`weighted_sum`), TRAK by its ensemble means of the kernel part and of the
weights (:func:`ensemble_scores`). Products run in float64 (``iif.engine.linalg.rows_times``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from iif.engine.engine import Engine
from iif.engine.linalg import SOLVE_DTYPE, rows_times

Solve = Callable[[torch.Tensor], torch.Tensor]
Featurise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def identity(rhs: torch.Tensor) -> torch.Tensor:
    """The solve of TracIn: ``K = I``."""
    return rhs


@dataclass
class KernelEstimator:
    """One model's training features, solve and featuriser (see the module docstring).

    ``features``: this process's training features, or None to recompute them from
    ``featurise`` chunk by chunk (then one process: the training set is not sharded).
    """

    engine: Engine
    featurise: Featurise
    solve: Solve
    features: torch.Tensor | None = None
    test_featurise: Featurise | None = None

    def train_chunks(self, idx: np.ndarray, step: int | None = None
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(lo, rows)``: the training features of samples ``idx[lo:lo + step]`` (default
        step: the budget's chunk size), from the stored features or recomputed."""
        train = self.engine.train
        step = self.engine.budget.chunk_size if step is None else step
        for lo in range(0, idx.size, step):
            if self.features is not None:
                yield lo, self.features[torch.as_tensor(idx[lo : lo + step])]
            else:
                rows = torch.as_tensor(idx[lo : lo + step], device=train.x.device)
                yield lo, self.featurise(train.x[rows], train.targets[rows])

    def test_features(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        featurise = self.featurise if self.test_featurise is None else self.test_featurise
        return featurise(x, targets)

    def products(self, test_features: torch.Tensor) -> torch.Tensor:
        """``phi_s^T K phi_i`` (n_test, N) in float64 for test features (n_test, D)."""
        sol = self.solve(test_features.T)  # (D, n_test)
        if self.features is not None:
            block = rows_times(self.features, sol)
        else:
            everything = np.arange(len(self.engine.train))
            block = torch.cat([rows_times(rows, sol) for _, rows in self.train_chunks(everything)])
        return self.engine.gather_columns(block.T)

    def self_products(self, idx: np.ndarray, step: int | None = None) -> torch.Tensor:
        """``phi_i^T K phi_i`` (len(idx),) in float64 for training samples ``idx``."""
        out = torch.empty(idx.size, dtype=SOLVE_DTYPE, device=self.engine.train.x.device)
        for lo, rows in self.train_chunks(idx, step):
            g = rows.to(SOLVE_DTYPE)
            sol = self.solve(g.T)  # (D, c)
            out[lo : lo + g.shape[0]] = (g * sol.T.to(g.device)).sum(1)
        return out


def weighted_sum(terms: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``-sum_k w_k products_k``, accumulated in order (TracIn: ``w_k`` the learning rate of
    checkpoint k)."""
    total: torch.Tensor | None = None
    for weight, products in terms:
        if total is None:
            total = torch.zeros_like(products)
        total -= weight * products
    if total is None:
        raise ValueError("weighted_sum of no terms")
    return total


def ensemble_scores(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """TRAK's ensemble estimator ``-[mean_m kernel_m] * [mean_m w_m]`` from each model's
    kernel part (..., N) and training weights (N,) (or (n,) each for self-influence)."""
    kernel = sum(k for k, _ in parts) / len(parts)
    weights = sum(w for _, w in parts) / len(parts)
    return -kernel * (weights[None, :] if kernel.ndim == 2 else weights)
