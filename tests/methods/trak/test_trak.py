"""TRAK against independent computations.

Margin and output gradients are built here with torch.autograd on a flat parameter vector, the
projection matrix is read off the projector as ``project(I)``, and kernels, weights and the
ensemble estimator are computed in numpy. Sign convention: a score > 0 means including the
training sample raises the test loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.func import functional_call

import iif.engine.features as features_module
from iif import Attribution, ProjectionSettings, Recipe, Task
from iif.engine.projection import make_projector
from iif.engine.training import train_ensemble
from iif.methods.trak.trak import TRAK


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 models: threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- independent reference computations -------------------------------------------------------
def _mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _flat(model: nn.Module):
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: q.reshape(p.shape) for (n, p), q in zip(named, parts, strict=True)}
        return functional_call(model, params, (x,))

    return theta, forward


def _classifier_terms(model, x, y):
    """Margin gradients (n, M) and 1 - p_y (n,), one autograd call per sample."""
    theta, forward = _flat(model)
    grads, weights = [], []
    for i in range(len(y)):
        th = theta.clone().requires_grad_(True)
        out = forward(th, torch.as_tensor(x[i : i + 1]))[0]
        others = torch.ones(out.shape[0], dtype=torch.bool)
        others[int(y[i])] = False
        value = out[int(y[i])] - torch.logsumexp(out[others], 0)  # log p_y - log(1 - p_y)
        grads.append(torch.autograd.grad(value, th)[0].numpy())
        weights.append(1.0 - float(torch.softmax(out.detach(), 0)[int(y[i])]))
    return np.array(grads), np.array(weights)


def _regression_terms(model, x, y):
    """Output gradients (n, M) and -dl/df = 2 (y - f) (n,) for l = (f - y)^2."""
    theta, forward = _flat(model)
    grads, slopes = [], []
    for i in range(len(y)):
        th = theta.clone().requires_grad_(True)
        out = forward(th, torch.as_tensor(x[i : i + 1]))[0, 0]
        grads.append(torch.autograd.grad(out, th)[0].numpy())
        slopes.append(2.0 * (float(y[i, 0]) - float(out.detach())))
    return np.array(grads), np.array(slopes)


def _projection_matrix(num_params: int, settings: ProjectionSettings) -> np.ndarray:
    """A (M, P) as the projector applies it, or the identity."""
    if settings.dim is None or settings.dim >= num_params:
        return np.eye(num_params)
    projector = make_projector(num_params, settings, "cpu", torch.float64)
    return projector.project(torch.eye(num_params, dtype=torch.float64)).numpy()


def _kernel(phi_test, phi, damping, curvature=1.0):
    """phi_test (curvature Phi^T Phi + damping I)^{-1} Phi^T, shape (n_test, N)."""
    gram = curvature * phi.T @ phi + damping * np.eye(phi.shape[1])
    return phi_test @ np.linalg.solve(gram, phi.T)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- problems ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3))
    y = np.arange(24) % 3
    xt = rng.normal(size=(4, 3))
    yt = np.array([0, 1, 2, 1])
    return x, y, xt, yt  # an MLP [3, 5, 3] has 38 parameters


def _classifier_task(seed: int) -> Task:
    return Task(_mlp([3, 5, 3], seed), "classification")


# ---- (a) the formula, one model ---------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, 12])
def test_classifier_matches_direct_formula(classification, dim):
    x, y, xt, yt = classification
    task = _classifier_task(0)
    settings = ProjectionSettings(dim=dim, seed=3)
    method = TRAK(task, (x, y), projection=settings, damping=0.05)
    result = method.attribute((xt, yt))

    g, w = _classifier_terms(task.model, x, y)
    gt, _ = _classifier_terms(task.model, xt, yt)
    a = _projection_matrix(g.shape[1], settings)
    phi, phi_t = g @ a, gt @ a
    expected = -_kernel(phi_t, phi, 0.05) * w[None, :]
    assert result.scores.shape == (4, 24)
    assert _rel(result.scores, expected) < 1e-8
    assert result.method == "trak"
    assert result.info["projection_dim"] == (38 if dim is None else 12)
    assert result.info["damping"] == [0.05]

    # self-influence: the same formula with the training sample as the test sample
    idx = np.array([0, 5, 23])
    self_expected = -np.einsum("ip,pq,iq->i", phi[idx],
                               np.linalg.inv(phi.T @ phi + 0.05 * np.eye(phi.shape[1])),
                               phi[idx]) * w[idx]
    got = method.self_influence(idx)
    assert got.shape == (3,)
    assert _rel(got, self_expected) < 1e-8
    assert np.all(method.self_influence() <= 0)


def test_default_damping_and_projection(classification):
    """damping=None: 0.1 x trace(Phi^T Phi) / min(N, P, M); a dim >= M uses the gradients."""
    x, y, xt, yt = classification
    task = _classifier_task(1)
    default = TRAK(task, (x, y)).attribute((xt, yt))  # dim 2048 > 38 parameters
    exact = TRAK(task, (x, y), projection=ProjectionSettings(dim=None)).attribute((xt, yt))
    np.testing.assert_array_equal(default.scores, exact.scores)
    assert default.info["projected"] is False

    g, w = _classifier_terms(task.model, x, y)
    gt, _ = _classifier_terms(task.model, xt, yt)
    damping = 0.1 * float((g * g).sum()) / min(24, 38)
    assert default.info["damping"][0] == pytest.approx(damping, rel=1e-12)
    assert _rel(default.scores, -_kernel(gt, g, damping) * w[None, :]) < 1e-8

    projected = TRAK(task, (x, y), projection=ProjectionSettings(dim=16, seed=1))
    result = projected.attribute((xt, yt))
    a = _projection_matrix(38, ProjectionSettings(dim=16, seed=1))
    damping = 0.1 * float(((g @ a) ** 2).sum()) / 16
    assert result.info["damping"][0] == pytest.approx(damping, rel=1e-12)
    assert _rel(result.scores, -_kernel(gt @ a, g @ a, damping) * w[None, :]) < 1e-8


def test_regression_matches_direct_formula():
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(20, 3)), rng.normal(size=(3, 3))
    y, yt = rng.normal(size=(20, 1)), rng.normal(size=(3, 1))
    task = Task(_mlp([3, 5, 1], 2), "regression")  # 26 parameters
    settings = ProjectionSettings(dim=10, seed=4)
    method = TRAK(task, (x, y), projection=settings, damping=0.2)
    result = method.attribute((xt, yt))

    g, w = _regression_terms(task.model, x, y)
    gt, c = _regression_terms(task.model, xt, yt)
    a = _projection_matrix(26, settings)
    phi, phi_t = g @ a, gt @ a
    # l'' = 2 for the squared error: K = (2 Phi^T Phi + lambda I)^{-1}
    expected = -c[:, None] * _kernel(phi_t, phi, 0.2, curvature=2.0) * w[None, :]
    assert _rel(result.scores, expected) < 1e-8

    inv = np.linalg.inv(2.0 * phi.T @ phi + 0.2 * np.eye(10))
    self_expected = -np.einsum("ip,pq,iq->i", phi, inv, phi) * w * w
    assert _rel(method.self_influence(), self_expected) < 1e-8


def test_regression_scores_are_first_order_leave_one_out():
    """Linear least squares at its exact optimum, no projection, no damping: the score is
    L_s(with i) - L_s(without i) up to the leverage factor 1 / (1 - h_ii)."""
    rng = np.random.default_rng(2)
    n = 200
    x = rng.normal(size=(n, 3))
    y = x @ np.array([1.0, -0.5, 2.0]) + 0.3 + 0.5 * rng.normal(size=n)
    xt = rng.normal(size=(5, 3))
    # test residuals well away from zero: the loss change is then first order in the output
    yt = xt @ np.array([1.0, -0.5, 2.0]) + 0.3 + np.array([1.5, -1.0, 2.0, -1.5, 1.0])
    design = np.hstack([x, np.ones((n, 1))])
    design_t = np.hstack([xt, np.ones((5, 1))])

    def fit(keep):
        return np.linalg.lstsq(design[keep], y[keep], rcond=None)[0]

    theta = fit(np.arange(n))
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(theta[:3])[None])
        model.bias.copy_(torch.as_tensor(theta[3:]))
    task = Task(model, "regression")
    scores = TRAK(task, (x, y[:, None]), projection=ProjectionSettings(dim=None),
                  damping=0.0).attribute((xt, yt[:, None])).scores

    def test_losses(th):
        return (design_t @ th - yt) ** 2

    full = test_losses(theta)
    actual = np.array([full - test_losses(fit(np.delete(np.arange(n), i))) for i in range(n)]).T
    assert scores.shape == actual.shape == (5, n)
    for s in range(5):
        assert np.corrcoef(scores[s], actual[s])[0, 1] > 0.999
        assert _rel(scores[s], actual[s]) < 0.1


# ---- (b) ensembles ----------------------------------------------------------------------------
def test_ensemble_is_mean_kernel_times_mean_weights(classification):
    x, y, xt, yt = classification
    task = _classifier_task(0)
    models = train_ensemble(task, (x, y), 2, subset="half", seed=10)  # TRAK's usual ensemble
    settings = ProjectionSettings(dim=12, seed=5)
    method = TRAK(task, (x, y), projection=settings, damping=0.1, models=models)
    result = method.attribute((xt, yt))

    a = _projection_matrix(38, settings)
    kernels, weights = [], []
    for model in models:
        g, w = _classifier_terms(model, x, y)
        gt, _ = _classifier_terms(model, xt, yt)
        kernels.append(_kernel(gt @ a, g @ a, 0.1))
        weights.append(w)
    expected = -np.mean(kernels, axis=0) * np.mean(weights, axis=0)[None, :]
    assert _rel(result.scores, expected) < 1e-8
    assert result.info["ensemble_size"] == 2
    assert len(result.info["damping"]) == 2
    # not the mean of the per-model scores
    per_model = -np.mean([k * w[None, :] for k, w in zip(kernels, weights, strict=True)], axis=0)
    assert _rel(per_model, expected) > 1e-3

    idx = np.arange(24)
    diag = [np.einsum("ip,pq,iq->i", g @ a,
                      np.linalg.inv((g @ a).T @ (g @ a) + 0.1 * np.eye(12)), g @ a)
            for g in (_classifier_terms(m, x, y)[0] for m in models)]
    self_expected = -np.mean(diag, axis=0) * np.mean(weights, axis=0)
    assert _rel(method.self_influence(idx), self_expected) < 1e-8

    # an ensemble of one model is that model's TRAK, exactly
    one = TRAK(task, (x, y), projection=settings, damping=0.1, models=[models[1]])
    alone = TRAK(Task(models[1], "classification"), (x, y), projection=settings, damping=0.1)
    np.testing.assert_array_equal(one.attribute((xt, yt)).scores,
                                  alone.attribute((xt, yt)).scores)
    np.testing.assert_array_equal(one.self_influence(), alone.self_influence())


def test_training_features_are_computed_once(classification, monkeypatch, tmp_path):
    x, y, xt, yt = classification
    calls = []
    # TRAK's features are the engine's (iif.engine.features), dense projection: per-sample Jacobians
    original = features_module.per_sample_jacobians

    def counting(fmodel, state, xs, *args, **kwargs):
        calls.append(xs.shape[0])
        return original(fmodel, state, xs, *args, **kwargs)

    monkeypatch.setattr(features_module, "per_sample_jacobians", counting)
    models = [_mlp([3, 5, 3], 20), _mlp([3, 5, 3], 21)]
    method = TRAK(_classifier_task(0), (x, y), projection=ProjectionSettings(dim=8),
                  models=models)
    first = method.attribute((xt, yt))
    assert sorted(calls) == [4, 4, 24, 24]  # training and test features of both models
    calls.clear()
    second = method.attribute((xt, yt))
    method.self_influence()
    assert calls == [4, 4]  # test features only
    np.testing.assert_array_equal(first.scores, second.scores)

    # a copy bound to another model starts without the first model's features
    single = TRAK(_classifier_task(0), (x, y), projection=ProjectionSettings(dim=8))
    single.attribute((xt, yt))
    bound = single._bound_to(models[0])
    own = TRAK(Task(models[0], "classification"), (x, y), projection=ProjectionSettings(dim=8))
    np.testing.assert_array_equal(bound.attribute((xt, yt)).scores,
                                  own.attribute((xt, yt)).scores)

    first.save(tmp_path / "trak")
    loaded = Attribution.load(tmp_path / "trak")
    np.testing.assert_array_equal(loaded.scores, first.scores)
    assert loaded.info["damping"] == first.info["damping"]


# ---- (c) orientation --------------------------------------------------------------------------
def test_removing_top_positive_samples_lowers_test_loss():
    """Multinomial logistic regression at its optimum, retrained to convergence on subsets."""
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def draw(n):
        labels = rng.integers(0, 3, n)
        return centers[labels] + rng.normal(size=(n, 2)), labels

    (x, y), (xt, yt) = draw(90), draw(10)

    def fit(keep):
        return LogisticRegression(C=1e3, tol=1e-10, max_iter=2000).fit(x[keep], y[keep])

    def test_loss(clf, s):
        return -float(np.log(clf.predict_proba(xt[s : s + 1])[0, yt[s]]))

    everyone = np.arange(90)
    full = fit(everyone)
    model = nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(full.coef_))
        model.bias.copy_(torch.as_tensor(full.intercept_))
    scores = TRAK(Task(model, "classification"), (x, y)).attribute((xt, yt)).scores

    k = 8
    drops = []  # (top, random, bottom) change of the retrained test loss per test sample
    for s in range(len(xt)):
        base = test_loss(full, s)
        top = np.argsort(-scores[s])[:k]
        bottom = np.argsort(scores[s])[:k]
        drops.append([
            test_loss(fit(np.setdiff1d(everyone, top)), s) - base,
            np.mean([test_loss(fit(np.setdiff1d(everyone, rng.choice(90, k, replace=False))), s)
                     - base for _ in range(5)]),
            test_loss(fit(np.setdiff1d(everyone, bottom)), s) - base,
        ])
    top, rand, bottom = np.array(drops).T
    # removing opponents (positive scores) lowers the test loss, removing proponents raises it
    assert top.mean() < min(0.0, rand.mean()) and bottom.mean() > max(0.0, rand.mean())
    assert np.mean(top < rand) > 0.5 and np.mean(rand < bottom) > 0.5


# ---- (d) bad inputs ---------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(classification):
    x, y, _, _ = classification
    rng = np.random.default_rng(3)
    two_outputs = Task(_mlp([3, 4, 2], 0), "regression")
    with pytest.raises(ValueError, match="single output"):
        TRAK(two_outputs, (x, rng.normal(size=(24, 2))))

    task = _classifier_task(0)
    for bad in (64, "gaussian", {"dim": 64}):
        with pytest.raises(ValueError, match="projection must be a ProjectionSettings"):
            TRAK(task, (x, y), projection=bad)
    for dim in (2.5, True):
        with pytest.raises(ValueError, match=r"\[projection\] dim"):
            TRAK(task, (x, y), projection=ProjectionSettings(dim=dim))
    with pytest.raises(ValueError, match=r"\[projection\] dim"):
        ProjectionSettings(dim=0)
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="damping"):
            TRAK(task, (x, y), damping=bad)

    custom = Task(_mlp([3, 5, 3], 0), "classification", Recipe(),
                  loss=lambda out, t: ((out - t) ** 2).sum(-1))
    with pytest.raises(ValueError, match="cross-entropy"):
        TRAK(custom, (x, y))

    with pytest.raises(ValueError, match="raise max_feature_bytes"):
        TRAK(task, (x, y), projection=ProjectionSettings(dim=None),
             max_feature_bytes=100).attribute((x[:2], y[:2]))


# ---- (e) a single model ---------------------------------------------------------------------
def test_one_model_hints_at_an_ensemble_and_several_do_not(classification, caplog):
    x, y, xt, yt = classification
    task = _classifier_task(0)
    settings = ProjectionSettings(dim=12, seed=5)
    with caplog.at_level("INFO", logger="iif.methods.trak.trak"):
        single = TRAK(task, (x, y), projection=settings, damping=0.1)
        first = single.attribute((xt, yt))
        single.attribute((xt[:2], yt[:2]))
    hints = [r for r in caplog.records if "models=[...]" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelname == "INFO"  # once per method, not per call
    assert "5-10 independently trained models" in hints[0].getMessage()
    assert "models=[...]" in first.info["note"]

    caplog.clear()
    models = train_ensemble(task, (x, y), 2, subset="half", seed=10)
    with caplog.at_level("INFO", logger="iif.methods.trak.trak"):
        result = TRAK(task, (x, y), projection=settings, damping=0.1,
                      models=models).attribute((xt, yt))
    assert not [r for r in caplog.records if "models=[...]" in r.getMessage()]
    assert "note" not in result.info
