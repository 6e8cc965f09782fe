"""Damped curvature solves against dense linear algebra, and the curvature kinds against their
definitions on a tiny float64 model."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.func import functional_call, jacrev

from iif.engine.curvature import (
    CurvatureSettings,
    Share,
    dense_solver,
    fit_curvature,
    gram_solver,
    rank_bound,
)
from iif.engine.functional import FunctionalModel
from iif.engine.projection import IdentityProjector, ProjectionSettings, RandomProjector
from iif.errors import CurvatureError, InputError
from iif.task.task import Task

# the Gauss-Newton matrix with every direction of the output Hessian
GGN_FULL = {"kind": "ggn", "ggn_rank": None}

TOL = {"rtol": 1e-9, "atol": 1e-11}


def _randn(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _dense_inverse_check(solver, matrix, seed=1):
    """solver.solve equals a dense solve of matrix + solver.damping * I, for (D,) and (D, r)."""
    d = matrix.shape[0]
    damped = matrix + solver.damping * torch.eye(d, dtype=torch.float64)
    rhs = _randn(d, 3, seed=seed)
    torch.testing.assert_close(solver.solve(rhs), torch.linalg.solve(damped, rhs), **TOL)
    vec = solver.solve(rhs[:, 0])
    assert vec.shape == (d,)
    torch.testing.assert_close(vec, torch.linalg.solve(damped, rhs[:, 0]), **TOL)


# ---- gram_solver -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "dim", "n"), [(6, 15, 10), (6, 15, 6), (1, 9, 4), (20, 5, 20), (15, 15, 15)]
)
def test_gram_solver_matches_dense_solve(n_rows, dim, n):
    rows = _randn(n_rows, dim)
    solver = gram_solver(rows, n, CurvatureSettings(damping=0.05), "fisher")
    assert solver.damping == 0.05
    assert solver.retries == 0
    assert solver.dim == dim
    _dense_inverse_check(solver, rows.T @ rows / n)


def test_gram_solver_float32_rows_solve_in_float64():
    rows = _randn(5, 12).float()
    solver = gram_solver(rows, 5, CurvatureSettings(damping=0.1), "fisher")
    out = solver.solve(torch.ones(12))
    assert out.dtype == torch.float64
    r = rows.double()
    expected = torch.linalg.solve(r.T @ r / 5 + 0.1 * torch.eye(12, dtype=torch.float64),
                                  torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize(("n_rows", "dim"), [(6, 15), (20, 5)])
@pytest.mark.parametrize("ratio", [0.1, 0.37])
def test_default_damping_is_ratio_times_mean_eigenvalue(n_rows, dim, ratio):
    rows = _randn(n_rows, dim, seed=4) * 3
    n = n_rows + 2
    gram = rows.T @ rows / n
    solver = gram_solver(rows, n, CurvatureSettings(default_damping_ratio=ratio), "fisher")
    mean_eig = float(torch.linalg.eigvalsh(gram).mean())
    assert solver.damping == pytest.approx(ratio * mean_eig, rel=1e-10)
    _dense_inverse_check(solver, gram)


def test_dense_solver_default_damping():
    m = _randn(7, 7, seed=2)
    m = m @ m.T
    solver = dense_solver(m, CurvatureSettings(default_damping_ratio=0.2), "hessian")
    assert solver.damping == pytest.approx(0.2 * float(torch.linalg.eigvalsh(m).mean()))
    _dense_inverse_check(solver, m)


def test_explicit_damping_overrides_ratio():
    rows = _randn(6, 15)
    solver = gram_solver(rows, 6, CurvatureSettings(damping=0.3, default_damping_ratio=5.0),
                         "fisher")
    assert solver.damping == 0.3


def test_solver_report():
    solver = gram_solver(_randn(4, 6), 4, CurvatureSettings(damping=0.5), "ggn")
    assert solver.report() == {"kind": "ggn", "damping": 0.5, "retries": 0}


def test_solver_rejects_wrong_rows():
    solver = gram_solver(_randn(4, 6), 4, CurvatureSettings(damping=0.5), "fisher")
    with pytest.raises(InputError, match="rows"):
        solver.solve(torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("n_rows", "dim"), [(4, 10), (10, 4)])
def test_gram_solver_rejects_non_finite_rows(bad, n_rows, dim):
    rows = _randn(n_rows, dim)
    rows[1, 2] = bad
    with pytest.raises(InputError, match="NaN"):
        gram_solver(rows, n_rows, CurvatureSettings(damping=0.1), "fisher")


def test_dense_solver_rejects_non_finite_matrix():
    m = torch.eye(4, dtype=torch.float64)
    m[0, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        dense_solver(m, CurvatureSettings(damping=0.1), "hessian")


# ---- damping retries -----------------------------------------------------------------------


def _indefinite(dim=6, min_eig=-0.5, seed=3):
    q, _ = torch.linalg.qr(_randn(dim, dim, seed=seed))
    evals = torch.linspace(min_eig, 2.0, dim, dtype=torch.float64)
    return q @ torch.diag(evals) @ q.T


def test_indefinite_matrix_retries_with_larger_damping(caplog):
    m = _indefinite(min_eig=-0.5)
    settings = CurvatureSettings(damping=1e-3, retry_factor=10.0)
    with caplog.at_level(logging.WARNING, logger="iif.engine.linalg"):
        solver = dense_solver(m, settings, "hessian")
    # The first damping 1e-3 * 10^k with -0.5 + damping > 0 is 1.0 (k = 3).
    assert solver.retries == 3
    assert solver.damping == pytest.approx(1.0)
    assert solver.damping > settings.damping
    assert any("not positive definite" in r.getMessage() for r in caplog.records)
    _dense_inverse_check(solver, m)


def test_retry_from_zero_damping():
    m = _indefinite(min_eig=-1e-3)
    solver = dense_solver(m, CurvatureSettings(damping=0.0, retry_factor=10.0), "hessian")
    assert solver.retries > 0
    assert solver.damping > 1e-3
    assert float(torch.linalg.eigvalsh(m).min()) + solver.damping > 0
    # The damping before the last one was not enough.
    assert float(torch.linalg.eigvalsh(m).min()) + solver.damping / 10.0 <= 0
    _dense_inverse_check(solver, m)


def test_never_positive_definite_raises_curvature_error():
    m = _indefinite(min_eig=-0.5)
    with pytest.raises(CurvatureError, match="not positive definite") as info:
        dense_solver(m, CurvatureSettings(damping=1e-3, max_retries=0), "hessian")
    assert isinstance(info.value, ValueError)
    with pytest.raises(CurvatureError):
        dense_solver(m, CurvatureSettings(damping=1e-3, max_retries=2), "hessian")


def test_curvature_error_reports_last_tried_damping():
    m = _indefinite(min_eig=-0.5)
    with pytest.raises(CurvatureError) as info:
        dense_solver(m, CurvatureSettings(damping=1e-3, max_retries=2), "hessian")
    # Tried 1e-3, 1e-2 and 1e-1: the message names the largest damping actually tried
    # (1.0 was never tried, and would have succeeded).
    assert "damping 0.1 " in str(info.value)


@pytest.mark.parametrize("kwargs", [{"kind": "lissa"}, {"damping": -1.0},
                                    {"damping": float("nan")}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError, match="curvature|damping"):
        CurvatureSettings(**kwargs)


# ---- fit_curvature on a tiny model -----------------------------------------------------------


def _problem(mlp_factory, kind, seed=0):
    out_dim = 2 if kind == "regression" else 3
    model = mlp_factory(out_dim=out_dim, seed=seed)
    task = Task(model, kind)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    if kind == "regression":
        targets = torch.randn(8, out_dim, generator=gen, dtype=torch.float64)
    else:
        targets = torch.softmax(torch.randn(8, out_dim, generator=gen, dtype=torch.float64), 1)
    return task, FunctionalModel(model), x, targets


def _flat_fn(fmodel, state, x):
    """Model outputs (n, d) as a function of the flat parameter vector."""
    names = fmodel.names
    shapes = [state.params[n].shape for n in names]
    sizes = [state.params[n].numel() for n in names]

    def f(flat):
        params = dict(zip(names, (p.reshape(s) for p, s in
                                  zip(torch.split(flat, sizes), shapes, strict=True)),
                          strict=True))
        return functional_call(fmodel.module, {**params, **state.buffers}, (x,))

    return f


def _loop_grads(task, fmodel, state, x, targets):
    f = _flat_fn(fmodel, state, x)
    flat0 = state.flat().requires_grad_(True)
    rows = []
    for i in range(x.shape[0]):
        loss = task.sample_loss(f(flat0)[i : i + 1], targets[i : i + 1])[0]
        rows.append(torch.autograd.grad(loss, flat0)[0])
    return torch.stack(rows)


def _ggn_matrix(task, fmodel, state, x, targets):
    f = _flat_fn(fmodel, state, x)
    flat0 = state.flat()
    jac = jacrev(f)(flat0)  # (n, d, M)
    out = f(flat0).detach()
    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        h = torch.autograd.functional.hessian(
            lambda o, t=targets[i]: task.sample_loss(o[None], t[None])[0], out[i]
        )
        total += jac[i].T @ h @ jac[i]
    return total / x.shape[0]


def _hessian_matrix(task, fmodel, state, x, targets):
    f = _flat_fn(fmodel, state, x)
    return torch.autograd.functional.hessian(
        lambda flat: task.sample_loss(f(flat), targets).mean(), state.flat()
    )


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_fit_curvature_fisher(mlp_factory, kind):
    task, fmodel, x, targets = _problem(mlp_factory, kind)
    state = fmodel.state()
    u = _loop_grads(task, fmodel, state, x, targets)
    assert u.shape[0] < u.shape[1]  # the Woodbury path
    solver = fit_curvature(CurvatureSettings(kind="fisher", damping=0.01), fmodel, state, x,
                           targets, task, IdentityProjector(fmodel.num_params), u)
    _dense_inverse_check(solver, u.T @ u / x.shape[0])


@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize("damping", [0.02, None])
def test_fit_curvature_ggn(mlp_factory, kind, damping):
    task, fmodel, x, targets = _problem(mlp_factory, kind, seed=1)
    state = fmodel.state()
    ggn = _ggn_matrix(task, fmodel, state, x, targets)
    solver = fit_curvature(CurvatureSettings(**GGN_FULL, damping=damping), fmodel, state, x,
                           targets, task, IdentityProjector(fmodel.num_params), u=None,
                           chunk_size=3)
    assert solver.kind == "ggn"
    if damping is None:
        # the mean over min(M, N) eigenvalues
        rank = min(ggn.shape[0], x.shape[0])
        ratio = CurvatureSettings().default_damping_ratio
        expected_damping = ratio * float(torch.trace(ggn)) / rank
        assert solver.damping == pytest.approx(expected_damping, rel=1e-9)
    _dense_inverse_check(solver, ggn)


def test_fit_curvature_ggn_at_zero_residuals(mlp_factory):
    """At targets equal to the outputs the empirical Fisher vanishes but the GGN does not."""
    task, fmodel, x, _ = _problem(mlp_factory, "regression", seed=2)
    state = fmodel.state()
    targets = fmodel.outputs(state, x)
    u = _loop_grads(task, fmodel, state, x, targets)
    torch.testing.assert_close(u, torch.zeros_like(u), rtol=0, atol=1e-12)
    ggn = fit_curvature(CurvatureSettings(**GGN_FULL, damping=0.1), fmodel, state, x, targets,
                        task, IdentityProjector(fmodel.num_params), u)
    _dense_inverse_check(ggn, _ggn_matrix(task, fmodel, state, x, targets))


def test_fit_curvature_refuses_a_split_hessian(mlp_factory):
    # the explicit Hessian is of the whole training set: no process holds a part of it
    task, fmodel, x, targets = _problem(mlp_factory, "regression", seed=3)
    with pytest.raises(InputError, match="not split across processes"):
        fit_curvature(CurvatureSettings(kind="hessian", damping=0.05), fmodel, fmodel.state(),
                      x, targets, task, IdentityProjector(fmodel.num_params), u=None,
                      chunk_size=3, share=Share(2 * x.shape[0], lambda t: t))


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_fit_curvature_hessian(mlp_factory, kind):
    task, fmodel, x, targets = _problem(mlp_factory, kind, seed=3)
    state = fmodel.state()
    hess = _hessian_matrix(task, fmodel, state, x, targets)
    solver = fit_curvature(CurvatureSettings(kind="hessian", damping=0.05), fmodel, state, x,
                           targets, task, IdentityProjector(fmodel.num_params), u=None,
                           chunk_size=3)
    assert solver.damping >= 0.05
    assert float(torch.linalg.eigvalsh(hess).min()) + solver.damping > 0
    _dense_inverse_check(solver, hess)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_fit_curvature_projected_hessian(mlp_factory, fraction):
    """With a projection A the Hessian curvature is A^T H A, whatever the projected dim."""
    task, fmodel, x, targets = _problem(mlp_factory, "regression", seed=4)
    state = fmodel.state()
    m = fmodel.num_params
    projector = RandomProjector(m, ProjectionSettings(dim=int(m * fraction), seed=1),
                                dtype=torch.float64)
    a = projector.project(torch.eye(m, dtype=torch.float64))
    hess = _hessian_matrix(task, fmodel, state, x, targets)
    solver = fit_curvature(CurvatureSettings(kind="hessian", damping=0.5), fmodel, state, x,
                           targets, task, projector, u=None)
    assert solver.dim == projector.dim
    _dense_inverse_check(solver, a.T @ hess @ a)


def test_fit_curvature_projected_ggn(mlp_factory):
    task, fmodel, x, targets = _problem(mlp_factory, "classification", seed=5)
    state = fmodel.state()
    m = fmodel.num_params
    projector = RandomProjector(m, ProjectionSettings(dim=10, seed=2), dtype=torch.float64)
    a = projector.project(torch.eye(m, dtype=torch.float64))
    ggn = _ggn_matrix(task, fmodel, state, x, targets)
    solver = fit_curvature(CurvatureSettings(**GGN_FULL, damping=0.05), fmodel, state, x,
                           targets, task, projector, u=None)
    _dense_inverse_check(solver, a.T @ ggn @ a)


def test_default_damping_averages_over_the_rank_bound(mlp_factory):
    # N < M: the empirical Fisher has at most N nonzero eigenvalues, so the default damping is
    # ratio x trace / N, not ratio x trace / M (which shrinks with the model size)
    task, fmodel, x, targets = _problem(mlp_factory, "classification")
    state = fmodel.state()
    u = _loop_grads(task, fmodel, state, x, targets)
    n, m = u.shape
    assert n < m
    solver = fit_curvature(CurvatureSettings(kind="fisher"), fmodel, state, x, targets, task,
                           IdentityProjector(m), u)
    trace = float((u.double() ** 2).sum()) / n
    ratio = CurvatureSettings().default_damping_ratio
    assert solver.damping == pytest.approx(ratio * trace / n, rel=1e-9)
    assert rank_bound(n, m, m) == n
    assert rank_bound(n, 5, m) == 5
