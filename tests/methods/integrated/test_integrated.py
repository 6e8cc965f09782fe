"""Integrated Influence against independent computations.

Reference values are computed here from the definitions (explicit Hessians, per-sample
gradients and least-squares fits with torch.autograd / torch.func / numpy), never from the
engine's own outputs. Sign convention: a score > 0 means including the training sample raises
the test loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import hessian, jacrev

import iif
from iif import (
    Attribution,
    BaselineSettings,
    CurvatureSettings,
    IntegratedInfluence,
    PathSettings,
    ProjectionSettings,
    Recipe,
    Task,
)
from iif.engine.engine import Budget, Engine
from iif.engine.functional import FunctionalModel
from iif.methods.integrated.baseline import mean_loss, trivial_loss, unlearned_baselines
from iif.methods.integrated.linear import (
    linear_delta,
    linear_fit,
    linear_iif,
    linear_test_losses,
    linear_unlearning_baseline,
)

from ..reference import (
    Problem,
    flat_model,
    ggn,
    influence,
    loss,
    losses,
    max_rel,
    mlp,
    removal_drops,
    safe_damping,
    sample_grads,
    targets,
    train_hessian,
)


# ---- (a) Lemma 2.5 / Corollary 2.6: K = 1 is the influence function -----------------------------
def _k1_against_if(problem: Problem, kind: str, sparse: bool):
    """IIF with K=1 and baseline f(x; theta*), and the IF with the same damped curvature."""
    model = problem.task.model
    theta, forward = flat_model(model)
    x = torch.as_tensor(problem.x)
    t = targets(problem.kind, problem.y, problem.classes)
    xt = torch.as_tensor(problem.xt)
    tt = targets(problem.kind, problem.yt, problem.classes)
    if kind == "hessian":
        curv = train_hessian(forward, theta, problem.kind, x, t)
    elif kind == "ggn":
        curv = ggn(forward, theta, problem.kind, x, t)
    else:
        g = sample_grads(forward, theta, problem.kind, x, t)
        curv = g.T @ g / x.shape[0]
    damping = safe_damping(curv)
    g_train = sample_grads(forward, theta, problem.kind, x, t)
    g_test = sample_grads(forward, theta, problem.kind, xt, tt)
    reference = influence(curv, damping, g_test, g_train)

    with torch.no_grad():
        out = model(x)
    base = out if problem.kind == "regression" else torch.softmax(out, -1)
    method = IntegratedInfluence(
        problem.task, (problem.x, problem.y),
        path=PathSettings(steps=1, sparse=sparse),
        curvature=CurvatureSettings(kind=kind, damping=damping, ggn_rank=None),  # full GGN
    )
    result = method.attribute((problem.xt, problem.yt), baseline_targets=base.numpy())
    assert result.info["damping_retries"] == 0
    assert result.info["damping"] == [damping]
    return result.scores, reference, torch.softmax(out, -1)


@pytest.mark.parametrize("fixture", ["mlp_regression", "linear_regression"])
def test_k1_equals_influence_function_regression(fixture, request):
    problem = request.getfixturevalue(fixture)
    scores, reference, _ = _k1_against_if(problem, "hessian", sparse=False)
    assert np.abs(reference).max() > 1e-6
    assert max_rel(scores, reference) < 1e-6


@pytest.mark.parametrize("kind", ["hessian", "fisher", "ggn"])
def test_k1_equals_influence_function_classification(mlp_classifier, kind):
    scores, reference, _ = _k1_against_if(mlp_classifier, kind, sparse=False)
    assert np.abs(reference).max() > 1e-6
    assert max_rel(scores, reference) < 1e-6


def test_k1_sparse_targets_scale_influence_by_one_minus_p(mlp_classifier):
    scores, reference, probs = _k1_against_if(mlp_classifier, "hessian", sparse=True)
    p_true = probs[torch.arange(len(mlp_classifier.y)), torch.as_tensor(mlp_classifier.y)]
    expected = reference * (1.0 - p_true.numpy())[None, :]
    assert max_rel(scores, expected) < 1e-6
    # and the factor matters: the dense IF itself is not the answer
    assert max_rel(scores, reference) > 1e-2


def _theta_star_baseline(problem: Problem) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(problem.task.model(torch.as_tensor(problem.x)), -1).numpy()


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_k1_with_kronecker_curvature_equals_its_influence_function(mlp_classifier, kind):
    p = mlp_classifier
    curvature = CurvatureSettings(kind=kind, damping=1e-3)
    want = iif.InfluenceFunction(p.task, (p.x, p.y), curvature=curvature,
                                 progress=False).attribute((p.xt, p.yt)).scores
    got = IntegratedInfluence(p.task, (p.x, p.y), path=PathSettings(steps=1, sparse=False),
                              curvature=curvature, progress=False).attribute(
        (p.xt, p.yt), baseline_targets=_theta_star_baseline(p)).scores
    assert np.abs(want).max() > 1e-6
    assert max_rel(got, want) < 1e-6


def test_kronecker_curvature_needs_unprojected_gradients(mlp_classifier):
    p = mlp_classifier
    with pytest.raises(ValueError, match=r"curvature 'ekfac' solves unprojected gradients: "
                                         r"use projection=None"):
        IntegratedInfluence(p.task, (p.x, p.y), projection=iif.ProjectionSettings(dim=16),
                            curvature=CurvatureSettings(kind="ekfac"))


def test_one_curvature_for_the_whole_path_telescopes_to_the_influence_function(
        mlp_classifier):
    # path models that stay at theta* (epochs 0) and theta*'s curvature at every step: the K
    # steps' psi telescope, so K = 3 gives the K = 1 scores, the influence function (Lemma
    # 2.5); fitting the curvature at each step's targets does not
    p = mlp_classifier
    curvature = CurvatureSettings(damping=1e-2)
    want = iif.InfluenceFunction(p.task, (p.x, p.y), curvature=curvature,
                                 progress=False).attribute((p.xt, p.yt)).scores
    base = _theta_star_baseline(p)
    path = PathSettings(steps=3, epochs=0, sparse=False)

    def scores(fit: str) -> np.ndarray:
        method = IntegratedInfluence(p.task, (p.x, p.y), path=path, progress=False,
                                     curvature=dataclasses.replace(curvature, path_fit=fit))
        return method.attribute((p.xt, p.yt), baseline_targets=base).scores

    assert max_rel(scores("once"), want) < 1e-6
    assert max_rel(scores("each"), want) > 1e-3


# ---- (b) linear regression: closed form and the engine ---------------------------------------
def _linear_data(seed: int = 1, n: int = 80, dim: int = 5, d: int = 2, n_test: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    w = rng.normal(size=(dim, d))
    y = x @ w + 0.5 * rng.normal(size=(n, d))
    xt = rng.normal(size=(n_test, dim))
    yt = xt @ w + 0.5 * rng.normal(size=(n_test, d))
    ybar = x @ (w + 0.3 * rng.normal(size=(dim, d))) + 0.3 * rng.normal(size=(n, d))
    return x, y, xt, yt, ybar


def _lstsq_losses(x, targets, xt, yt):
    theta = np.linalg.lstsq(x, targets, rcond=None)[0]
    return np.mean((xt @ theta - yt) ** 2, axis=1)


def test_linear_closed_form_completeness_is_exact():
    x, y, xt, yt, ybar = _linear_data()
    delta = _lstsq_losses(x, y, xt, yt) - _lstsq_losses(x, ybar, xt, yt)
    scores = linear_iif(x, y, xt, yt, ybar)
    assert scores.shape == (4, 80)
    assert np.abs(delta).min() > 1e-3
    np.testing.assert_allclose(scores.sum(1), delta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(linear_delta(x, y, xt, yt, ybar), delta, rtol=1e-8, atol=1e-10)
    # one baseline per test sample (n_test, N, d)
    rng = np.random.default_rng(5)
    per_test = ybar[None] + 0.2 * rng.normal(size=(4,) + ybar.shape)
    scores = linear_iif(x, y, xt, yt, per_test)
    for s in range(4):
        d_s = (_lstsq_losses(x, y, xt[s : s + 1], yt[s : s + 1])
               - _lstsq_losses(x, per_test[s], xt[s : s + 1], yt[s : s + 1]))
        np.testing.assert_allclose(scores[s].sum(), d_s[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("steps", [None, 3])
def test_linear_closed_form_matches_the_integral_definition(steps):
    """-int G(t)^T H^{-1} (1/N) J_i rho_i'(t) dt evaluated literally with torch.func."""
    x, y, xt, yt, ybar = _linear_data(n=30, dim=3, d=2, n_test=2)
    n, dim = x.shape
    d = y.shape[1]
    X, Y, Ybar = (torch.as_tensor(a) for a in (x, y, ybar))

    def train_loss(th, rho):
        return ((X @ th.reshape(dim, d) - rho) ** 2).mean(-1).mean()

    def sample_grad(th, xi, rho_i):
        return torch.func.grad(lambda q: ((xi @ q.reshape(dim, d) - rho_i) ** 2).mean())(th)

    if steps is None:
        nodes, weights = np.polynomial.legendre.leggauss(3)
        ts, ws = (nodes + 1) / 2, weights / 2
    else:
        ts, ws = np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    expected = np.zeros((2, n))
    for tk, wk in zip(ts, ws, strict=True):
        rho = tk * Y + (1 - tk) * Ybar
        th = torch.as_tensor(np.linalg.lstsq(x, rho.numpy(), rcond=None)[0]).reshape(-1)
        h = hessian(lambda q, r=rho: train_loss(q, r))(th)
        for s in range(2):
            xs, ys = torch.as_tensor(xt[s]), torch.as_tensor(yt[s])
            g = torch.func.grad(
                lambda q, xs=xs, ys=ys: ((xs @ q.reshape(dim, d) - ys) ** 2).mean())(th)
            hg = torch.linalg.solve(h, g)
            for i in range(n):
                # J_i rho_i' as the derivative in epsilon of grad_theta l(theta, rho_i + eps rho')
                _, jdy = torch.func.jvp(lambda r, i=i, th=th: sample_grad(th, X[i], r),
                                        (rho[i],), (Y[i] - Ybar[i],))
                expected[s, i] += -wk * float(hg @ jdy) / n
    got = linear_iif(x, y, xt, yt, ybar, steps=steps)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_linear_unlearning_baseline_is_the_stationary_point():
    x, y, xt, yt, _ = _linear_data(n=50, dim=4, d=2)
    X, Y = torch.as_tensor(x), torch.as_tensor(y)
    xs, ys = torch.as_tensor(xt[0]), torch.as_tensor(yt[0])
    for direction, sign in (("unlearn", -1.0), ("reinforce", 1.0)):
        lam = 30.0
        theta = linear_unlearning_baseline(x, y, xt[0], yt[0], lam, direction)
        th = torch.as_tensor(theta).requires_grad_(True)
        objective = (((X @ th - Y) ** 2).mean(-1).mean()
                     + sign * ((xs @ th - ys) ** 2).mean() / lam)
        (grad,) = torch.autograd.grad(objective, th)
        assert float(grad.abs().max()) < 1e-10
        h = hessian(lambda q, s=sign, lam=lam: (((X @ q - Y) ** 2).mean(-1).mean()
                                                + s * ((xs @ q - ys) ** 2).mean() / lam))(
            th.detach())
        assert float(torch.linalg.eigvalsh(h.reshape(theta.size, theta.size)).min()) > 0
    unlearned = linear_unlearning_baseline(x, y, xt[0], yt[0], 30.0)
    assert linear_test_losses(unlearned, xt[:1], yt[:1])[0] > linear_test_losses(
        linear_fit(x, y), xt[:1], yt[:1])[0]
    with pytest.raises(ValueError, match="positive definite"):
        linear_unlearning_baseline(x, y, 10 * xt[0], yt[0], 0.5)


def _linear_engine(x, y, steps, epochs, baseline=None):
    """nn.Linear without bias at the least-squares fit, full-batch path models."""
    n, dim = x.shape
    d = y.shape[1]
    model = nn.Linear(dim, d, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(np.linalg.lstsq(x, y, rcond=None)[0].T))
    lam_max = float(np.linalg.eigvalsh(2.0 * x.T @ x / (n * d)).max())
    lr = 1.0 / lam_max
    task = Task(model, "regression", Recipe(lr=lr, epochs=1, batch_size=n))
    return IntegratedInfluence(
        task, (x, y), baseline=baseline,
        path=PathSettings(steps=steps, epochs=epochs, lr=lr, batch_size=n),
        curvature=CurvatureSettings(kind="hessian", damping=1e-10),
    )


def test_engine_agrees_with_linear_closed_form():
    """SGD path models + explicit Hessian reproduce the closed form.

    The engine is the right-endpoint Euler sum (G at t_k = k/K), so it matches
    ``linear_iif(steps=K)`` to solver precision; against the exact integral its error is the
    Euler error, which is O(1/K): the mean residual over the path is
    ``r' + (K+1)/(2K) (r* - r')`` instead of ``(r* + r')/2``, off by ``(r* - r')/(2K)``.
    """
    x, y, xt, yt, ybar = _linear_data()
    exact = linear_iif(x, y, xt, yt, ybar)
    errors = {}
    for steps in (16, 32):
        result = _linear_engine(x, y, steps, epochs=80).attribute((xt, yt), baseline_targets=ybar)
        assert result.info["damping_retries"] == 0
        euler = linear_iif(x, y, xt, yt, ybar, steps=steps)
        assert max_rel(result.scores, euler) < 1e-7
        errors[steps] = max_rel(result.scores, exact)
        # the closed form's Euler error is the whole error, and it is first order
        assert errors[steps] <= max_rel(euler, exact) + 1e-7
        for s in range(len(xt)):
            assert spearmanr(result.scores[s], exact[s])[0] > 0.99
        np.testing.assert_allclose(result.completeness["delta"],
                                   linear_delta(x, y, xt, yt, ybar), rtol=1e-7)
        np.testing.assert_allclose(result.completeness["sum"], euler.sum(1), rtol=1e-7)
    assert errors[32] < 0.05
    assert 1.8 < errors[16] / errors[32] < 2.2


def test_engine_unlearning_baseline_matches_linear_closed_form():
    """Per-test unlearning run to convergence lands on the exact minimiser of Eq. 12."""
    x, y, xt, yt, _ = _linear_data(n=60, dim=4, d=1, n_test=3)
    n = x.shape[0]
    lam = 40.0
    lr = 1.0 / float(np.linalg.eigvalsh(2.0 * x.T @ x / n).max())
    method = _linear_engine(
        x, y, steps=4, epochs=80,
        baseline=BaselineSettings(lam=lam, epochs=300, lr=lr, batch_size=n),
    )
    result = method.attribute((xt, yt))
    assert result.info["fallbacks"] == 0
    thetas = [linear_unlearning_baseline(x, y, xt[s], yt[s], lam) for s in range(3)]
    ybar = np.stack([x @ th for th in thetas])  # (n_test, N, 1)
    np.testing.assert_allclose(result.completeness["delta"], linear_delta(x, y, xt, yt, ybar),
                               rtol=1e-6)
    assert np.all(result.completeness["delta"] < 0)
    expected = linear_iif(x, y, xt, yt, ybar, steps=4)
    assert max_rel(result.scores, expected) < 1e-6


# ---- (c) completeness on a small MLP -----------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_student() -> Problem:
    """A 5-3-1 tanh MLP fitted (L-BFGS) to a teacher of the same shape: 22 params, N=150."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(0.5 * torch.as_tensor(rng.normal(size=tuple(p.shape))))
        teacher[2].weight.mul_(4.0)
    x = rng.normal(size=(150, 5))
    xt = rng.normal(size=(3, 5))
    with torch.no_grad():
        y = teacher(torch.as_tensor(x)).numpy() + 0.1 * rng.normal(size=(150, 1))
        yt = teacher(torch.as_tensor(xt)).numpy() + 0.1 * rng.normal(size=(3, 1))
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    model.load_state_dict(teacher.state_dict())
    X, Y = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-13,
                            tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    task = Task(model, "regression", Recipe(lr=0.1, momentum=0.9, epochs=1, batch_size=150))
    return Problem(task, x, y, xt, yt)


@pytest.mark.slow
def test_completeness_gap_shrinks_with_k(teacher_student):
    p = teacher_student
    theta, forward = flat_model(p.task.model)
    x, t = torch.as_tensor(p.x), torch.as_tensor(p.y)
    grad = torch.func.grad(lambda th: loss("regression", forward(th, x), t).mean())(theta)
    assert float(grad.norm()) < 1e-5  # theta* is a minimiser
    assert float(torch.linalg.eigvalsh(train_hessian(forward, theta, "regression", x, t))[0]) > 0

    gaps = {}
    for steps in (1, 4, 16):
        method = IntegratedInfluence(
            p.task, (p.x, p.y),
            baseline=BaselineSettings(lam=10.0, epochs=5, batch_size=150),
            path=PathSettings(steps=steps, epochs=100, batch_size=150),
            # the path integral's curvature at every path model (auto fits it once for a
            # Hessian, whose scores then telescope towards the influence function instead)
            curvature=CurvatureSettings(kind="hessian", damping=1e-9, path_fit="each"),
        )
        result = method.attribute((p.xt, p.yt))
        assert result.info["fallbacks"] == 0
        assert result.info["damping_retries"] == 0
        comp = result.completeness
        assert np.all(comp["delta"] < 0)  # unlearning raised every test loss
        gaps[steps] = comp["gap"]
    assert np.all(gaps[1] > gaps[4])
    assert np.all(gaps[4] > gaps[16])
    assert gaps[16].max() < 0.06
    # first-order convergence: 4x the steps cut the gap by clearly more than 2x
    assert np.all(gaps[4] / gaps[16] > 2.5)


# ---- (d) projection ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def projection_problem() -> Problem:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3))
    x = rng.normal(size=(150, 6))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(150, 3)), 1)
    xt = rng.normal(size=(4, 6))
    yt = np.argmax(xt @ w, 1)
    task = Task(mlp([6, 24, 3], 0), "classification", Recipe(lr=0.3, epochs=200, batch_size=50))
    iif.train(task, (x, y), seed=0)
    return Problem(task, x, y, xt, yt, classes=3)  # 243 parameters


def _projected(problem: Problem, dim, seed=0, damping=None):
    method = IntegratedInfluence(
        problem.task, (problem.x, problem.y),
        baseline=BaselineSettings(mode="shared", epochs=3),
        path=PathSettings(steps=2),
        projection=ProjectionSettings(dim=dim, seed=seed),
        curvature=CurvatureSettings(kind="fisher", damping=damping),
    )
    return method.attribute((problem.xt, problem.yt)).scores


def _agreement(scores, reference):
    corr = np.mean([pearsonr(scores[s], reference[s])[0] for s in range(len(scores))])
    rel = np.linalg.norm(scores - reference) / np.linalg.norm(reference)
    return corr, rel


@pytest.mark.slow
def test_projected_scores_approach_unprojected(projection_problem):
    damping = 1e-3
    reference = _projected(projection_problem, None, damping=damping)
    corr, rel = {}, {}
    for dim in (16, 48, 96, 240):  # of 243 parameters (from 243 on: exact, see below)
        pairs = [_agreement(_projected(projection_problem, dim, seed, damping), reference)
                 for seed in (0, 1)]
        corr[dim], rel[dim] = np.mean(pairs, axis=0)
    dims = sorted(corr)
    for lo, hi in zip(dims[:-1], dims[1:], strict=True):
        assert corr[hi] > corr[lo] + 0.02
        assert rel[hi] < rel[lo] - 0.02
    assert corr[240] > 0.93
    assert corr[16] < 0.6  # a 16-dim projection of 243 parameters is visibly lossy


def test_a_projection_as_wide_as_the_model_is_the_exact_gradient(projection_problem):
    """P >= the parameter count (243) uses the exact gradients (a random projection that wide
    only adds noise), so the scores equal the unprojected ones and record the dimension."""
    reference = _projected(projection_problem, None)
    for dim in (243, 1024):
        np.testing.assert_array_equal(_projected(projection_problem, dim), reference)


# ---- (e) sign: removing the most positive samples lowers the test loss -----------------------
def test_removing_top_positive_samples_lowers_test_loss():
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 0.5, 0.3])

    def draw(n):
        x = np.hstack([rng.normal(size=(n, 3)), np.ones((n, 1))])
        return x, x @ w + 0.5 * rng.standard_t(3, size=n)

    (x, y), (xt, yt) = draw(60), draw(8)  # noisy test labels: no test loss is near zero
    model = nn.Linear(4, 1, bias=False).double()
    task = Task(model, "regression", Recipe(lr=0.05, epochs=300, batch_size=20))
    iif.train(task, (x, y[:, None]), seed=0)
    result = IntegratedInfluence(task, (x, y[:, None])).attribute((xt, yt[:, None]))
    assert result.info["fallbacks"] == 0

    top, rand, bottom = removal_drops(x, y, xt, yt, result.scores, rng)
    # removing opponents (positive scores) lowers the test loss, removing proponents raises it
    assert top.mean() < min(0.0, rand.mean()) and bottom.mean() > max(0.0, rand.mean())
    assert np.mean(top < rand) > 0.5 and np.mean(rand < bottom) > 0.5


# ---- (f) modes -------------------------------------------------------------------------------
def _full_batch(problem: Problem, **kwargs) -> IntegratedInfluence:
    n = len(problem.x)
    return IntegratedInfluence(
        problem.task, (problem.x, problem.y),
        path=PathSettings(steps=3, epochs=1, batch_size=n),
        **kwargs,
    )


def test_shared_baseline_shapes(mlp_classifier):
    p = mlp_classifier
    method = _full_batch(p, baseline=BaselineSettings(mode="shared", batch_size=len(p.x)))
    result = method.attribute((p.xt, p.yt))
    assert result.scores.shape == (4, 60)
    assert result.info["baseline_mode"] == "shared"
    for key in ("sum", "delta", "gap"):
        assert result.completeness[key].shape == (4,)
    np.testing.assert_allclose(result.completeness["sum"], result.scores.sum(1))
    # a shared theta' moves every test loss: delta is a per-sample difference, not one number
    assert len(np.unique(np.round(result.completeness["delta"], 12))) == 4


def test_per_test_group_of_one_equals_shared(mlp_classifier):
    # minibatches smaller than N, so both modes must draw the same minibatch orders
    p = mlp_classifier
    path = PathSettings(steps=3, batch_size=16)
    for s in (0, 2):
        one = (p.xt[s : s + 1], p.yt[s : s + 1])
        per_test = IntegratedInfluence(p.task, (p.x, p.y), path=path,
                                       baseline=BaselineSettings(batch_size=16)).attribute(one)
        shared = IntegratedInfluence(
            p.task, (p.x, p.y), path=path,
            baseline=BaselineSettings(mode="shared", batch_size=16)).attribute(one)
        np.testing.assert_allclose(per_test.scores, shared.scores, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(per_test.completeness["delta"], shared.completeness["delta"],
                                   rtol=1e-10)


def test_a_new_baseline_builder_plugs_into_the_integration_loop(mlp_classifier):
    # a test-only builder: explicit targets, each test sample its own batch of one copy, and
    # theta' = theta_1 (path epochs 0); the loop knows nothing of it, yet reproduces the mode
    from iif.methods.integrated.integrated import BaselineBatch

    p = mlp_classifier
    method = IntegratedInfluence(p.task, (p.x, p.y), path=PathSettings(steps=3, epochs=0),
                                 seed=3, progress=False)
    labels = (p.y + 1) % int(p.y.max() + 1)
    test = method.validate_test((p.xt[:3], p.yt[:3]))

    def one_at_a_time(m, test):
        ybar = m._baseline_targets(labels)
        for row in range(len(test)):
            gen = torch.Generator().manual_seed(m.seed)
            yield BaselineBatch(ybar[None], test.subset([row]), np.array([row]), gen,
                                theta_prime=lambda last: [last])

    res, deltas, status = method._run(one_at_a_time(method, test), len(test))
    want = method.attribute((p.xt[:3], p.yt[:3]), baseline_targets=labels)
    np.testing.assert_allclose(res.scores, want.scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(deltas.unlearn, want.completeness["delta"], rtol=1e-10,
                               atol=1e-14)
    # epochs 0: the path trains no end model, so there is no delta_path
    assert np.isnan(deltas.path).all() and np.isnan(want.completeness["delta_path"]).all()
    assert list(status) == ["sound"] * 3


def test_explicit_baseline_targets_with_wrong_shape_raise(mlp_classifier, mlp_regression):
    method = IntegratedInfluence(mlp_classifier.task, (mlp_classifier.x, mlp_classifier.y))
    test = (mlp_classifier.xt, mlp_classifier.yt)
    for bad in (np.full((61, 3), 1 / 3), np.full((60, 4), 0.25), np.zeros(59, dtype=int),
                np.full(60, 3), np.full((60, 3), np.nan)):
        with pytest.raises(ValueError):
            method.attribute(test, baseline_targets=bad)
    method = IntegratedInfluence(mlp_regression.task, (mlp_regression.x, mlp_regression.y))
    with pytest.raises(ValueError):
        method.attribute((mlp_regression.xt, mlp_regression.yt), baseline_targets=np.zeros((60, 2)))


@pytest.mark.parametrize("direction", ["unlearn", "reinforce"])
def test_direction_sets_the_sign_of_delta(mlp_classifier, direction):
    p = mlp_classifier
    method = _full_batch(p, baseline=BaselineSettings(direction=direction, lam=2.0, epochs=5))
    result = method.attribute((p.xt, p.yt))
    assert result.info["fallbacks"] == 0
    delta = result.completeness["delta"]
    # delta = L_test(theta*) - L_test(theta'), with L_test(theta*) computed here
    before = losses(p.task.model, p.kind, p.xt, p.yt, p.classes)
    assert np.all(before - delta > 0)
    if direction == "unlearn":
        assert np.all(delta < 0)
    else:
        assert np.all(delta > 0)
        assert np.all(delta < before)


def test_overshooting_unlearning_is_pulled_back_to_the_stop_level(mlp_regression):
    # a step far too large for the ascent: instead of falling back to theta*, the run is
    # pulled back along its segment to the stop level (chance) with a sound training loss
    p = mlp_regression
    settings = BaselineSettings(lr=1e8, lam=0.01, epochs=5)
    result = _full_batch(p, baseline=settings).attribute((p.xt, p.yt))
    assert result.info["fallbacks"] == 0 and result.info["truncated"] == 0
    task = p.task
    fmodel = FunctionalModel(task.model)
    train = task.validate((p.x, p.y))
    for j in range(len(p.xt)):
        test = task.validate((p.xt[j : j + 1], p.yt[j : j + 1]))
        engine = Engine.bind(task, train, task.model, Budget())
        (base,) = unlearned_baselines(
            engine, [test], dataclasses.replace(settings, batch_size=len(p.x)),
            torch.Generator().manual_seed(0))
        assert 0 < base.pulled_back < 1 and not base.fell_back
        after = mean_loss(task, fmodel, base.state, test.x, test.targets)
        before = mean_loss(task, fmodel, fmodel.state(), test.x, test.targets)
        assert after > before
        assert mean_loss(task, fmodel, base.state, train.x, train.targets) <= \
            settings.divergence_factor * max(mean_loss(task, fmodel, fmodel.state(), train.x,
                                                       train.targets),
                                             trivial_loss(task, train.targets))


def test_diverging_unlearning_falls_back_to_theta_star(mlp_regression):
    p = mlp_regression
    n = len(p.x)
    diverging = _full_batch(p, baseline=BaselineSettings(lr=1e8, lam=0.01, epochs=5,
                                                         stop_test_loss=None))
    result = diverging.attribute((p.xt, p.yt))
    assert result.info["fallbacks"] == 4
    assert result.info["fallback_tests"] == [0, 1, 2, 3]
    np.testing.assert_array_equal(result.completeness["delta"], np.zeros(4))
    # the fallback baseline is f(x; theta*): the same path as explicit model outputs
    with torch.no_grad():
        outputs = p.task.model(torch.as_tensor(p.x)).numpy()
    explicit = _full_batch(p).attribute((p.xt, p.yt), baseline_targets=outputs)
    np.testing.assert_allclose(result.scores, explicit.scores, rtol=1e-9,
                               atol=1e-12 * np.abs(explicit.scores).max())
    sane = _full_batch(p, baseline=BaselineSettings(batch_size=n)).attribute((p.xt, p.yt))
    assert sane.info["fallbacks"] == 0


@pytest.mark.parametrize("sparse", [True, False])
def test_self_influence_k1_closed_form(mlp_classifier, sparse):
    """K=1 self-influence with the per-sample baseline theta'_i = theta* + eta grad l_i:
    I_i(i) = -(1/N) psi_i^T (F + delta I)^{-1} grad l_i with psi_i = J_i^T (q_i - y_i) for
    q_i = softmax f(x_i; theta'_i), which for sparse targets is (1 - q_{i,y_i}) grad l_i."""
    p = mlp_classifier
    eta, damping = 0.5, 1e-3
    method = IntegratedInfluence(
        p.task, (p.x, p.y),
        baseline=BaselineSettings(self_step=eta),
        path=PathSettings(steps=1, sparse=sparse),
        curvature=CurvatureSettings(kind="fisher", damping=damping),
    )
    idx = np.array([0, 3, 7, 11, 59])
    got = method.self_influence(idx)
    assert got.shape == (5,)
    assert method.self_influence().shape == (60,)

    theta, forward = flat_model(p.task.model)
    x, t = torch.as_tensor(p.x), targets(p.kind, p.y, 3)
    g = sample_grads(forward, theta, p.kind, x, t)
    fisher = g.T @ g / 60 + damping * torch.eye(theta.numel(), dtype=torch.float64)
    expected = []
    for i in idx:
        with torch.no_grad():
            q = torch.softmax(forward(theta + eta * g[i], x[i : i + 1])[0], -1)
        if sparse:
            psi = (1.0 - q[p.y[i]]) * g[i]
        else:
            jac = jacrev(lambda th, xi=x[i : i + 1]: forward(th, xi)[0])(theta)
            psi = jac.T @ (q - t[i])
        expected.append(-float(psi @ torch.linalg.solve(fisher, g[i])) / 60)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    if sparse:
        assert np.all(got < 0)


def test_self_influence_flags_mislabelled_samples():
    rng = np.random.default_rng(3)
    centers = 3.0 * rng.normal(size=(3, 2))
    y = np.repeat(np.arange(3), 40)
    x = centers[y] + rng.normal(size=(120, 2))
    flipped = rng.choice(120, 12, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 3, size=12)) % 3
    task = Task(mlp([2, 8, 3], 3), "classification", Recipe(lr=0.2, epochs=200, batch_size=40))
    iif.train(task, (x, noisy), seed=0)
    scores = IntegratedInfluence(task, (x, noisy)).self_influence()
    mask = np.zeros(120, dtype=bool)
    mask[flipped] = True
    assert scores[mask].mean() < scores[~mask].mean()
    # rank-based AUC of -self-influence for finding the flipped labels
    ranks = np.argsort(np.argsort(-scores)) + 1
    auc = (ranks[mask].sum() - 12 * 13 / 2) / (12 * 108)
    assert auc > 0.8


# ---- (g) determinism and storage --------------------------------------------------------------
def test_same_seed_same_scores_and_round_trip(mlp_classifier, tmp_path):
    p = mlp_classifier

    def run(seed):
        return IntegratedInfluence(p.task, (p.x, p.y), seed=seed,
                                   projection=ProjectionSettings(dim=32, seed=seed)
                                   ).attribute((p.xt, p.yt))

    first, second, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first.scores, second.scores)
    for key in ("sum", "delta", "gap"):
        np.testing.assert_array_equal(first.completeness[key], second.completeness[key])
    assert not np.allclose(first.scores, other.scores)  # the seed does reach minibatches

    first.save(tmp_path / "iif")
    loaded = Attribution.load(tmp_path / "iif")
    np.testing.assert_array_equal(loaded.scores, first.scores)
    assert loaded.method == "iif"
    for key in ("sum", "delta", "gap"):
        np.testing.assert_array_equal(loaded.completeness[key], first.completeness[key])
    assert loaded.settings["path"] == first.settings["path"]
    assert loaded.settings["baseline"] == first.settings["baseline"]
    assert loaded.info["damping"] == first.info["damping"]
    assert loaded.info["fallbacks"] == first.info["fallbacks"]


def test_ensemble_of_one_and_average_over_models(mlp_classifier):
    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt[:2], p.yt[:2])
    models = iif.train_ensemble(p.task, data, 2, seed=7)
    kwargs = {"path": PathSettings(steps=2), "curvature": CurvatureSettings(damping=1e-2)}
    singles = [IntegratedInfluence(Task(m, "classification", p.task.recipe), data, **kwargs)
               .attribute(test) for m in models]
    one = IntegratedInfluence(p.task, data, models=models[:1], **kwargs).attribute(test)
    np.testing.assert_array_equal(one.scores, singles[0].scores)
    both = IntegratedInfluence(p.task, data, models=models, **kwargs).attribute(test)
    np.testing.assert_allclose(both.scores, (singles[0].scores + singles[1].scores) / 2,
                               rtol=1e-12)
    for key in ("sum", "delta"):
        np.testing.assert_allclose(
            both.completeness[key],
            (singles[0].completeness[key] + singles[1].completeness[key]) / 2, rtol=1e-12)
    assert both.info["ensemble_size"] == 2


@pytest.mark.parametrize("test_batch", [1, 2])
def test_ensemble_members_keep_the_kronecker_fast_path(mlp_classifier, monkeypatch, test_batch):
    # every member's projector hooks its own model's layers: no member falls back to
    # per-sample Jacobians, and each member's fast path runs on its own modules
    import iif.engine.features as features

    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt[:2], p.yt[:2])
    models = iif.train_ensemble(p.task, data, 2, seed=7)
    fast, slow = [], []
    kron, stacked, dense = (features._kronecker_chunks, features.stacked_projected_jacobians,
                            features.per_sample_jacobians)

    def count_fast(fmodel, *a, **k):
        fast.append(fmodel.module)
        return kron(fmodel, *a, **k)

    def count_stacked(fmodel, *a, **k):
        fast.append(fmodel.module)
        return stacked(fmodel, *a, **k)

    def count_slow(*a, **k):
        slow.append(1)
        return dense(*a, **k)

    monkeypatch.setattr(features, "_kronecker_chunks", count_fast)
    monkeypatch.setattr(features, "stacked_projected_jacobians", count_stacked)
    monkeypatch.setattr(features, "per_sample_jacobians", count_slow)
    kwargs = {"path": PathSettings(steps=2), "test_batch": test_batch,
              "projection": ProjectionSettings(dim=16, structure="kronecker")}
    result = IntegratedInfluence(p.task, data, models=models, **kwargs).attribute(test)
    assert slow == []
    assert {id(m) for m in fast} == {id(m) for m in models}
    per_member = len(fast) // 2
    assert per_member > 0 and sum(m is models[1] for m in fast) == per_member
    single = IntegratedInfluence(Task(models[1], "classification", p.task.recipe), data,
                                 **kwargs).attribute(test)
    assert result.info["ensemble_size"] == 2 and single.scores.shape == result.scores.shape


@pytest.mark.parametrize("fixture", ["mlp_classifier", "mlp_regression"])
@pytest.mark.parametrize("projection", [None, ProjectionSettings(dim=16, structure="kronecker")])
def test_batched_test_samples_equal_one_at_a_time(fixture, projection, request):
    p = request.getfixturevalue(fixture)
    # minibatches smaller than N, so the shared minibatch order matters; the classifier's
    # unlearning stops at chance level at different steps for different test samples. A
    # Kronecker projection of these all-Linear models takes the stacked feature path.
    settings = dict(path=PathSettings(steps=3, epochs=1, batch_size=16),
                    baseline=BaselineSettings(batch_size=16, epochs=3), projection=projection)
    test = (p.xt, p.yt)
    looped = IntegratedInfluence(p.task, (p.x, p.y), test_batch=1, **settings).attribute(test)
    batched = IntegratedInfluence(p.task, (p.x, p.y), test_batch=3, **settings).attribute(test)
    np.testing.assert_allclose(batched.scores, looped.scores, rtol=1e-8,
                               atol=1e-10 * np.abs(looped.scores).max())
    for key in ("sum", "delta"):
        np.testing.assert_allclose(batched.completeness[key], looped.completeness[key],
                                   rtol=1e-8, atol=1e-12)
    assert np.all(looped.completeness["delta"] != 0)
    assert batched.info["fallback_tests"] == looped.info["fallback_tests"]
    assert batched.info["truncated_tests"] == looped.info["truncated_tests"]


def test_batched_unlearning_keeps_fallbacks_per_test_sample(mlp_regression):
    p = mlp_regression
    # a learning rate at which some test samples' unlearning diverges and others' does not
    settings = dict(path=PathSettings(steps=2, epochs=1, batch_size=16),
                    baseline=BaselineSettings(batch_size=16, epochs=3, lr=0.3, lam=3.0,
                                              stop_test_loss=None))
    test = (p.xt, p.yt)
    looped = IntegratedInfluence(p.task, (p.x, p.y), test_batch=1, **settings).attribute(test)
    batched = IntegratedInfluence(p.task, (p.x, p.y), test_batch=4, **settings).attribute(test)
    ended = looped.info["fallbacks"] + looped.info["truncated"]
    assert 0 < ended < 4
    assert batched.info["fallback_tests"] == looped.info["fallback_tests"]
    assert batched.info["truncated_tests"] == looped.info["truncated_tests"]
    np.testing.assert_allclose(batched.scores, looped.scores, rtol=1e-8,
                               atol=1e-10 * np.abs(looped.scores).max())


def test_test_batch_validation(mlp_classifier):
    p = mlp_classifier
    for bad in (0, -1, 2.5, True, "all"):
        with pytest.raises(ValueError, match="test_batch"):
            IntegratedInfluence(p.task, (p.x, p.y), test_batch=bad)
    custom = dataclasses.replace(p.task, recipe=Recipe(
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)))
    with pytest.raises(ValueError, match="built-in .sgd., .adam. or .adamw."):
        IntegratedInfluence(custom, (p.x, p.y), test_batch=2)
    auto = IntegratedInfluence(p.task, (p.x, p.y))
    assert auto._test_batch(100) == 32 and auto._test_batch(3) == 3
    assert IntegratedInfluence(custom, (p.x, p.y))._test_batch(10) == 1
    # a copy costs 5 M parameter-sized tensors, 3 path target sets and two N x P feature
    # sets (float64); a quarter of max_feature_bytes goes to them
    m = auto.fmodel.num_params
    proj = ProjectionSettings(dim=8)
    per_copy = 8 * (5 * m + 3 * len(p.x) * 3 + 2 * len(p.x) * 8)
    tight = IntegratedInfluence(p.task, (p.x, p.y), projection=proj,
                                max_feature_bytes=4 * per_copy * 5)
    assert tight._test_batch(100) == 5
    # exact solves from layer factors hold no (N, P) features, but four float64 layer
    # factors per copy (inputs with a bias column and output gradients of the 4-16-3 MLP)
    assert auto._use_factored()
    per_copy = 8 * (5 * m + 3 * len(p.x) * 3 + 4 * len(p.x) * (4 + 1 + 16 + 16 + 1 + 3))
    tight = IntegratedInfluence(p.task, (p.x, p.y), max_feature_bytes=4 * per_copy * 5)
    assert tight._test_batch(100) == 5


# ---- contrast and groups -------------------------------------------------------------------
def _logistic_problem():
    """Three overlapping classes and an L2-regularised linear softmax model trained full-batch
    to its unique minimiser, so that retraining without some samples is exact."""
    rng = np.random.default_rng(7)
    centres = np.array([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, -0.5], [0.6, 0.6, 0.3, 0.0]])
    y = np.arange(90) % 3
    x = centres[y] + 0.6 * rng.normal(size=(90, 4))
    xt = centres[[0, 1, 2, 2, 0]] + 0.6 * rng.normal(size=(5, 4))
    yt = np.array([0, 1, 2, 2, 0])
    recipe = Recipe(lr=1.0, epochs=400, batch_size=90, weight_decay=0.02)

    def fit(keep):
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        task = Task(model, "classification", recipe)
        iif.train(task, (x[keep], y[keep]), seed=0)
        return task

    return x, y, xt, yt, fit


def _margins(task, xt, a, b):
    with torch.no_grad():
        logp = torch.log_softmax(task.model(torch.as_tensor(xt)), 1).numpy()
    return logp[np.arange(len(a)), a] - logp[np.arange(len(b)), b]


def test_contrast_scores_point_towards_the_predicted_class():
    """Removing the training samples scored as pushing most towards A (and retraining
    exactly) lowers the margin log p_A - log p_B more than removing random samples."""
    x, y, xt, yt, fit = _logistic_problem()
    everyone = np.arange(len(x))
    task = fit(everyone)
    method = IntegratedInfluence(task, (x, y), path=PathSettings(steps=5, batch_size=90),
                                 baseline=BaselineSettings(batch_size=90, epochs=5))
    result = method.attribute((xt, yt), contrast="runner-up")
    a = np.array(result.info["contrast"]["A"])
    b = np.array(result.info["contrast"]["B"])
    assert np.all(a != b)
    full = _margins(task, xt, a, b)
    # the baseline was trained towards B, so theta* has the larger margin
    assert np.all(result.completeness["delta"] > 0)
    rng = np.random.default_rng(0)
    k = 9
    top_drop, random_drop = [], []
    for s in range(len(xt)):
        top = np.argsort(-result.scores[s])[:k]
        top_drop.append(full[s] - _margins(fit(np.setdiff1d(everyone, top)), xt, a, b)[s])
        random_drop.append(np.mean([
            full[s] - _margins(fit(np.setdiff1d(everyone, rng.choice(len(x), k, False))),
                               xt, a, b)[s] for _ in range(4)]))
    top_drop, random_drop = np.array(top_drop), np.array(random_drop)
    assert top_drop.mean() > 0
    assert top_drop.mean() > 3 * abs(random_drop.mean())
    assert np.sum(top_drop > random_drop) >= 4


def test_contrast_sum_tracks_the_margin_change():
    x, y, xt, yt, fit = _logistic_problem()
    task = fit(np.arange(len(x)))
    # completeness wants light damping: the curvature, not the damping, should set the solve
    method = IntegratedInfluence(task, (x, y), path=PathSettings(steps=5, batch_size=90),
                                 baseline=BaselineSettings(batch_size=90, epochs=5, lam=0.5),
                                 curvature=CurvatureSettings(kind="fisher",
                                                               default_damping_ratio=0.1))
    result = method.attribute((xt, yt), contrast=[1, 2, 0, 0, 2])
    assert result.info["contrast"]["B"] == [1, 2, 0, 0, 2]
    assert result.info["baseline_mode"] == "per-test contrast"
    # completeness for a nearly linear (convex, converged) model: the sum follows delta
    assert np.corrcoef(result.completeness["sum"], result.completeness["delta"])[0, 1] > 0.9
    # a plain attribute afterwards is back to the unlearning baseline
    plain = method.attribute((xt, yt))
    assert np.all(plain.completeness["delta"] < 0)


def test_invalid_contrast_classes(mlp_classifier, mlp_regression):
    p = mlp_classifier
    method = IntegratedInfluence(p.task, (p.x, p.y))
    test = (p.xt, p.yt)
    with torch.no_grad():
        predicted = p.task.model(torch.as_tensor(p.xt)).argmax(1).numpy()
    for bad, match in ((3, "out of range"), (-1, "out of range"), ([0, 1], "one class per"),
                       ("second", "runner-up"), (1.5, "integers"),
                       (predicted, "equals the predicted class")):
        with pytest.raises(ValueError, match=match):
            method.attribute(test, contrast=bad)
    shared = IntegratedInfluence(p.task, (p.x, p.y), baseline=BaselineSettings(mode="shared"))
    with pytest.raises(ValueError, match="shared baseline"):
        shared.attribute(test, contrast="runner-up")
    reg = IntegratedInfluence(mlp_regression.task, (mlp_regression.x, mlp_regression.y))
    with pytest.raises(ValueError, match="classification"):
        reg.attribute((mlp_regression.xt, mlp_regression.yt), contrast=0)


def test_group_of_one_is_the_per_sample_result(mlp_classifier):
    p = mlp_classifier
    settings = dict(path=PathSettings(steps=3, batch_size=16),
                    baseline=BaselineSettings(batch_size=16, epochs=3), test_batch=1)
    method = IntegratedInfluence(p.task, (p.x, p.y), **settings)
    for s in (0, 3):
        one = (p.xt[s : s + 1], p.yt[s : s + 1])
        group = method.attribute_group(one)
        single = method.attribute(one)
        assert group.scores.shape == (1, len(p.x))
        np.testing.assert_allclose(group.scores, single.scores, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(group.completeness["delta"], single.completeness["delta"])


def test_group_attributes_the_mean_loss(mlp_classifier):
    p = mlp_classifier
    method = IntegratedInfluence(p.task, (p.x, p.y), path=PathSettings(steps=3, batch_size=16),
                                 baseline=BaselineSettings(batch_size=16, epochs=3))
    group = method.attribute_group((p.xt, p.yt))
    shared = IntegratedInfluence(p.task, (p.x, p.y), path=PathSettings(steps=3, batch_size=16),
                                 baseline=BaselineSettings(batch_size=16, epochs=3,
                                                           mode="shared"))
    rows = shared.attribute((p.xt, p.yt))
    assert group.scores.shape == (1, len(p.x)) and group.info["group_size"] == 4
    # the same shared baseline and path (same generators): scores of the mean loss are the
    # mean of the rows
    np.testing.assert_allclose(group.scores[0], rows.scores.mean(0), rtol=1e-6, atol=1e-12)
    assert group.completeness["delta"][0] < 0


@pytest.mark.parametrize("test_batch", [1, 4])
@pytest.mark.parametrize("curvature", [CurvatureSettings(),
                                       CurvatureSettings(kind="ggn", ggn_rank=2)])
def test_factored_exact_solves_equal_per_sample_gradient_solves(mlp_classifier, monkeypatch,
                                                                test_batch, curvature):
    # exact Fisher / Gauss-Newton IIF on a Linear model runs from layer factors; it must give
    # the scores of the Woodbury solve on stored per-sample gradients
    p = mlp_classifier
    kwargs = {"path": PathSettings(steps=3, batch_size=16), "test_batch": test_batch,
              "baseline": BaselineSettings(batch_size=16), "curvature": curvature}
    method = IntegratedInfluence(p.task, (p.x, p.y), **kwargs)
    assert method._use_factored()
    factored = method.attribute((p.xt, p.yt))
    monkeypatch.setattr(IntegratedInfluence, "_use_factored", lambda self: False)
    dense = IntegratedInfluence(p.task, (p.x, p.y), **kwargs).attribute((p.xt, p.yt))
    np.testing.assert_allclose(factored.scores, dense.scores, rtol=1e-8,
                               atol=1e-10 * np.abs(dense.scores).max())
    assert factored.info["damping"] == pytest.approx(dense.info["damping"], rel=1e-9)


@pytest.mark.parametrize("settings", [
    {"projection": ProjectionSettings(dim=16)},
    {"curvature": CurvatureSettings(path_fit="once")},
    {"projection": ProjectionSettings(dim=16, structure="kronecker"), "test_batch": 2},
], ids=["projected", "fit-once", "stacked-kronecker"])
def test_the_first_steps_features_are_kept_for_every_test_batch(mlp_classifier, monkeypatch,
                                                                 settings):
    # On a sparse path with one-hot labels the first step's psi_i is w_i u*_i, u* theta*'s
    # per-sample gradients on the real targets: u* and theta*'s solver are computed once per
    # run, and the scores equal those of a first step featurised at every test batch.
    p = mlp_classifier
    kwargs = {"path": PathSettings(steps=3), "test_batch": 1, **settings}
    test = (p.xt, p.yt)
    featurised, fitted = [], []
    step_features, fit_curvature = Engine.step_features, Engine.fit_curvature

    def count_features(engine, state, *a, **k):
        featurised.append(state)
        return step_features(engine, state, *a, **k)

    def count_fits(engine, curvature, state, *a, **k):
        fitted.append(state)
        return fit_curvature(engine, curvature, state, *a, **k)

    monkeypatch.setattr(Engine, "step_features", count_features)
    monkeypatch.setattr(Engine, "fit_curvature", count_fits)
    method = IntegratedInfluence(p.task, (p.x, p.y), **kwargs)
    kept = method.attribute(test)
    batches = len(p.yt) // kwargs["test_batch"]
    assert len(featurised) == batches * 2  # steps K-1 and K-2 of every batch, never theta*
    assert all(s is not method.state for s in featurised)
    assert sum(s is method.state for s in fitted) == 1
    monkeypatch.setattr(IntegratedInfluence, "_star_weights", lambda *a: None)
    again = IntegratedInfluence(p.task, (p.x, p.y), **kwargs).attribute(test)
    assert len(featurised) == batches * 2 + batches * 3
    np.testing.assert_allclose(kept.scores, again.scores, rtol=1e-6,
                               atol=1e-9 * np.abs(again.scores).max())
    np.testing.assert_allclose(kept.completeness["sum"], again.completeness["sum"], rtol=1e-6)


def test_the_first_steps_features_are_featurised_on_dense_paths(mlp_classifier, monkeypatch):
    # dense path targets move every class: psi is not a multiple of u*, so nothing is kept
    p = mlp_classifier
    calls = []
    step_features = Engine.step_features

    def count(engine, state, *a, **k):
        calls.append(state)
        return step_features(engine, state, *a, **k)

    monkeypatch.setattr(Engine, "step_features", count)
    method = IntegratedInfluence(p.task, (p.x, p.y), path=PathSettings(steps=2, sparse=False),
                                 projection=ProjectionSettings(dim=16), test_batch=1)
    method.attribute((p.xt[:2], p.yt[:2]))
    assert sum(s is method.state for s in calls) == 2


def test_path_fit_auto_refits_where_layer_factors_solve_and_fits_once_elsewhere(
        mlp_classifier):
    # auto: an all-Linear model without projection takes the exact factored solves, refitted
    # at every path model (the "each" scores); a projection rules them out and theta*'s
    # solver then serves every step (the "once" scores)
    p = mlp_classifier
    data, test = (p.x, p.y), (p.xt[:2], p.yt[:2])

    def run(fit: str, projection: ProjectionSettings | None = None) -> Attribution:
        return IntegratedInfluence(p.task, data, curvature=CurvatureSettings(path_fit=fit),
                                   projection=projection, progress=False).attribute(test)

    auto, each = run("auto"), run("each")
    np.testing.assert_array_equal(auto.scores, each.scores)
    assert auto.info["path_fit"] == "each"
    projected = ProjectionSettings(dim=16)
    auto, once, each = run("auto", projected), run("once", projected), run("each", projected)
    np.testing.assert_array_equal(auto.scores, once.scores)
    assert auto.info["path_fit"] == "once" and each.info["path_fit"] == "each"
    assert max_rel(each.scores, once.scores) > 1e-3
