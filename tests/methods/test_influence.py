"""Influence functions against closed forms, explicit curvature and exact retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import iif
from iif import CurvatureSettings, ProjectionSettings, Recipe, Task
from iif.engine.curvature import CGSettings
from iif.methods.influence import InfluenceFunction

from .reference import (
    flat_model,
    ggn,
    influence,
    max_rel,
    removal_drops,
    safe_damping,
    sample_grads,
    targets,
    train_hessian,
)


def _least_squares(n=40, d=3, seed=2, noise=0.3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = np.hstack([rng.normal(size=(n, d)), np.ones((n, 1))])
    y = x[:, :d] @ w + 0.3 + noise * rng.standard_t(3, size=n)
    xt = np.hstack([rng.normal(size=(6, d)), np.ones((6, 1))])
    yt = xt[:, :d] @ w + 0.3 + noise * rng.normal(size=6)
    theta = np.linalg.lstsq(x, y, rcond=None)[0]
    model = nn.Linear(d + 1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(theta)[None])
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=10))
    return task, x, y[:, None], xt, yt[:, None], theta


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_exact_if_equals_closed_form_least_squares(kind):
    """-(1/N) g_test^T H^{-1} g_i with H = (2/N) X^T X, g = 2 (x^T theta - y) x, in numpy."""
    task, x, y, xt, yt, theta = _least_squares()
    n = len(x)
    scores = InfluenceFunction(task, (x, y), curvature=CurvatureSettings(kind=kind, damping=0.0)
                               ).attribute((xt, yt)).scores
    g_train = 2 * (x @ theta - y[:, 0])[:, None] * x
    g_test = 2 * (xt @ theta - yt[:, 0])[:, None] * xt
    hess = 2 * x.T @ x / n
    expected = -g_test @ np.linalg.solve(hess, g_train.T) / n
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-14)


def test_exact_if_ranks_like_leave_one_out():
    task, x, y, xt, yt, theta = _least_squares(n=60, noise=0.5, seed=1)
    # test residuals near 1: the first-order change dominates the squared loss (a test sample
    # fitted almost exactly sees only second-order changes, which no influence estimate models)
    yt = yt + 1.0
    scores = InfluenceFunction(task, (x, y), curvature=CurvatureSettings(kind="hessian",
                                                                         damping=0.0)
                               ).attribute((xt, yt)).scores

    def test_losses(th):
        return (xt @ th - yt[:, 0]) ** 2

    full = test_losses(theta)
    loo = np.array([test_losses(np.linalg.lstsq(np.delete(x, i, 0), np.delete(y[:, 0], i),
                                                rcond=None)[0]) for i in range(len(x))])
    for s in range(len(xt)):
        # score = change of the test loss from including i = full - without i
        assert spearmanr(scores[s], full[s] - loo[:, s])[0] > 0.95


def _explicit_if(problem, kind, damping):
    theta, forward = flat_model(problem.task.model)
    x, t = torch.as_tensor(problem.x), targets(problem.kind, problem.y, problem.classes)
    xt, tt = torch.as_tensor(problem.xt), targets(problem.kind, problem.yt, problem.classes)
    g = sample_grads(forward, theta, problem.kind, x, t)
    if kind == "hessian":
        curv = train_hessian(forward, theta, problem.kind, x, t)
    elif kind == "ggn":
        curv = ggn(forward, theta, problem.kind, x, t)
    else:
        curv = g.T @ g / len(x)
    damping = safe_damping(curv) if damping is None else damping
    g_test = sample_grads(forward, theta, problem.kind, xt, tt)
    return influence(curv, damping, g_test, g), damping


@pytest.mark.parametrize("kind", ["fisher", "ggn", "hessian"])
@pytest.mark.parametrize("problem_name", ["mlp_regression", "mlp_classifier"])
def test_exact_and_cg_equal_explicit_curvature(request, problem_name, kind):
    problem = request.getfixturevalue(problem_name)
    expected, damping = _explicit_if(problem, kind, None)
    # the full Gauss-Newton matrix (every direction of the output Hessian)
    settings = CurvatureSettings(kind=kind, damping=damping, ggn_rank=None)
    data, test = (problem.x, problem.y), (problem.xt, problem.yt)
    exact = InfluenceFunction(problem.task, data, curvature=settings).attribute(test)
    assert max_rel(exact.scores, expected) < 1e-8
    assert exact.info["solver"]["retries"] == 0
    cg = InfluenceFunction(problem.task, data, curvature=settings, solver="cg",
                           cg=CGSettings(max_iter=500, tol=1e-10)).attribute(test)
    report = cg.info["solver"]
    assert report["cg_converged"] and report["retries"] == 0
    assert 1 < report["cg_iterations"][0] <= 500
    assert max_rel(cg.scores, expected) < 1e-6


def test_cg_stops_at_max_iter_and_says_so(mlp_classifier, caplog):
    p = mlp_classifier
    method = InfluenceFunction(p.task, (p.x, p.y), solver="cg",
                               curvature=CurvatureSettings(kind="ggn", damping=1e-6),
                               cg=CGSettings(max_iter=2, tol=1e-12))
    result = method.attribute((p.xt, p.yt))
    assert result.info["solver"]["cg_iterations"] == [2]
    assert not result.info["solver"]["cg_converged"]
    assert "conjugate gradients stopped" in caplog.text


def test_cg_retries_indefinite_hessian_with_more_damping(mlp_regression, caplog):
    p = mlp_regression
    theta, forward = flat_model(p.task.model)
    curv = train_hessian(forward, theta, "regression", torch.as_tensor(p.x),
                         targets("regression", p.y))
    lowest = float(torch.linalg.eigvalsh(curv).min())
    if lowest >= 0:
        pytest.skip("the trained Hessian happens to be positive semi-definite")
    start = abs(lowest) / 100  # not enough: C + damping I is indefinite
    method = InfluenceFunction(p.task, (p.x, p.y), solver="cg",
                               curvature=CurvatureSettings(kind="hessian", damping=start))
    report = method.attribute((p.xt, p.yt)).info["solver"]
    assert report["retries"] >= 1 and report["damping"] > abs(lowest)
    assert "not positive definite" in caplog.text


def test_default_damping_cg_and_exact_fisher_agree(mlp_classifier):
    """The default damping uses the exact Fisher trace in both solvers."""
    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt, p.yt)
    fisher = CurvatureSettings(kind="fisher")
    exact = InfluenceFunction(p.task, data, curvature=fisher).attribute(test)
    cg = InfluenceFunction(p.task, data, solver="cg", curvature=fisher,
                           cg=CGSettings(tol=1e-10)).attribute(test)
    assert exact.info["solver"]["damping"] == pytest.approx(cg.info["solver"]["damping"],
                                                            rel=1e-10)
    assert max_rel(cg.scores, exact.scores) < 1e-6


# Kronecker factors at full size are invertible but not orthogonal: the damping acts on
# A^T C A, so a low-rank curvature (60 samples, rank-1 Gauss-Newton rows) keeps a distance
# from the exact solve that dense projections, orthogonal in the limit, lose
@pytest.mark.parametrize(("structure", "kind"), [("dense", "fisher"), ("kronecker", "fisher"),
                                                 ("dense", "ggn")])
def test_projected_approaches_exact(mlp_classifier, structure, kind):
    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt, p.yt)
    settings = CurvatureSettings(kind=kind, damping=1e-3)
    exact = InfluenceFunction(p.task, data, curvature=settings).attribute(test).scores
    errors = {}
    for dim in (8, 64, 1024):
        errors[dim] = np.mean([
            max_rel(InfluenceFunction(p.task, data, curvature=settings, solver="projected",
                                      projection=ProjectionSettings(dim=dim, seed=seed,
                                                                    structure=structure)
                                      ).attribute(test).scores, exact)
            for seed in (0, 1)])
    assert errors[1024] < min(errors[64], errors[8])
    if kind == "fisher":
        assert errors[64] < errors[8]
    assert errors[1024] < 0.3


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_self_influence_is_the_diagonal(mlp_regression, solver):
    p = mlp_regression
    method = InfluenceFunction(p.task, (p.x, p.y), solver=solver,
                               curvature=CurvatureSettings(damping=1e-2))
    full = method.attribute((p.x, p.y)).scores
    idx = np.array([0, 5, 17, 59])
    np.testing.assert_allclose(method.self_influence(idx), np.diag(full)[idx], rtol=1e-6)
    assert np.all(method.self_influence() < 0)  # -(1/N) g^T C^{-1} g with C positive definite


def test_removing_top_positive_samples_lowers_test_loss():
    task, x, y, xt, yt, _ = _least_squares(n=60, noise=0.5, seed=0)
    # test residuals of +-1: removing 8 samples moves a prediction by more than a small residual,
    # and the overshoot (second order) would hide the first-order effect being tested
    yt = yt + np.where(np.arange(len(yt)) % 2, 1.0, -1.0)[:, None]
    scores = InfluenceFunction(task, (x, y)).attribute((xt, yt)).scores
    rng = np.random.default_rng(0)

    top, rand, _ = removal_drops(x, y[:, 0], xt, yt[:, 0], scores, rng)
    assert top.mean() < min(0.0, rand.mean())
    assert np.mean(top < rand) >= 5 / 6


def test_ensemble_of_one_and_average_over_models(mlp_classifier):
    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt, p.yt)
    settings = CurvatureSettings(damping=1e-2)
    models = iif.engine.training.train_ensemble(p.task, data, 2, seed=3)
    singles = [InfluenceFunction(Task(m, "classification", p.task.recipe), data,
                                 curvature=settings).attribute(test).scores for m in models]
    one = InfluenceFunction(p.task, data, curvature=settings, models=models[:1]).attribute(test)
    np.testing.assert_array_equal(one.scores, singles[0])
    both = InfluenceFunction(p.task, data, curvature=settings, models=models)
    result = both.attribute(test)
    np.testing.assert_allclose(result.scores, (singles[0] + singles[1]) / 2, rtol=1e-12)
    assert result.info["ensemble_size"] == 2 and len(result.info["members"]) == 2
    assert result.settings["ensemble_size"] == 2
    self_both = both.self_influence([0, 1])
    self_singles = [InfluenceFunction(Task(m, "classification", p.task.recipe), data,
                                      curvature=settings).self_influence([0, 1]) for m in models]
    np.testing.assert_allclose(self_both, np.mean(self_singles, axis=0), rtol=1e-12)


def test_bad_settings_raise(mlp_regression):
    p = mlp_regression
    data = (p.x, p.y)
    for kwargs, words in [({"solver": "lissa"}, "solver"),
                          ({"solver": "projected"}, "dim"),
                          ({"solver": "exact", "projection": ProjectionSettings(dim=8)},
                           "does not project"),
                          ({"trace_probes": 0}, "trace_probes"),
                          ({"models": []}, "at least one"),
                          ({"models": [nn.Linear(3, 1).double()]}, "parameters")]:
        with pytest.raises(ValueError, match=words):
            InfluenceFunction(p.task, data, **kwargs)
    with pytest.raises(ValueError, match="max_iter"):
        CGSettings(max_iter=0)


def test_a_projection_chooses_the_projected_solver(mlp_classifier, caplog):
    p = mlp_classifier
    auto = InfluenceFunction(p.task, (p.x, p.y), projection=ProjectionSettings(dim=8))
    explicit = InfluenceFunction(p.task, (p.x, p.y), solver="projected",
                                 projection=ProjectionSettings(dim=8))
    assert auto.effective_solver == "projected" and auto.solver == "auto"
    a, b = auto.attribute((p.xt, p.yt)), explicit.attribute((p.xt, p.yt))
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.settings["solver"] == "projected" and a.settings["projection_dim"] == 8
    assert InfluenceFunction(p.task, (p.x, p.y)).effective_solver == "exact"
    # a dimension of at least the parameter count: exact gradients, said and recorded
    m = sum(q.numel() for q in p.task.model.parameters())
    with caplog.at_level("WARNING", logger="iif"):
        big = InfluenceFunction(p.task, (p.x, p.y), projection=ProjectionSettings(dim=m + 5))
    assert f"projection dim {m + 5} is at least the model's {m} parameters" in caplog.text
    assert big.settings()["projection_dim"] == m
    exact = InfluenceFunction(p.task, (p.x, p.y), solver="exact")
    exact_projected = InfluenceFunction(p.task, (p.x, p.y), solver="projected",
                                        projection=ProjectionSettings(dim=m))
    np.testing.assert_allclose(exact_projected.attribute((p.xt, p.yt)).scores,
                               exact.attribute((p.xt, p.yt)).scores, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["fisher", "ggn"])
@pytest.mark.parametrize("solver", ["exact", "projected"])
def test_one_featurisation_serves_several_dampings(mlp_classifier, kind, solver):
    p = mlp_classifier
    projection = ProjectionSettings(dim=24) if solver == "projected" else None
    test = (p.xt, p.yt)
    method = InfluenceFunction(p.task, (p.x, p.y), curvature=CurvatureSettings(kind=kind),
                               solver=solver, projection=projection)
    values = [1e-3, 1e-1]
    swept = method.attribute_dampings(test, values)
    for value, result in zip(values, swept, strict=True):
        alone = InfluenceFunction(p.task, (p.x, p.y), solver=solver, projection=projection,
                                  curvature=CurvatureSettings(kind=kind, damping=value))
        expected = alone.attribute(test).scores
        np.testing.assert_allclose(result.scores, expected, rtol=1e-9,
                                   atol=1e-12 * np.abs(expected).max())
        assert result.settings["curvature"]["damping"] == value
    assert not np.allclose(swept[0].scores, swept[1].scores)
    ratio = method.attribute_dampings(test, [0.3], relative=True)[0]
    default = InfluenceFunction(p.task, (p.x, p.y), solver=solver, projection=projection,
                                curvature=CurvatureSettings(kind=kind, default_damping_ratio=0.3))
    np.testing.assert_allclose(ratio.scores, default.attribute(test).scores, rtol=1e-9)
    with pytest.raises(ValueError, match="dampings"):
        method.attribute_dampings(test, [-1.0])


@pytest.mark.parametrize("curvature", [CurvatureSettings(), CurvatureSettings(kind="ggn"),
                                       CurvatureSettings(kind="ggn", ggn_rank=1)])
def test_factored_exact_solves_equal_per_sample_gradient_solves(mlp_classifier, monkeypatch,
                                                                curvature):
    p = mlp_classifier
    method = InfluenceFunction(p.task, (p.x, p.y), curvature=curvature)
    assert method._use_factored()
    factored = method.attribute((p.xt, p.yt))
    monkeypatch.setattr(InfluenceFunction, "_use_factored", lambda self: False)
    dense = InfluenceFunction(p.task, (p.x, p.y), curvature=curvature).attribute((p.xt, p.yt))
    np.testing.assert_allclose(factored.scores, dense.scores, rtol=1e-8,
                               atol=1e-10 * np.abs(dense.scores).max())
    assert factored.info["solver"]["damping"] == pytest.approx(
        dense.info["solver"]["damping"], rel=1e-9)


def test_truncated_ggn_keeps_the_top_output_hessian_directions(mlp_classifier):
    # rank d is the full Gauss-Newton matrix; rank r keeps the r largest eigen-directions of
    # each sample's output Hessian, so its trace is the sum of those eigenvalues
    from iif.engine.functional import FunctionalModel
    from iif.engine.grads import ggn_factor

    p = mlp_classifier
    fmodel = FunctionalModel(p.task.model)
    out = fmodel.outputs(fmodel.state(), torch.as_tensor(p.x))
    targets = p.task.validate((p.x, p.y)).targets
    full = ggn_factor(p.task, out, targets)
    top = ggn_factor(p.task, out, targets, rank=1)
    h = full @ full.transpose(1, 2)
    evals = torch.linalg.eigvalsh(h)
    torch.testing.assert_close((top ** 2).sum((1, 2)), evals[:, -1], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close((full ** 2).sum((1, 2)), evals.clamp_min(0).sum(1), rtol=1e-8,
                               atol=1e-12)
    with pytest.raises(ValueError, match="ggn_rank"):
        CurvatureSettings(kind="ggn", ggn_rank=0)


def test_cg_uses_the_same_truncated_gauss_newton_as_exact(mlp_classifier):
    p = mlp_classifier
    settings = CurvatureSettings(kind="ggn", ggn_rank=1, damping=1e-2)
    data, test = (p.x, p.y), (p.xt, p.yt)
    exact = InfluenceFunction(p.task, data, curvature=settings).attribute(test)
    cg = InfluenceFunction(p.task, data, curvature=settings, solver="cg",
                           cg=CGSettings(max_iter=500, tol=1e-10)).attribute(test)
    assert max_rel(cg.scores, exact.scores) < 1e-6
