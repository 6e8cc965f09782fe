"""Float64 linear algebra for the damped solves ``(C + delta I)^{-1} v``.

What lives here is pure linear algebra, with no knowledge of models, gradients or settings
files:

- float64 products on large float32 row matrices one block at a time (:func:`gram`,
  :func:`rows_times`, :func:`column_blocks`), so stored features never get a full float64
  copy;
- the damped Cholesky factorisation with retries (:func:`damped_cholesky`): a matrix that is
  not positive definite is refactored at ``retry_factor`` times the damping (from a tiny
  damping when it was 0), logged, and the damping finally used and the number of retries are
  reported;
- the solvers, each a :class:`Solver` with ``solve(rhs)``, ``damping``, ``retries`` and
  ``report()``: :class:`CholeskySolver` (an explicit (D, D) matrix), :class:`WoodburySolver`
  (``(1/n) R^T R`` solved in the R-dimensional row space), :func:`rows_solver` and
  :func:`stacked_rows_solvers` (which form a Gram matrix of rows takes), and
  :class:`CGSolver` (conjugate gradients on a matrix-vector product).

Where the first damping comes from is not decided here: a solver takes it as a number or as
a :data:`DampingRule` of the matrix's trace. The rule itself (``default_damping_ratio`` times
the mean of ``rank_bound`` eigenvalues) and the curvature settings live in
:mod:`iif.engine.curvature`, which builds its solvers on this module.

:func:`rows_solver` and :func:`stacked_rows_solvers` share :func:`gram` and the damped
Cholesky of a Gram matrix but stay two functions: the B-copy one forms the B Gram matrices in
one batched float64 product, which is not bit-equal to B separate products (rows (30, 5):
47 of 50 random draws differed) and splits the rows into blocks of ``BLOCK_ELEMENTS // (D B)``
instead of ``// D``, so looping the one-copy function would change the stacked scores; and
the one-copy one takes forms the batched one cannot (the Woodbury solve for R < D, the
matrix summed over processes), so the B-copy one at B = 1 cannot replace it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from iif.errors import CurvatureError, InputError

log = logging.getLogger(__name__)

SOLVE_DTYPE = torch.float64
BLOCK_ELEMENTS = 1 << 24  # float64 elements of one temporary block (128 MiB)

# the trace of C (without damping) -> the first damping tried
DampingRule = Callable[[float], float]


class RetryPolicy(Protocol):
    """How a damped solve that is not positive definite is retried (``CurvatureSettings``
    is one)."""

    @property
    def max_retries(self) -> int: ...

    @property
    def retry_factor(self) -> float: ...


@dataclass(frozen=True)
class Retries:
    """A :class:`RetryPolicy`: up to ``max_retries`` times ``retry_factor`` more damping."""

    max_retries: int = 8
    retry_factor: float = 10.0


DEFAULT_RETRIES = Retries()


# ---- blocked float64 products ----------------------------------------------------------------
def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` (..., D, D) in float64 for rows (..., R, D), converting a block of rows
    at a time (``BLOCK_ELEMENTS`` float64 values per block over all leading dimensions)."""
    *lead, n_rows, dim = rows.shape
    matrix = torch.zeros(*lead, dim, dim, dtype=SOLVE_DTYPE, device=rows.device)
    step = max(1, BLOCK_ELEMENTS // (dim * max(1, int(np.prod(lead)))))
    for lo in range(0, n_rows, step):
        part = rows[..., lo : lo + step, :].to(SOLVE_DTYPE)
        matrix += part.transpose(-1, -2) @ part
    return matrix


def rows_times(rows: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rows @ rhs`` in float64, (R, D) x (D, r) -> (R, r), converting a block of rows at a
    time so that stored float32 features never get a full float64 copy."""
    step = max(1, BLOCK_ELEMENTS // max(rows.shape[1], 1))
    rhs = rhs.to(device=rows.device, dtype=SOLVE_DTYPE)
    return torch.cat([rows[lo : lo + step].to(SOLVE_DTYPE) @ rhs
                      for lo in range(0, rows.shape[0], step)])


def column_blocks(n_rows: int, dim: int) -> list[slice]:
    """Slices of the D columns of an (R, D) matrix, each at most ``BLOCK_ELEMENTS`` values."""
    width = max(1, BLOCK_ELEMENTS // max(n_rows, 1))
    return [slice(lo, min(lo + width, dim)) for lo in range(0, dim, width)]


# ---- damped Cholesky -------------------------------------------------------------------------
def tiny_damping(matrix: torch.Tensor) -> float:
    """The first damping tried after 0 failed: 1e-6 x the mean absolute diagonal of the
    (D, D) matrix (1e-12 for a zero diagonal)."""
    mean_eig = float(torch.diagonal(matrix).abs().mean())
    return 1e-6 * mean_eig if mean_eig > 0 else 1e-12


def damped_cholesky(
    matrix: torch.Tensor, base: float, scale: float, retry: RetryPolicy, what: str
) -> tuple[torch.Tensor, float, int]:
    """Cholesky factor (D, D) of ``matrix + scale * damping * I``, raising the damping until
    it factors. Returns (factor, damping used, retries).

    ``base`` is the first damping; ``scale`` maps damping to the diagonal shift (n for the
    Woodbury system, 1 otherwise); ``what`` names the matrix in the log and the error. After
    ``retry.max_retries`` retries a :class:`~iif.errors.CurvatureError` is raised.
    """
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    damping = base
    for attempt in range(retry.max_retries + 1):
        if attempt:
            nxt = damping * retry.retry_factor if damping > 0 else tiny_damping(matrix)
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
        f"{retry.max_retries} retries; check the model and data for NaN or raise damping"
    )


# ---- solvers ---------------------------------------------------------------------------------
class Solver:
    """``solve(v)`` returns ``(C + damping I)^{-1} v`` in float64 for v of shape (D,) or
    (D, r).

    ``damping`` is the damping finally used, ``retries`` how often it was raised, ``kind``
    names C in reports; ``details`` are solver-specific diagnostics, part of :meth:`report`.
    Subclasses implement ``_apply`` on (D, r) float64 right-hand sides; ``apply`` given here
    takes its place.
    """

    def __init__(self, dim: int, damping: float, retries: int,
                 apply: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 kind: str = "linear"):
        self.dim = dim
        self.damping = damping
        self.retries = retries
        self.kind = kind
        if apply is not None:
            self._apply = apply
        self.details: dict[str, Any] = {}

    def _apply(self, rhs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(C + damping I)^{-1} rhs``, (D,) -> (D,) or (D, r) -> (D, r), float64."""
        if rhs.shape[0] != self.dim:
            raise InputError(f"solve expects {self.dim} rows, got {tuple(rhs.shape)}")
        vec = rhs.ndim == 1
        out = self._apply(rhs.to(SOLVE_DTYPE).reshape(self.dim, -1))
        return out[:, 0] if vec else out

    def report(self) -> dict[str, Any]:
        """``kind``, ``damping``, ``retries`` and the solver's ``details``."""
        return {"kind": self.kind, "damping": self.damping, "retries": self.retries,
                **self.details}


def _first_damping(damping: float | DampingRule, trace: float) -> float:
    return damping(trace) if callable(damping) else damping


class CholeskySolver(Solver):
    """``(M + damping I)^{-1}`` for an explicit (D, D) matrix M, on a float64 Cholesky factor.

    M is symmetrised; ``damping`` is the first damping, or a rule applied to trace(M);
    a factorisation that fails is retried (:func:`damped_cholesky`).
    """

    def __init__(self, matrix: torch.Tensor, damping: float | DampingRule,
                 retry: RetryPolicy = DEFAULT_RETRIES, kind: str = "linear"):
        m = matrix.to(SOLVE_DTYPE)
        m = 0.5 * (m + m.T)
        if not bool(torch.isfinite(m).all()):
            raise InputError(f"the {kind} curvature contains NaN or inf")
        base = _first_damping(damping, float(torch.diagonal(m).sum()))
        self.factor, used, retries = damped_cholesky(m, base, 1.0, retry, kind)
        super().__init__(m.shape[0], used, retries, kind=kind)

    def _apply(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs.to(self.factor.device), self.factor)


class WoodburySolver(Solver):
    """``((1/n) R^T R + delta I)^{-1}`` for rows R (R, D), solved in R dimensions:
    ``(1/delta) [v - R^T (n delta I + R R^T)^{-1} R v]``, exact for any R and D.

    ``damping`` (> 0) is the first damping; the (R, R) Gram matrix is factored with retries
    (:func:`damped_cholesky`). The rows stay in their dtype: every product runs in float64 one
    column block at a time, so no float64 copy of R is made.
    """

    def __init__(self, rows: torch.Tensor, n: int, damping: float,
                 retry: RetryPolicy = DEFAULT_RETRIES, kind: str = "linear"):
        if not damping > 0:
            raise InputError(f"the Woodbury form needs damping > 0, got {damping!r}")
        n_rows, dim = rows.shape
        self.rows = rows
        self.blocks = column_blocks(n_rows, dim)
        inner = torch.zeros(n_rows, n_rows, dtype=SOLVE_DTYPE, device=rows.device)
        for b in self.blocks:
            part = rows[:, b].to(SOLVE_DTYPE)
            inner += part @ part.T
        self.factor, used, retries = damped_cholesky(inner, damping, float(n), retry, kind)
        del inner
        super().__init__(dim, used, retries, kind=kind)

    def _apply(self, rhs: torch.Tensor) -> torch.Tensor:
        rows, blocks = self.rows, self.blocks
        v = rhs.to(rows.device)
        rv = sum(rows[:, b].to(SOLVE_DTYPE) @ v[b] for b in blocks)
        inner = torch.cholesky_solve(rv, self.factor)
        out = torch.empty_like(v)
        for b in blocks:
            out[b] = (v[b] - rows[:, b].to(SOLVE_DTYPE).T @ inner) / self.damping
        return out


def _check_finite_rows(rows: torch.Tensor) -> None:
    if not bool(torch.isfinite(rows).all()):
        raise InputError("per-sample gradients contain NaN or inf; the curvature cannot be built")


def rows_solver(
    rows: torch.Tensor, n: int, damping: float | DampingRule, retry: RetryPolicy = DEFAULT_RETRIES,
    kind: str = "linear", reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """Solver for ``C = (1/n) rows^T rows + delta I``, rows of shape (R, D).

    ``damping`` is the first damping or a rule applied to trace(C). R < D and a damping > 0:
    :class:`WoodburySolver`; otherwise a :class:`CholeskySolver` of the (D, D) matrix.
    ``reduce`` (for rows split across processes, ``n`` counting all of them) sums the (D, D)
    matrices of the parts, e.g. an all-reduce; the solve then uses the explicit matrix.
    """
    _check_finite_rows(rows)
    n_rows, dim = rows.shape
    if reduce is not None or n_rows >= dim:
        matrix = gram(rows)
        return _gram_matrix_solver(matrix if reduce is None else reduce(matrix), n, damping,
                                   retry, kind)
    # R < D: the trace in float64 one column block at a time, like the products
    trace = sum(float(rows[:, b].to(SOLVE_DTYPE).pow(2).sum())
                for b in column_blocks(n_rows, dim)) / n
    base = _first_damping(damping, trace)
    if base > 0:
        return WoodburySolver(rows, n, base, retry, kind)
    return CholeskySolver(gram(rows) / n, base, retry, kind)


def stacked_rows_solvers(
    rows: torch.Tensor, n: int, damping: float | DampingRule, retry: RetryPolicy = DEFAULT_RETRIES,
    kind: str = "linear",
) -> list[Solver]:
    """:func:`rows_solver` for B matrices at once, ``rows`` (B, R, D) with R >= D: the B
    (D, D) Gram matrices come from batched float64 products, each gets its own damping (the
    rule on its own trace) and :class:`CholeskySolver`."""
    matrices = gram(rows)
    if not bool(torch.isfinite(matrices).all()):
        raise InputError("per-sample gradients contain NaN or inf; the curvature cannot be built")
    return [_gram_matrix_solver(m, n, damping, retry, kind) for m in matrices]


def _gram_matrix_solver(matrix: torch.Tensor, n: int, damping: float | DampingRule,
                        retry: RetryPolicy, kind: str) -> CholeskySolver:
    """Solver for ``matrix / n + delta I``, the damping rule on trace(matrix) / n."""
    base = _first_damping(damping, float(torch.diagonal(matrix).sum()) / n)
    return CholeskySolver(matrix / n, base, retry, kind)


# ---- conjugate gradients ---------------------------------------------------------------------
class CGSolver(Solver):
    """``(C + damping I)^{-1}`` by conjugate gradients on ``product`` (v -> C v, (D, r) ->
    (D, r) float64), every column of the right-hand side at once.

    ``damping`` (> 0) is the first damping. A direction of non-positive curvature (C + damping
    I not positive definite) restarts the solve at ``retry_factor`` times the damping, as
    :func:`damped_cholesky` does. The iterations and final relative residuals of every solve
    are in ``details`` (``cg_iterations``, ``cg_residuals``, ``cg_converged``).
    """

    def __init__(self, product: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 damping: float, retry: RetryPolicy = DEFAULT_RETRIES, max_iter: int = 200,
                 tol: float = 1e-8, kind: str = "linear"):
        if damping <= 0:
            raise InputError(f"conjugate gradients need damping > 0, got {damping!r}")
        super().__init__(dim, damping, 0, kind=kind)
        self.product = product
        self.retry = retry
        self.max_iter = max_iter
        self.tol = tol
        self.details.update(solver="cg", cg_iterations=[], cg_residuals=[], cg_converged=True)

    def _apply(self, rhs: torch.Tensor) -> torch.Tensor:
        report = self.details
        for _ in range(self.retry.max_retries + 1):
            result = conjugate_gradients(lambda v: self.product(v) + self.damping * v, rhs,
                                         self.max_iter, self.tol)
            if result is not None:
                sol, iters, residuals = result
                report["cg_iterations"].append(iters)
                report["cg_residuals"].append(float(residuals.max()))
                if float(residuals.max()) > self.tol:
                    report["cg_converged"] = False
                    log.warning("conjugate gradients stopped after %d iterations at relative "
                                "residual %.2g (tol %.2g)", iters, float(residuals.max()),
                                self.tol)
                return sol
            nxt = self.damping * self.retry.retry_factor
            log.warning("%s curvature not positive definite at damping %.3g (conjugate "
                        "gradients met non-positive curvature); retrying at %.3g",
                        self.kind, self.damping, nxt)
            self.damping = nxt
            self.retries += 1
        raise CurvatureError(
            f"{self.kind} curvature is not positive definite even with damping "
            f"{self.damping:.3g} after {self.retry.max_retries} retries"
        )


def conjugate_gradients(
    matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int, torch.Tensor] | None:
    """Conjugate gradients on every column of ``rhs`` (M, r) at once, each with its own step
    sizes, until every relative residual is at most ``tol`` or after ``max_iter`` steps.
    Returns (solution (M, r), iterations, relative residuals (r,)) or None when a direction
    of non-positive curvature appears."""
    b = rhs.to(SOLVE_DTYPE)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    norm_b = rs.sqrt().clamp_min(torch.finfo(SOLVE_DTYPE).tiny)
    iters = 0
    while iters < max_iter:
        active = rs.sqrt() / norm_b > tol
        if not bool(active.any()):
            break
        iters += 1
        ap = matvec(p)
        curv = (p * ap).sum(0)
        if bool((curv[active] <= 0).any()):
            return None
        alpha = torch.where(active, rs / torch.where(active, curv, 1.0), 0.0)
        x += alpha * p
        r -= alpha * ap
        rs_new = (r * r).sum(0)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        p = r + beta * p
        rs = rs_new
    return x, iters, rs.sqrt() / norm_b
