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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from iif.errors import CurvatureError, InputError
from iif.validation import check_settings, setting

log = logging.getLogger(__name__)

SOLVE_DTYPE = torch.float64


@dataclass
class CurvatureSettings:
    """``damping=None`` chooses ``default_damping_ratio`` times the mean nonzero eigenvalue.

    The mean is taken over ``min(D, M, N)`` eigenvalues (:func:`rank_bound`): D the solve
    dimension, M the number of parameters, N the number of training samples (the rank bound
    of the empirical Fisher). Counting null directions would shrink the damping with the size
    of the model (dividing by M gave 1e-5 to 1e-6 on small MLPs, far below what attribution
    quality wants) and with P, so projected scores would not approach unprojected ones. The
    ratio 0.3 was best on the tuning half of ``benchmarks/bench_quality.py`` on digits and
    MNIST alike for the Fisher, for influence functions and IIF, and on digits for the
    Gauss-Newton matrix (docs/quality.md).

    ``kind="fisher"`` is the default: the Gauss-Newton matrix cut to each sample's top
    output-Hessian direction was better on digits and much worse on MNIST.
    """

    kind: Literal["fisher", "ggn", "hessian"] = "fisher"
    # 0 is allowed: a curvature that is then singular is retried with a tiny damping
    damping: float | None = setting(None, ge=0)
    # Gauss-Newton only: keep the top ggn_rank directions of each sample's output Hessian
    # (None: all d; "auto": 1 for the built-in cross-entropy, whose diag(p) - p p^T has one
    # dominant direction, else all d). An exact solve's Woodbury dimension is N x ggn_rank.
    ggn_rank: int | Literal["auto"] | None = setting("auto", ge=1)
    default_damping_ratio: float = setting(0.3, gt=0)
    max_retries: int = setting(8, ge=0)
    # each retry multiplies the damping by this, so it must grow
    retry_factor: float = setting(10.0, gt=1)

    def __post_init__(self) -> None:
        check_settings(self, "[curvature]")

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
        self.details: dict[str, Any] = {}  # solver-specific diagnostics, part of report()

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if rhs.shape[0] != self.dim:
            raise InputError(f"solve expects {self.dim} rows, got {tuple(rhs.shape)}")
        vec = rhs.ndim == 1
        out = self._apply(rhs.to(SOLVE_DTYPE).reshape(self.dim, -1))
        return out[:, 0] if vec else out

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, "damping": self.damping, "retries": self.retries,
                **self.details}


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


def rank_bound(n: int, dim: int, num_params: int) -> int:
    """How many eigenvalues of the curvature the default damping averages: at most one per
    training sample, the solve dimension and the parameter count, for every kind. For the
    empirical Fisher this is its rank bound. Gauss-Newton and Hessian matrices can reach
    N x d, but a trained classifier's per-sample output Hessian ``diag(p) - p p^T`` has one
    dominant direction (towards the runner-up class), so N counts their significant
    eigenvalues too; with N x d the best damping ratio on the tuning half was 10x the
    Fisher's, with N the same ratio serves both (docs/quality.md)."""
    return max(1, min(dim, num_params, n))


def _default_damping(settings: CurvatureSettings, trace: float, dim: int) -> float:
    if settings.damping is not None:
        return settings.damping
    return settings.default_damping_ratio * abs(trace) / dim


def gram_solver(
    rows: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
    effective_dim: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """Solver for ``C = (1/n) rows^T rows + delta I``, rows of shape (R, D).

    ``effective_dim`` (default D) is the number of eigenvalues the default damping averages.

    Uses the Woodbury identity in R dimensions when R < D and damping > 0:
    ``C^{-1} v = (1/delta) [v - rows^T (n delta I + rows rows^T)^{-1} rows v]``.
    ``reduce`` (for rows split across processes, ``n`` counting all of them) sums the (D, D)
    matrices of the parts, e.g. an all-reduce; the solve then uses the explicit matrix.
    """
    if not bool(torch.isfinite(rows).all()):
        raise InputError("per-sample gradients contain NaN or inf; the curvature cannot be built")
    n_rows, dim = rows.shape
    if reduce is not None or n_rows >= dim:
        matrix = _gram(rows)
        return _matrix_solver(matrix if reduce is None else reduce(matrix), n, settings, kind,
                              effective_dim or dim)
    # R < D: rows stay in their dtype; products run in float64 one column block at a time, so
    # no float64 copy of the (R, D) matrix is ever made
    blocks = _column_blocks(n_rows, dim)
    trace = sum(float(rows[:, b].to(SOLVE_DTYPE).pow(2).sum()) for b in blocks) / n
    base = _default_damping(settings, trace, effective_dim or dim)
    if base > 0:
        gram = torch.zeros(n_rows, n_rows, dtype=SOLVE_DTYPE, device=rows.device)
        for b in blocks:
            part = rows[:, b].to(SOLVE_DTYPE)
            gram += part @ part.T
        factor, damping, retries = _damped_cholesky(gram, base, float(n), settings, kind)
        del gram

        def apply(v: torch.Tensor) -> torch.Tensor:
            v = v.to(rows.device)
            rv = sum(rows[:, b].to(SOLVE_DTYPE) @ v[b] for b in blocks)
            inner = torch.cholesky_solve(rv, factor)
            out = torch.empty_like(v)
            for b in blocks:
                out[b] = (v[b] - rows[:, b].to(SOLVE_DTYPE).T @ inner) / damping
            return out

        return Solver(dim, damping, retries, apply, kind)
    return dense_solver(_gram(rows) / n, settings, kind, base=base)


def stacked_gram_solvers(
    rows: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
    effective_dim: int | None = None,
) -> list[Solver]:
    """:func:`gram_solver` for B matrices at once, ``rows`` (B, R, D) with R >= D: the B
    Gram matrices come from batched float64 products."""
    matrices = _gram(rows)
    if not bool(torch.isfinite(matrices).all()):
        raise InputError("per-sample gradients contain NaN or inf; the curvature cannot be built")
    return [_matrix_solver(m, n, settings, kind, effective_dim or rows.shape[-1])
            for m in matrices]


def _matrix_solver(matrix: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
                   effective_dim: int) -> Solver:
    """Solver for ``matrix / n + delta I``, the default damping from the matrix's trace."""
    base = _default_damping(settings, float(torch.diagonal(matrix).sum()) / n, effective_dim)
    return dense_solver(matrix / n, settings, kind, base=base)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` (..., D, D) in float64 for rows (..., R, D), converting a block of rows
    at a time (``_BLOCK_ELEMENTS`` float64 values per block over all leading dimensions)."""
    *lead, n_rows, dim = rows.shape
    matrix = torch.zeros(*lead, dim, dim, dtype=SOLVE_DTYPE, device=rows.device)
    step = max(1, _BLOCK_ELEMENTS // (dim * max(1, int(np.prod(lead)))))
    for lo in range(0, n_rows, step):
        part = rows[..., lo : lo + step, :].to(SOLVE_DTYPE)
        matrix += part.transpose(-1, -2) @ part
    return matrix


_BLOCK_ELEMENTS = 1 << 24  # float64 elements of one temporary block (128 MiB)


def rows_times(rows: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rows @ rhs`` in float64, (R, D) x (D, r) -> (R, r), converting a block of rows at a
    time so that stored float32 features never get a full float64 copy."""
    step = max(1, _BLOCK_ELEMENTS // max(rows.shape[1], 1))
    rhs = rhs.to(device=rows.device, dtype=SOLVE_DTYPE)
    return torch.cat([rows[lo : lo + step].to(SOLVE_DTYPE) @ rhs
                      for lo in range(0, rows.shape[0], step)])


def _column_blocks(n_rows: int, dim: int) -> list[slice]:
    width = max(1, _BLOCK_ELEMENTS // max(n_rows, 1))
    return [slice(lo, min(lo + width, dim)) for lo in range(0, dim, width)]


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
    n_total: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """The damped solver of the chosen curvature at (state, targets).

    ``u`` are the projected per-sample gradients at the same point (the Fisher features).
    With ``reduce``, ``x``, ``targets`` and ``u`` are this process's part of a training set of
    ``n_total`` samples and ``reduce`` sums the parts' matrices (see :func:`gram_solver`).
    """
    n = x.shape[0] if n_total is None else n_total
    factor = curvature_factor(settings.kind, fmodel, state, x, targets, task, projector, u,
                              chunk_size, reduce, settings.ggn_rank)
    return solver_from_factor(factor, settings, n, projector.dim, fmodel.num_params, reduce)


def curvature_factor(
    kind: str, fmodel, state, x: torch.Tensor, targets: torch.Tensor, task, projector,
    u: torch.Tensor | None, chunk_size: int = 128,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ggn_rank: int | None = None,
) -> tuple[str, torch.Tensor]:
    """What a solver of the ``kind`` curvature is built from, without the damping:
    ``("rows", R)`` whose Gram matrix / N is the curvature (the Fisher's ``u``, the
    Gauss-Newton rows ``A^T J_i^T L_i``), or ``("matrix", H)`` for the explicit Hessian. One
    factor serves any number of damping values (:func:`solver_from_factor`)."""
    from iif.features import ggn_features
    from iif.grads import full_hessian
    from iif.projection import IdentityProjector

    if kind == "fisher":
        return "rows", u
    if kind == "ggn":
        return "rows", ggn_features(fmodel, state, x, targets, task, projector, chunk_size,
                                    rank=ggn_rank)
    if reduce is not None:
        raise InputError("the explicit Hessian is not split across processes; use 'fisher' or "
                         "'ggn' curvature, or run in one process")
    h = full_hessian(fmodel, state, x, targets, task, chunk_size=chunk_size)
    if not isinstance(projector, IdentityProjector):
        # A^T H A without forming A: project the rows of H, then the rows of (H A)^T.
        h = projector.project(projector.project(h).T.contiguous())
    return "matrix", h


def solver_from_factor(
    factor: tuple[str, torch.Tensor], settings: CurvatureSettings, n: int, dim: int,
    num_params: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """The damped solver of a :func:`curvature_factor` at ``settings.damping``, for a
    training set of ``n`` samples and a solve in ``dim`` of ``num_params`` dimensions."""
    what, value = factor
    effective_dim = rank_bound(n, dim, num_params)
    if what == "rows":
        return gram_solver(value, n, settings, settings.kind, effective_dim, reduce)
    return dense_solver(value, settings, "hessian", effective_dim=effective_dim)


# ---- matrix-free curvature and conjugate gradients -------------------------------------------
@dataclass
class CGSettings:
    """Conjugate gradients: stop at ``tol`` relative residual or after ``max_iter`` steps."""

    max_iter: int = setting(200, ge=1)
    tol: float = setting(1e-8, gt=0, lt=1)

    def __post_init__(self) -> None:
        check_settings(self, "[cg]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def curvature_product(
    kind: str, fmodel, state, x: torch.Tensor, targets: torch.Tensor, task,
    chunk_size: int = 128, ggn_rank: int | str | None = None,
):
    """``v -> C v`` for v of shape (M, r), without forming C (M x M), in float64.

    ``hessian``: Hessian-vector products of the mean training loss (forward-over-reverse);
    ``ggn``: ``(1/N) sum_i J_i^T H_i J_i v`` through a Jacobian-vector and a vector-Jacobian
    product of the outputs; ``fisher``: ``(1/N) sum_i g_i g_i^T v`` from per-sample gradients
    recomputed chunk by chunk. Eval mode throughout, like the features.
    """
    from torch.func import grad, jvp, vjp, vmap

    from iif.grads import ggn_factor, module_mode, per_sample_grads

    n = x.shape[0]
    flat0 = state.flat()
    dtype = flat0.dtype

    def outputs(flat: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        return fmodel(fmodel.unflatten(flat), state.buffers, xc)

    if kind == "fisher":
        def fisher_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
            g = per_sample_grads(fmodel, state, xc, tc, task, chunk_size).to(SOLVE_DTYPE)
            return g.T @ (g @ v) / n
        chunk_product = fisher_chunk
    elif kind == "hessian":
        def hessian_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
            def loss(flat):
                return task.sample_loss(outputs(flat, xc), tc).sum() / n

            def hvp(col):
                return jvp(grad(loss), (flat0,), (col,))[1]
            return vmap(hvp, in_dims=1, out_dims=1)(v.to(dtype)).to(SOLVE_DTYPE)
        chunk_product = hessian_chunk
    elif kind == "ggn":
        def ggn_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
            out, pullback = vjp(lambda f: outputs(f, xc), flat0)
            h = ggn_factor(task, out.detach(), tc, ggn_rank)
            h = h @ h.transpose(1, 2) / n  # (c, d, d) loss Hessians in output space

            def gvp(col):
                jv = jvp(lambda f: outputs(f, xc), (flat0,), (col,))[1]
                return pullback(torch.einsum("nab,nb->na", h, jv))[0]
            return vmap(gvp, in_dims=1, out_dims=1)(v.to(dtype)).to(SOLVE_DTYPE)
        chunk_product = ggn_chunk
    else:
        raise InputError(f"unknown curvature kind {kind!r}")

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.to(SOLVE_DTYPE)
        out = torch.zeros_like(v)
        with module_mode(fmodel.module, False):
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                out += chunk_product(v, x[start:stop], targets[start:stop]).detach()
        return out

    return apply


def cg_solver(
    product, dim: int, settings: CurvatureSettings, cg: CGSettings, kind: str,
    trace: float, effective_dim: int | None = None,
) -> Solver:
    """Solver for ``C + damping I`` by conjugate gradients on ``product`` (v -> C v).

    ``trace`` (of C) sets the default damping, ``default_damping_ratio * trace /
    effective_dim`` (default ``dim``; see :func:`rank_bound`). A
    direction of non-positive curvature (C + damping I not positive definite) restarts the
    solve at ``retry_factor`` times the damping, as the Cholesky solvers do. The number of
    iterations and the final relative residuals of every solve are in ``solver.details``.
    """
    damping = _default_damping(settings, trace, effective_dim or dim)
    if damping == 0:
        damping = 1e-12 * max(abs(trace) / dim, 1e-300)
    solver = Solver(dim, damping, 0, None, kind)
    report = solver.details
    report.update(solver="cg", cg_iterations=[], cg_residuals=[], cg_converged=True)

    def apply(rhs: torch.Tensor) -> torch.Tensor:
        for _ in range(settings.max_retries + 1):
            result = _cg(lambda v: product(v) + solver.damping * v, rhs, cg)
            if result is not None:
                sol, iters, residuals = result
                report["cg_iterations"].append(iters)
                report["cg_residuals"].append(float(residuals.max()))
                if float(residuals.max()) > cg.tol:
                    report["cg_converged"] = False
                    log.warning("conjugate gradients stopped after %d iterations at relative "
                                "residual %.2g (tol %.2g)", iters, float(residuals.max()), cg.tol)
                return sol
            nxt = solver.damping * settings.retry_factor
            log.warning("%s curvature not positive definite at damping %.3g (conjugate "
                        "gradients met non-positive curvature); retrying at %.3g",
                        kind, solver.damping, nxt)
            solver.damping = nxt
            solver.retries += 1
        raise CurvatureError(
            f"{kind} curvature is not positive definite even with damping {solver.damping:.3g} "
            f"after {settings.max_retries} retries"
        )

    solver._apply = apply
    return solver


def _cg(matvec, rhs: torch.Tensor, cg: CGSettings):
    """Conjugate gradients on every column of ``rhs`` (M, r) at once, each with its own
    step sizes. Returns (solution, iterations, relative residuals) or None when a direction
    of non-positive curvature appears."""
    b = rhs.to(SOLVE_DTYPE)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    norm_b = rs.sqrt().clamp_min(torch.finfo(SOLVE_DTYPE).tiny)
    iters = 0
    while iters < cg.max_iter:
        active = rs.sqrt() / norm_b > cg.tol
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
