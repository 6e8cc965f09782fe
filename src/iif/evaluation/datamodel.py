"""The datamodel ceiling (DESIGN §3): the best additive attribution a regression can find.

A linear datamodel (Ilyas et al. 2022) predicts each test sample's loss from which training
samples a model was trained on: ``loss[m, s] ~ b_s + sum_i scores[s, i] * z[m, i]`` with
``z[m]`` the membership (0/1) of subset ``S_m``. Fitted by ridge regression on subsets of its
own, it is scored with the same LDS as every method, on *separate* evaluation subsets; it bounds
what any additive attribution can reach there, up to its own estimation noise.

Scores follow the project's sign convention: ``scores[s, i] > 0`` means including training
sample i raises the loss of test sample s.

Identifiability: when every fitting subset has the same size (``random_subsets`` draws exactly
``round(fraction * N)`` samples), a constant added to every score and subtracted ``size`` times
from the intercept predicts the same losses, so the data cannot fix that constant. The ridge
solution then has scores with mean zero over the training samples (the minimum-norm choice);
rankings within a test sample and the LDS are unaffected. With subsets of varying size the
scores are fully determined.
"""

from __future__ import annotations

import numpy as np

from iif.errors import InputError
from iif.evaluation.metrics import LDSResult, lds

__all__ = ["datamodel_lds", "fit_datamodel", "ridge_grid"]

# Candidate ridge strengths for leave-one-out selection, as multiples of the mean squared
# singular value of the centred membership matrix (scale-free); 0 is plain least squares.
_RELATIVE_GRID = np.concatenate([[0.0], np.logspace(-4, 2, 13)])


def ridge_grid(subsets: np.ndarray) -> np.ndarray:
    """The ridge strengths ``fit_datamodel`` chooses from for these fitting subsets."""
    z = _membership(subsets, "subsets")
    _, s, _ = _svd(z - z.mean(0))
    return _RELATIVE_GRID * float(np.mean(s**2)) if s.size else np.zeros(1)


def fit_datamodel(
    subsets: np.ndarray, losses: np.ndarray, ridge: float | None = None
) -> np.ndarray:
    """Datamodel scores (n_test, N) from a ridge regression of losses on subset membership.

    Args:
        subsets: (M, N) boolean membership of the fitting subsets.
        losses: (M, n_test) test losses of the models trained on them.
        ridge: lambda of ``|Z_c b - L_c|^2 + lambda |b|^2`` with ``Z_c``, ``L_c`` the centred
            membership and losses (so the intercept is not penalised); None chooses it per
            test sample by exact leave-one-out cross-validation over the fitting subsets,
            from :func:`ridge_grid`.

    Returns:
        scores (n_test, N): ``scores[s, i] > 0`` means including sample i raises the loss.
    """
    scores, _, _ = _fit(subsets, losses, ridge)
    return scores


def datamodel_lds(
    fit_subsets: np.ndarray,
    fit_losses: np.ndarray,
    eval_subsets: np.ndarray,
    eval_losses: np.ndarray,
    ridge: float | None = None,
) -> LDSResult:
    """LDS on the evaluation subsets of a datamodel fitted on the fitting subsets.

    The two sets of subsets must be different draws: a datamodel scored on the subsets it was
    fitted to measures its fit, not a ceiling. ``info`` holds the number of fitting subsets and
    the median chosen ridge.
    """
    fit_z = _membership(fit_subsets, "fit_subsets")
    eval_z = _membership(eval_subsets, "eval_subsets")
    if fit_z.shape == eval_z.shape and np.array_equal(fit_z, eval_z):
        raise InputError("the datamodel must be fitted on subsets separate from the "
                         "evaluation subsets (the two are identical)")
    scores, _, ridges = _fit(fit_subsets, fit_losses, ridge)
    result = lds(scores, eval_subsets, eval_losses)
    result.info.update({"n_fit_subsets": int(fit_z.shape[0]),
                        "ridge_median": float(np.median(ridges))})
    return result


# ---- helpers ---------------------------------------------------------------------------------
def _membership(subsets: np.ndarray, name: str) -> np.ndarray:
    z = np.asarray(subsets)
    if z.dtype != bool or z.ndim != 2:
        raise InputError(f"{name} must be a boolean (M, N) membership matrix")
    if z.shape[0] < 3 or z.shape[1] < 1:
        raise InputError(f"{name} needs at least 3 subsets of at least 1 sample, got {z.shape}")
    return z.astype(np.float64)


def _svd(zc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``zc = U diag(s) V^T`` without its null directions, through the eigenvectors
    of the N x N Gram matrix (much faster than LAPACK's SVD for M >> N, and accurate here:
    the centred membership matrix is well conditioned apart from its exact null space)."""
    if zc.shape[0] < zc.shape[1]:
        u, s, vt = np.linalg.svd(zc, full_matrices=False)
    else:
        eig, v = np.linalg.eigh(zc.T @ zc)
        eig = np.clip(eig, 0.0, None)
        s, vt = np.sqrt(eig), v.T
        u = None
    keep = s > s.max(initial=0.0) * 1e-6
    s, vt = s[keep], vt[keep]
    u = zc @ vt.T / s if u is None else u[:, keep]
    return u, s, vt


def _fit(
    subsets: np.ndarray, losses: np.ndarray, ridge: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (n_test, N), intercepts (n_test,) and the ridge used per test sample."""
    z = _membership(subsets, "subsets")
    y = np.asarray(losses, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] != z.shape[0]:
        raise InputError(f"losses must be (M, n_test) with M = {z.shape[0]}, got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise InputError("losses contain NaN or inf")
    if ridge is not None and not (np.isfinite(ridge) and ridge >= 0):
        raise InputError(f"ridge must be a finite number >= 0 or None, got {ridge!r}")
    m = z.shape[0]
    z_mean, y_mean = z.mean(0), y.mean(0)
    u, s, vt = _svd(z - z_mean)
    uty = u.T @ (y - y_mean)  # (k, n_test)
    if ridge is not None:
        ridges = np.full(y.shape[1], float(ridge))
    else:
        grid = _RELATIVE_GRID * float(np.mean(s**2)) if s.size else np.zeros(1)
        errors = np.empty((grid.size, y.shape[1]))
        u2 = u * u
        for g, alpha in enumerate(grid):
            shrink = s**2 / (s**2 + alpha)
            fitted = u @ (shrink[:, None] * uty)
            # hat matrix of ridge with an unpenalised intercept: 1 1^T / M + U diag(shrink) U^T
            leverage = u2 @ shrink + 1.0 / m
            residual = (y - y_mean - fitted) / np.maximum(1.0 - leverage, 1e-12)[:, None]
            errors[g] = np.mean(residual**2, axis=0)
        ridges = grid[np.argmin(errors, axis=0)]
    # coefficients column by column (each test sample may have its own ridge)
    factors = s[:, None] / (s[:, None] ** 2 + ridges[None, :])  # (k, n_test)
    coef = vt.T @ (factors * uty)  # (N, n_test)
    intercept = y_mean - z_mean @ coef
    return coef.T, intercept, ridges
