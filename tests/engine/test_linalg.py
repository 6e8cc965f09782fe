"""The float64 solvers of iif.engine.linalg against explicit dense solves on small SPD problems, the
Woodbury form against the dense form, the damping retries and the solvers' reports."""

from __future__ import annotations

import logging

import pytest
import torch

from iif.engine import linalg
from iif.engine.linalg import (
    CGSolver,
    CholeskySolver,
    Retries,
    Solver,
    WoodburySolver,
    column_blocks,
    conjugate_gradients,
    damped_cholesky,
    gram,
    rows_solver,
    rows_times,
    stacked_rows_solvers,
)
from iif.errors import CurvatureError, InputError

TOL = {"rtol": 1e-9, "atol": 1e-11}


def _randn(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _spd(dim=6, seed=0):
    a = _randn(dim, dim, seed=seed)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def _check(solver, matrix, seed=1, tol=None):
    """solver.solve equals torch.linalg.solve(matrix + solver.damping I), (D,) and (D, r)."""
    tol = tol or TOL
    d = matrix.shape[0]
    damped = matrix + solver.damping * torch.eye(d, dtype=torch.float64)
    rhs = _randn(d, 3, seed=seed)
    out = solver.solve(rhs)
    assert out.dtype == torch.float64 and out.shape == (d, 3)
    torch.testing.assert_close(out, torch.linalg.solve(damped, rhs), **tol)
    vec = solver.solve(rhs[:, 0])
    assert vec.shape == (d,)
    torch.testing.assert_close(vec, torch.linalg.solve(damped, rhs[:, 0]), **tol)


def _singular():
    """A PSD matrix with an exactly zero pivot: its Cholesky factorisation fails at damping 0."""
    return torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]],
                        dtype=torch.float64)


def _indefinite(dim=6, min_eig=-0.5, seed=3):
    q, _ = torch.linalg.qr(_randn(dim, dim, seed=seed))
    evals = torch.linspace(min_eig, 2.0, dim, dtype=torch.float64)
    return q @ torch.diag(evals) @ q.T


# ---- each solver against torch.linalg.solve ------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_cholesky_solver_matches_dense_solve(damping):
    m = _spd()
    solver = CholeskySolver(m, damping, kind="test")
    assert solver.damping == damping and solver.retries == 0 and solver.dim == 6
    _check(solver, m)


def test_cholesky_solver_symmetrises_and_takes_a_damping_rule():
    m = _spd(5, seed=2)
    lopsided = m + torch.triu(_randn(5, 5, seed=3), diagonal=1) * 1e-3
    seen = []
    solver = CholeskySolver(lopsided, lambda trace: seen.append(trace) or 0.01 * trace)
    assert seen == [pytest.approx(float(torch.trace(m)))]
    assert solver.damping == pytest.approx(0.01 * float(torch.trace(m)))
    _check(solver, 0.5 * (lopsided + lopsided.T))


@pytest.mark.parametrize(("n_rows", "dim", "n"), [(4, 11, 4), (4, 11, 9), (1, 7, 3)])
def test_woodbury_solver_matches_dense_solve(n_rows, dim, n):
    rows = _randn(n_rows, dim)
    solver = WoodburySolver(rows, n, 0.05, kind="test")
    assert solver.damping == 0.05 and solver.retries == 0 and solver.dim == dim
    _check(solver, rows.T @ rows / n)


def test_woodbury_form_equals_dense_form():
    rows = _randn(5, 13, seed=4)
    n = 8
    woodbury = WoodburySolver(rows, n, 0.02)
    dense = CholeskySolver(rows.T @ rows / n, 0.02)
    rhs = _randn(13, 4, seed=5)
    torch.testing.assert_close(woodbury.solve(rhs), dense.solve(rhs), **TOL)
    assert woodbury.report() == dense.report()


def test_woodbury_keeps_float32_rows_and_solves_in_float64(monkeypatch):
    monkeypatch.setattr(linalg, "BLOCK_ELEMENTS", 8)  # several column blocks
    rows = _randn(3, 10, seed=6).float()
    solver = WoodburySolver(rows, 3, 0.1)
    assert solver.rows.dtype == torch.float32 and len(solver.blocks) > 1
    r = rows.double()
    _check(solver, r.T @ r / 3)


def test_woodbury_needs_positive_damping():
    with pytest.raises(InputError, match="damping > 0"):
        WoodburySolver(_randn(3, 8), 3, 0.0)


@pytest.mark.parametrize("retry", [Retries(), Retries(max_retries=2, retry_factor=3.0)])
def test_cg_solver_matches_dense_solve(retry):
    m = _spd(7, seed=7)
    solver = CGSolver(lambda v: m @ v, 7, 0.05, retry, max_iter=100, tol=1e-12, kind="test")
    _check(solver, m)
    report = solver.report()
    assert report["solver"] == "cg" and report["cg_converged"] is True
    assert len(report["cg_iterations"]) == 2  # one per solve
    assert all(r <= 1e-12 for r in report["cg_residuals"])


def test_cg_solver_reports_a_solve_that_did_not_converge(caplog):
    m = _spd(9, seed=8)
    solver = CGSolver(lambda v: m @ v, 9, 1e-3, max_iter=2, tol=1e-12)
    with caplog.at_level(logging.WARNING, logger="iif.engine.linalg"):
        solver.solve(torch.ones(9, dtype=torch.float64))
    assert solver.report()["cg_converged"] is False
    assert solver.report()["cg_iterations"] == [2]
    assert any("conjugate gradients stopped" in r.getMessage() for r in caplog.records)


def test_conjugate_gradients_flags_non_positive_curvature():
    m = _indefinite(min_eig=-0.5)
    assert conjugate_gradients(lambda v: m @ v, _randn(6, 2), 50, 1e-10) is None


def test_stacked_rows_solvers_match_one_at_a_time():
    rows = _randn(3, 9, 4, seed=9)
    n = 12
    solvers = stacked_rows_solvers(rows, n, lambda trace: 0.3 * trace / 4, kind="test")
    assert len(solvers) == 3
    for b, solver in enumerate(solvers):
        one = rows_solver(rows[b], n, lambda trace: 0.3 * trace / 4, kind="test")
        assert solver.damping == one.damping
        matrix = rows[b].T @ rows[b] / n
        assert solver.damping == pytest.approx(0.3 * float(torch.trace(matrix)) / 4)
        _check(solver, matrix)


@pytest.mark.parametrize(("n_rows", "dim", "form"),
                         [(4, 10, WoodburySolver), (10, 4, CholeskySolver),
                          (6, 6, CholeskySolver)])
def test_rows_solver_picks_the_form_and_matches_dense_solve(n_rows, dim, form):
    rows = _randn(n_rows, dim, seed=10)
    solver = rows_solver(rows, n_rows + 1, 0.07)
    assert type(solver) is form
    _check(solver, rows.T @ rows / (n_rows + 1))


def test_rows_solver_damping_rule_sees_the_trace():
    rows = _randn(4, 10, seed=11)
    seen = []
    solver = rows_solver(rows, 5, lambda trace: seen.append(trace) or 0.1)
    assert seen == [pytest.approx(float((rows ** 2).sum()) / 5)]
    assert solver.damping == 0.1


def test_rows_solver_without_damping_uses_the_dense_form_and_retries():
    # R < D is singular: damping 0 cannot use the Woodbury form, and the dense matrix retries
    rows = _randn(3, 8, seed=12)
    solver = rows_solver(rows, 3, 0.0)
    assert type(solver) is CholeskySolver
    assert solver.retries > 0 and solver.damping > 0
    # condition number ~1e6: both solves lose about six digits
    _check(solver, rows.T @ rows / 3, tol={"rtol": 1e-6, "atol": 1e-6})


def test_rows_solver_reduce_sums_the_matrices():
    rows = _randn(4, 10, seed=13)
    solver = rows_solver(rows, 4, 0.1, reduce=lambda m: 2 * m)
    assert type(solver) is CholeskySolver
    _check(solver, 2 * rows.T @ rows / 4)


@pytest.mark.parametrize("stacked", [False, True])
def test_non_finite_rows_are_refused(stacked):
    rows = _randn(2, 4, 6) if stacked else _randn(4, 6)
    rows[(1, 2, 3) if stacked else (2, 3)] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        (stacked_rows_solvers if stacked else rows_solver)(rows, 4, 0.1)


# ---- damping retries ---------------------------------------------------------------------


def test_singular_matrix_retries_with_more_damping(caplog):
    m = _singular()
    with caplog.at_level(logging.INFO, logger="iif.engine.linalg"):
        solver = CholeskySolver(m, 0.0, kind="hessian")
    assert solver.retries > 0
    assert solver.damping > 0.0
    # from damping 0 the first retry is 1e-6 x the mean diagonal, which factors
    assert solver.retries == 1
    assert solver.damping == pytest.approx(1e-6 * 4 / 3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("not positive definite at damping 0; retrying" in msg for msg in messages)
    assert any("hessian curvature was not positive definite; solved with damping" in msg
               and "after 1 retry" in msg for msg in messages)
    report = solver.report()
    assert report == {"kind": "hessian", "damping": solver.damping, "retries": 1}
    _check(solver, m)


def test_indefinite_matrix_retries_by_the_retry_factor():
    m = _indefinite(min_eig=-0.5)
    factor, damping, retries = damped_cholesky(m, 1e-3, 1.0, Retries(8, 10.0), "test")
    assert (retries, damping) == (3, pytest.approx(1.0))  # 1e-3 * 10^3 > 0.5
    torch.testing.assert_close(factor @ factor.T, m + damping * torch.eye(6, dtype=m.dtype),
                               **TOL)
    # scale: the shift is scale x damping (the Woodbury system's n delta)
    _, damping, retries = damped_cholesky(m, 1e-3, 10.0, Retries(8, 10.0), "test")
    assert (retries, damping) == (2, pytest.approx(0.1))


def test_retries_exhausted_raise_curvature_error():
    m = _indefinite(min_eig=-0.5)
    with pytest.raises(CurvatureError, match="not positive definite even with damping 0.1 "
                       "after 2 retries"):
        CholeskySolver(m, 1e-3, Retries(max_retries=2), kind="hessian")


def test_cg_solver_retries_on_non_positive_curvature(caplog):
    m = _indefinite(min_eig=-0.5)
    with caplog.at_level(logging.WARNING, logger="iif.engine.linalg"):
        solver = CGSolver(lambda v: m @ v, 6, 1e-3, Retries(8, 10.0), max_iter=200,
                          tol=1e-12, kind="hessian")
        out = solver.solve(_randn(6, 2, seed=14))
    assert solver.retries > 0 and solver.damping > 0.5
    assert any("conjugate gradients met non-positive curvature" in r.getMessage()
               for r in caplog.records)
    damped = m + solver.damping * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(out, torch.linalg.solve(damped, _randn(6, 2, seed=14)), **TOL)
    report = solver.report()
    assert report["retries"] == solver.retries and report["damping"] == solver.damping
    with pytest.raises(CurvatureError, match="not positive definite"):
        CGSolver(lambda v: m @ v, 6, 1e-3, Retries(max_retries=1)).solve(torch.ones(6))


def test_cg_solver_needs_positive_damping():
    with pytest.raises(InputError, match="damping > 0"):
        CGSolver(lambda v: v, 3, 0.0)


# ---- the base solver and its report --------------------------------------------------------


def test_solver_report_and_details():
    solver = Solver(3, 0.5, 2, lambda v: 2 * v, kind="mine")
    assert solver.report() == {"kind": "mine", "damping": 0.5, "retries": 2}
    solver.details["extra"] = 1
    assert solver.report() == {"kind": "mine", "damping": 0.5, "retries": 2, "extra": 1}
    torch.testing.assert_close(solver.solve(torch.ones(3)),
                               torch.full((3,), 2.0, dtype=torch.float64))


def test_solve_rejects_wrong_rows():
    solver = CholeskySolver(_spd(4), 0.1)
    with pytest.raises(InputError, match="4 rows"):
        solver.solve(torch.ones(5, dtype=torch.float64))


def test_cholesky_solver_refuses_non_finite_matrix():
    m = _spd(4)
    m[0, 1] = float("inf")
    with pytest.raises(InputError, match="NaN or inf"):
        CholeskySolver(m, 0.1, kind="hessian")


# ---- blocked float64 products ------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 7, 1 << 24])
def test_blocked_products_equal_direct_ones(monkeypatch, block):
    monkeypatch.setattr(linalg, "BLOCK_ELEMENTS", block)
    rows = _randn(9, 5, seed=15).float()
    r = rows.double()
    torch.testing.assert_close(gram(rows), r.T @ r, **TOL)
    stacked = _randn(2, 9, 5, seed=16)
    torch.testing.assert_close(gram(stacked), stacked.transpose(1, 2) @ stacked, **TOL)
    rhs = _randn(5, 3, seed=17)
    out = rows_times(rows, rhs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, r @ rhs, **TOL)
    blocks = column_blocks(9, 5)
    assert torch.arange(5)[blocks[0]].numel() >= 1
    assert torch.cat([torch.arange(5)[b] for b in blocks]).tolist() == list(range(5))
