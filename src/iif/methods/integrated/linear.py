"""Closed-form Integrated Influence for linear least squares (DESIGN §2, "Linear regression").

Model: ``f(x; theta) = theta^T x`` with ``theta`` of shape (D, d) and no bias (append a column
of ones to ``X`` for one). Per-sample loss ``l(f, rho) = mean_j (f_j - rho_j)**2``, training
loss the mean over the N samples, test loss the per-sample loss of one test sample.

For targets ``rho`` the minimiser is ``theta(rho) = (X^T X)^{-1} X^T rho``, linear in ``rho``.
Along the linear target path ``rho_i(t) = t y_i + (1 - t) ybar_i`` the parameters are linear in
``t``, so are the test residuals ``r(t) = theta(t)^T xhat - yhat`` and the test gradient
``G(t)``. With ``h_i = xhat^T (X^T X)^{-1} x_i`` the integrand of
``I(i) = -int_0^1 G(t)^T H^{-1} (1/N) J_i rho_i'(t) dt`` is
``(2/d) sum_j r_j(t) h_i (y_ij - ybar_ij)``, and its exact integral replaces ``r_j(t)`` by its
average ``(r_j(1) + r_j(0)) / 2``. Then ``sum_i I(i) = L_test(theta*) - L_test(theta')`` holds
exactly, with ``theta' = theta(ybar)`` the least-squares fit of the baseline targets.

Sign convention (the project's): ``I(i) > 0`` means including training sample i raises the
test loss; ``I(i) < 0`` means it lowers it.

All computations are float64 numpy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "linear_delta",
    "linear_fit",
    "linear_iif",
    "linear_test_losses",
    "linear_unlearning_baseline",
]


def _as_design(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, D) with n >= 1, got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or inf")
    return X


def _as_targets(y, n: int, name: str) -> np.ndarray:
    """Targets as (n, d) float64."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, d), got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contains NaN or inf")
    return y


def _gram(X: np.ndarray) -> np.ndarray:
    gram = X.T @ X
    if np.linalg.matrix_rank(gram) < X.shape[1]:
        raise ValueError(
            "X^T X is singular: the least-squares minimiser is not unique "
            f"(rank {np.linalg.matrix_rank(gram)} < {X.shape[1]} features)"
        )
    return gram


def linear_fit(X, targets) -> np.ndarray:
    """Least-squares parameters ``theta = (X^T X)^{-1} X^T targets``.

    Args:
        X: (N, D) training inputs.
        targets: (N,) or (N, d) targets.

    Returns:
        theta of shape (D, d).
    """
    X = _as_design(X, "X")
    t = _as_targets(targets, X.shape[0], "targets")
    return np.linalg.solve(_gram(X), X.T @ t)


def linear_test_losses(theta, X_test, y_test) -> np.ndarray:
    """Per-sample test losses ``mean_j (theta^T xhat - yhat)_j**2``, shape (n_test,).

    Args:
        theta: (D, d) or (D,) parameters.
        X_test: (n_test, D) inputs.
        y_test: (n_test,) or (n_test, d) targets.
    """
    X_test = _as_design(X_test, "X_test")
    theta = np.asarray(theta, dtype=np.float64)
    theta = theta[:, None] if theta.ndim == 1 else theta
    y_test = _as_targets(y_test, X_test.shape[0], "y_test")
    return np.mean((X_test @ theta - y_test) ** 2, axis=1)


def _baselines(baseline_targets, n_test: int, n: int, d: int) -> np.ndarray:
    """Baseline targets as (n_test, N, d): shared (N,)/(N, d) or per test (n_test, N, d)."""
    b = np.asarray(baseline_targets, dtype=np.float64)
    if b.ndim == 3:
        if b.shape != (n_test, n, d):
            raise ValueError(
                f"per-test baseline targets must have shape ({n_test}, {n}, {d}), got {b.shape}"
            )
    else:
        b = _as_targets(b, n, "baseline_targets")
        if b.shape[1] != d:
            raise ValueError(f"baseline_targets must have {d} values per sample, got {b.shape}")
        b = np.broadcast_to(b, (n_test, n, d))
    if not np.all(np.isfinite(b)):
        raise ValueError("baseline_targets contains NaN or inf")
    return b


def linear_iif(X, y, X_test, y_test, baseline_targets, steps: int | None = None) -> np.ndarray:
    """Integrated Influence of every training sample on every test sample, in closed form.

    Args:
        X: (N, D) training inputs (X^T X must be invertible).
        y: (N,) or (N, d) training targets.
        X_test: (n_test, D) test inputs.
        y_test: (n_test,) or (n_test, d) test targets.
        baseline_targets: ybar, shared by all test samples with shape (N,) or (N, d), or one
            baseline per test sample with shape (n_test, N, d).
        steps: None for the exact integral over t in [0, 1]; an integer K for the discrete
            sum of Definition 2.4 with right end points ``t_k = k / K``, k = 1..K (the value a
            K-step engine with exact path models and exact curvature computes).

    Returns:
        scores (n_test, N): ``scores[s, i] > 0`` means including training sample i raises the
        loss of test sample s. With ``steps=None``, ``scores[s].sum()`` equals
        ``linear_delta(...)[s]`` up to rounding.
    """
    X = _as_design(X, "X")
    n, dim = X.shape
    y = _as_targets(y, n, "y")
    d = y.shape[1]
    X_test = _as_design(X_test, "X_test")
    if X_test.shape[1] != dim:
        raise ValueError(f"X_test has {X_test.shape[1]} features, X has {dim}")
    y_test = _as_targets(y_test, X_test.shape[0], "y_test")
    if y_test.shape[1] != d:
        raise ValueError(f"y_test has {y_test.shape[1]} values per sample, y has {d}")
    ybar = _baselines(baseline_targets, X_test.shape[0], n, d)  # (n_test, N, d)
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps!r}")

    gram = _gram(X)
    h = np.linalg.solve(gram, X_test.T).T @ X.T  # (n_test, N): xhat^T (X^T X)^{-1} x_i
    theta_star = np.linalg.solve(gram, X.T @ y)  # (D, d)
    r_star = X_test @ theta_star - y_test  # (n_test, d)
    # theta' per test sample: least squares on its baseline targets.
    theta_prime = np.linalg.solve(gram, np.einsum("nD,snd->sDd", X, ybar))  # (n_test, D, d)
    r_prime = np.einsum("sD,sDd->sd", X_test, theta_prime) - y_test  # (n_test, d)
    if steps is None:
        weight = 0.5
    else:
        k = int(steps)
        weight = (k + 1) / (2.0 * k)  # mean of t_k = k/K over k = 1..K
    r_mean = r_prime + weight * (r_star - r_prime)  # (n_test, d): mean residual over the path
    dy = y[None] - ybar  # (n_test, N, d)
    return (2.0 / d) * h * np.einsum("sd,snd->sn", r_mean, dy)


def linear_delta(X, y, X_test, y_test, baseline_targets) -> np.ndarray:
    """``L_test(theta*) - L_test(theta')`` per test sample, shape (n_test,).

    theta* is the least-squares fit of ``y``, theta' that of the baseline targets (shared
    (N,)/(N, d) or per test sample (n_test, N, d)). Positive when the baseline model does better
    on the test sample than the trained one.
    """
    X = _as_design(X, "X")
    y = _as_targets(y, X.shape[0], "y")
    X_test = _as_design(X_test, "X_test")
    y_test = _as_targets(y_test, X_test.shape[0], "y_test")
    ybar = _baselines(baseline_targets, X_test.shape[0], X.shape[0], y.shape[1])
    gram = _gram(X)
    theta_star = np.linalg.solve(gram, X.T @ y)
    theta_prime = np.linalg.solve(gram, np.einsum("nD,snd->sDd", X, ybar))
    loss_star = np.mean((X_test @ theta_star - y_test) ** 2, axis=1)
    pred_prime = np.einsum("sD,sDd->sd", X_test, theta_prime)
    loss_prime = np.mean((pred_prime - y_test) ** 2, axis=1)
    return loss_star - loss_prime


def linear_unlearning_baseline(
    X,
    y,
    x_test,
    y_test,
    lam: float,
    direction: Literal["unlearn", "reinforce"] = "unlearn",
) -> np.ndarray:
    """The exact minimiser theta' of ``L_train(theta) -/+ L_test(theta) / lam`` (Eq. 12).

    ``L_train`` is the mean per-sample loss over the N training samples and ``L_test`` the mean
    per-sample loss over the given test sample(s); ``-`` for ``unlearn``, ``+`` for
    ``reinforce``. Setting the gradient to zero gives, for every output column,
    ``(X^T X / N -/+ Xt^T Xt / (n_t lam)) theta = X^T y / N -/+ Xt^T yt / (n_t lam)``.

    Args:
        X: (N, D) training inputs; y: (N,) or (N, d) training targets.
        x_test: (D,) one test input or (n_t, D) a group; y_test: matching targets.
        lam: lambda > 0.
        direction: ``unlearn`` or ``reinforce``.

    Returns:
        theta' of shape (D, d); the baseline targets are ``X @ theta'``.

    Raises:
        ValueError: if the quadratic has no minimiser (its matrix is not positive definite),
            which for ``unlearn`` happens when lam is too small.
    """
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be positive and finite, got {lam!r}")
    if direction not in ("unlearn", "reinforce"):
        raise ValueError(f"direction must be 'unlearn' or 'reinforce', got {direction!r}")
    X = _as_design(X, "X")
    n, dim = X.shape
    y = _as_targets(y, n, "y")
    xt = np.asarray(x_test, dtype=np.float64)
    yt = np.asarray(y_test, dtype=np.float64)
    if xt.ndim == 1:  # one test sample: its target is a scalar or a (d,) vector
        xt, yt = xt[None], yt.reshape(1, -1)
    xt = _as_design(xt, "x_test")
    if xt.shape[1] != dim:
        raise ValueError(f"x_test has {xt.shape[1]} features, X has {dim}")
    yt = _as_targets(yt, xt.shape[0], "y_test")
    if yt.shape[1] != y.shape[1]:
        raise ValueError(f"y_test has {yt.shape[1]} values per sample, y has {y.shape[1]}")
    sign = -1.0 if direction == "unlearn" else 1.0
    weight = sign / (xt.shape[0] * lam)
    matrix = X.T @ X / n + weight * (xt.T @ xt)
    matrix = 0.5 * (matrix + matrix.T)
    eigs = np.linalg.eigvalsh(matrix)
    scale = max(float(np.abs(eigs).max()), np.finfo(np.float64).tiny)
    if eigs.min() <= 1e-12 * scale:
        raise ValueError(
            f"L_train - L_test/lam has no minimiser at lam={lam}: its quadratic form is not "
            f"positive definite (smallest eigenvalue {eigs.min():.3g}); raise lam"
        )
    rhs = X.T @ y / n + weight * (xt.T @ yt)
    return np.linalg.solve(matrix, rhs)
