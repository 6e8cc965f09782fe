"""Curvature of the training loss and the damped solves ``C^{-1} v``.

Three kinds share one interface (a :class:`Solver` with ``solve``):

- ``fisher``: empirical Fisher ``F = (1/N) sum_i phi_i phi_i^T + delta I`` of the (projected)
  per-sample gradients (paper appendix E); the default.
- ``ggn``: Gauss-Newton ``G = (1/N) sum_i Jt_i^T H_i Jt_i + delta I`` with ``Jt_i`` the
  (projected) output Jacobian and ``H_i`` the loss Hessian in output space, written as a Gram
  matrix of the rows ``Jt_i^T L_i`` where ``L_i L_i^T = H_i``.
- ``hessian``: the explicit Hessian of the mean training loss (small models), projected to
  ``A^T H A`` when a projection is used.

Gram matrices with fewer rows than columns are solved through the Woodbury identity in the
row space, exactly. All solves run in float64 on a Cholesky factor; a factorisation that fails
(not positive definite) is retried with ``retry_factor`` times more damping, and the damping
finally used and the number of retries are reported on the solver.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from iif.errors import CurvatureError, InputError

log = logging.getLogger(__name__)

SOLVE_DTYPE = torch.float64


@dataclass
class CurvatureSettings:
    """``damping=None`` chooses ``default_damping_ratio`` times the mean eigenvalue.

    The mean is taken over ``min(D, M)`` eigenvalues (D the solve dimension, M the number of
    parameters): a projection to P > M dimensions adds only null directions, and counting them
    would shrink the damping as P grows, so projected scores would not approach unprojected ones.
    """

    kind: Literal["fisher", "ggn", "hessian"] = "fisher"
    damping: float | None = None
    default_damping_ratio: float = 0.1
    max_retries: int = 8
    retry_factor: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("fisher", "ggn", "hessian"):
            raise InputError(
                f"curvature must be 'fisher', 'ggn' or 'hessian', got {self.kind!r}"
            )
        if self.damping is not None and not (self.damping >= 0):
            raise InputError(f"damping must be >= 0, got {self.damping!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Solver:
    """``solve(v)`` returns ``(C + damping I)^{-1} v`` for v of shape (D,) or (D, r)."""

    def __init__(self, dim: int, damping: float, retries: int, apply, kind: str):
        self.dim = dim
        self.damping = damping
        self.retries = retries
        self.kind = kind
        self._apply = apply

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if rhs.shape[0] != self.dim:
            raise InputError(f"solve expects {self.dim} rows, got {tuple(rhs.shape)}")
        vec = rhs.ndim == 1
        out = self._apply(rhs.to(SOLVE_DTYPE).reshape(self.dim, -1))
        return out[:, 0] if vec else out

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, "damping": self.damping, "retries": self.retries}


def _damped_cholesky(
    matrix: torch.Tensor, base: float, scale: float, settings: CurvatureSettings, what: str
) -> tuple[torch.Tensor, float, int]:
    """Cholesky of ``matrix + scale * damping * I``, raising the damping until it factors.

    ``base`` is the first damping; ``scale`` maps damping to the diagonal shift (N for the
    Woodbury system, 1 otherwise).
    """
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    damping = base
    for attempt in range(settings.max_retries + 1):
        if attempt:
            nxt = damping * settings.retry_factor if damping > 0 else _tiny(matrix)
            log.info("%s curvature not positive definite at damping %.3g; retrying at %.3g",
                     what, damping, nxt)
            damping = nxt
        factor, info = torch.linalg.cholesky_ex(matrix + (scale * damping) * eye)
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            if attempt:
                log.warning(
                    "%s curvature was not positive definite; solved with damping %.3g after %d "
                    "retr%s", what, damping, attempt, "y" if attempt == 1 else "ies",
                )
            return factor, damping, attempt
    raise CurvatureError(
        f"{what} curvature is not positive definite even with damping {damping:.3g} after "
        f"{settings.max_retries} retries; check the model and data for NaN or raise damping"
    )


def _tiny(matrix: torch.Tensor) -> float:
    mean_eig = float(torch.diagonal(matrix).abs().mean())
    return 1e-6 * mean_eig if mean_eig > 0 else 1e-12


def _default_damping(settings: CurvatureSettings, trace: float, dim: int) -> float:
    if settings.damping is not None:
        return settings.damping
    return settings.default_damping_ratio * abs(trace) / dim


def gram_solver(
    rows: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
    effective_dim: int | None = None,
) -> Solver:
    """Solver for ``C = (1/n) rows^T rows + delta I``, rows of shape (R, D).

    ``effective_dim`` (default D) is the number of eigenvalues the default damping averages.

    Uses the Woodbury identity in R dimensions when R < D and damping > 0:
    ``C^{-1} v = (1/delta) [v - rows^T (n delta I + rows rows^T)^{-1} rows v]``.
    """
    if not bool(torch.isfinite(rows).all()):
        raise InputError("per-sample gradients contain NaN or inf; the curvature cannot be built")
    r = rows.to(SOLVE_DTYPE)
    n_rows, dim = r.shape
    base = _default_damping(settings, float((r * r).sum()) / n, effective_dim or dim)
    if n_rows < dim and base > 0:
        factor, damping, retries = _damped_cholesky(r @ r.T, base, float(n), settings, kind)

        def apply(v: torch.Tensor) -> torch.Tensor:
            v = v.to(r.device)
            inner = torch.cholesky_solve(r @ v, factor)
            return (v - r.T @ inner) / damping

        return Solver(dim, damping, retries, apply, kind)
    return dense_solver(r.T @ r / n, settings, kind, base=base)


def dense_solver(
    matrix: torch.Tensor, settings: CurvatureSettings, kind: str, base: float | None = None,
    effective_dim: int | None = None,
) -> Solver:
    """Solver for ``matrix + delta I`` with an explicit (D, D) matrix."""
    m = matrix.to(SOLVE_DTYPE)
    m = 0.5 * (m + m.T)
    if not bool(torch.isfinite(m).all()):
        raise InputError(f"the {kind} curvature contains NaN or inf")
    if base is None:
        base = _default_damping(settings, float(torch.diagonal(m).sum()),
                                effective_dim or m.shape[0])
    factor, damping, retries = _damped_cholesky(m, base, 1.0, settings, kind)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(v.to(m.device), factor)

    return Solver(m.shape[0], damping, retries, apply, kind)


def fit_curvature(
    settings: CurvatureSettings,
    fmodel,
    state,
    x: torch.Tensor,
    targets: torch.Tensor,
    task,
    projector,
    u: torch.Tensor,
    chunk_size: int = 128,
) -> Solver:
    """The damped solver of the chosen curvature at (state, targets).

    ``u`` are the projected per-sample gradients at the same point (the Fisher features).
    """
    from iif.features import ggn_features
    from iif.grads import full_hessian
    from iif.projection import IdentityProjector

    n = x.shape[0]
    effective_dim = min(projector.dim, fmodel.num_params)
    if settings.kind == "fisher":
        return gram_solver(u, n, settings, "fisher", effective_dim)
    if settings.kind == "ggn":
        rows = ggn_features(fmodel, state, x, targets, task, projector, chunk_size)
        return gram_solver(rows, n, settings, "ggn", effective_dim)
    h = full_hessian(fmodel, state, x, targets, task, chunk_size=chunk_size)
    if not isinstance(projector, IdentityProjector):
        # A^T H A without forming A: project the rows of H, then the rows of (H A)^T.
        h = projector.project(projector.project(h).T.contiguous())
    return dense_solver(h, settings, "hessian", effective_dim=effective_dim)
