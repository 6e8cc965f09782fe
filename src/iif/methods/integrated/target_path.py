"""Target paths and path models (paper Eq. 14-16).

rho_i(t_k) = (k/K) y_i + (1 - k/K) ybar_i for k = 0..K. For classification with ``sparse``
(appendix E, on by default) only the true-class coordinate is kept: rho <- rho * y, so the
loss along the path is ``-rho_{i,c} log p_c``.

Path models: theta_K = theta*, and theta_k is ``epochs`` epochs of the recipe's optimizer on
the dataset Gamma(t_k) = {(x_i, rho_i(t_k))}, starting from theta_{k+1}. Those epochs are
training: train mode as in the recipe (dropout on; BatchNorm on batch statistics, moving the
path model's own running statistics, which theta_k carries; see ``iif.engine.training.fit``), while
the features at theta_k are taken in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from iif.engine.functional import ModelState
from iif.engine.stacked import StackedState
from iif.engine.training import FitResult
from iif.errors import InputError
from iif.task.task import Task
from iif.validation import Settings, setting


@dataclass
class PathSettings(Settings):
    """The target path and its path models.

    K = 3 with one epoch and sparse targets was chosen on the tuning half of
    ``benchmarks/bench_quality.py`` (docs/quality.md): K = 5 and three epochs per path model
    gave the same LDS at up to twice the time, dense targets 0.15 less."""

    section = "[path]"

    steps: int = setting(3, ge=1, doc="K, the number of steps (path models) from the baseline "
                         "targets to the true ones")
    epochs: int = setting(1, ge=0, doc="training epochs of each path model on its targets")
    lr: float | None = setting(None, gt=0, doc="learning rate of the path epochs (None: the "
                               "recipe's)")
    batch_size: int | None = setting(None, ge=1, doc="minibatch size of the path epochs "
                                     "(None: the recipe's)")
    sparse: bool = setting(True, doc="classification (per token for sequences): keep only the "
                           "true-class coordinate of the path targets (appendix E)")
    # one more path model per test batch (about a quarter of the default path's training)
    measure_end: bool = setting(True, doc="train the path's end theta_0 on the baseline "
                                "targets, as the path models are trained, to report "
                                "delta_path = L(theta*) - L(theta_0), what the K steps add up "
                                "to, beside the baseline's delta")


class TargetPath:
    """The K+1 datasets' targets between ``baseline`` (k=0) and ``targets`` (k=K).

    ``baseline`` is (N, d), or (B, N, d) for B paths side by side (one per model copy of a
    :class:`iif.engine.stacked.StackedState`); ``path(k)`` then has the same leading dimension.
    """

    def __init__(self, task: Task, targets: torch.Tensor, baseline: torch.Tensor,
                 steps: int, sparse: bool):
        if baseline.shape[-2:] != targets.shape or baseline.dim() not in (2, 3):
            raise InputError(
                f"baseline targets have shape {tuple(baseline.shape)}, expected "
                f"{tuple(targets.shape)}"
            )
        if not bool(torch.isfinite(baseline).all()):
            raise InputError("baseline targets contain NaN or inf")
        self.targets = targets
        self.baseline = baseline.to(targets.dtype)
        self.steps = int(steps)
        self.sparse = bool(sparse) and task.kind in ("classification", "sequence")

    def __call__(self, k: int) -> torch.Tensor:
        t = k / self.steps
        rho = t * self.targets + (1.0 - t) * self.baseline
        return rho * self.targets if self.sparse else rho


def path_models(
    fit: Callable[..., list[FitResult]],
    state: ModelState | StackedState,
    x: torch.Tensor,
    path: TargetPath,
    settings: PathSettings,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[int, ModelState | StackedState]]:
    """Yield (k, theta_k) for k = K, K-1, ..., 1, training each from the previous one with
    ``fit`` (``Engine.fit``: one result per copy).

    A :class:`StackedState` of B copies walks B paths (``path`` with a (B, N, d) baseline)
    sharing the minibatch order.
    """
    current = state
    for k in range(path.steps, 0, -1):
        if k < path.steps and settings.epochs > 0:
            results = fit(current, x, path(k), epochs=settings.epochs, lr=settings.lr,
                          batch_size=settings.batch_size, generator=generator)
            if not all(r.finite for r in results):
                raise InputError(
                    f"path model {k} of {path.steps} diverged (NaN/inf); lower the path "
                    f"learning rate or the number of path epochs"
                )
            current = (StackedState.stack([r.state for r in results])
                       if isinstance(current, StackedState) else results[0].state)
        yield k, current
