"""The closed forms of the linear-regression experiments against brute force and the library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from iif import CurvatureSettings, InfluenceFunction, Recipe, Task, TracIn
from iif.evaluation import random_subsets
from iif.methods.integrated.linear import linear_delta, linear_unlearning_baseline
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif_paper.experiments.linear_regression import (
    LinearProtocol,
    Noise,
    iif_decomposition,
    iif_scores,
    influence_scores,
    loo_scores,
    make_trial,
    minimiser_threshold,
    subset_test_losses,
    tracin_scores,
)


@pytest.fixture(scope="module")
def trial():
    protocol = LinearProtocol(n_train=30, dim=4, n_test=3)
    rng = np.random.default_rng(3)
    return make_trial(rng, protocol, Noise("gaussian", 0.7), Noise("laplace", 1.0))


def _refit_losses(X, y, Xt, yt):
    theta = np.linalg.lstsq(X, y, rcond=None)[0]
    return (Xt @ theta - yt) ** 2


def _linear_task(X: np.ndarray, theta: np.ndarray | None, lr: float = 0.1, epochs: int = 1):
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.zeros(1, X.shape[1]) if theta is None
                           else torch.as_tensor(theta)[None])
    return Task(model, "regression", Recipe(lr=lr, epochs=epochs, batch_size=X.shape[0]))


def test_subset_losses_are_exact_refits(trial):
    subsets = random_subsets(5, 30, 0.5, seed=1)
    got = subset_test_losses(trial.X, trial.y, trial.X_test, trial.y_test, subsets)
    for m in range(5):
        expected = _refit_losses(trial.X[subsets[m]], trial.y[subsets[m]], trial.X_test,
                                 trial.y_test)
        np.testing.assert_allclose(got[m], expected, rtol=1e-9)


def test_loo_equals_brute_force_refits(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    full = _refit_losses(X, y, Xt, yt)
    expected = np.stack([full - _refit_losses(np.delete(X, i, 0), np.delete(y, i), Xt, yt)
                         for i in range(len(y))], axis=1)
    np.testing.assert_allclose(loo_scores(X, y, Xt, yt), expected, rtol=1e-8, atol=1e-12)


def test_influence_closed_form_equals_library_with_exact_hessian(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    theta = np.linalg.lstsq(X, y, rcond=None)[0]
    method = InfluenceFunction(_linear_task(X, theta), (X, y[:, None]),
                               curvature=CurvatureSettings(kind="hessian", damping=0.0))
    got = method.attribute((Xt, yt[:, None])).scores
    np.testing.assert_allclose(influence_scores(X, y, Xt, yt), got, rtol=1e-8, atol=1e-12)


def test_tracin_closed_form_equals_library_on_gradient_descent_checkpoints(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    lr, epochs = 0.2, 6
    task = _linear_task(X, None, lr=lr, epochs=epochs)
    checkpoints = train_with_checkpoints(task, (X, y[:, None]), every=1)
    assert [c.epoch for c in checkpoints] == list(range(1, epochs + 1))
    got = TracIn(task, (X, y[:, None]), checkpoints=checkpoints).attribute((Xt, yt[:, None]))
    np.testing.assert_allclose(tracin_scores(X, y, Xt, yt, lr, epochs), got.scores, rtol=1e-8,
                               atol=1e-12)
    last = TracIn(task, (X, y[:, None]), checkpoints=checkpoints[-1:]).attribute(
        (Xt, yt[:, None]))
    np.testing.assert_allclose(tracin_scores(X, y, Xt, yt, lr, epochs, last_only=True),
                               last.scores, rtol=1e-8, atol=1e-12)


def test_minimiser_exists_exactly_above_the_threshold(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    q = minimiser_threshold(X, Xt)
    # N times the leverage of the test sample
    n = X.shape[0]
    np.testing.assert_allclose(q, n * np.einsum("sd,ds->s", Xt, np.linalg.solve(X.T @ X, Xt.T)))
    for s in range(len(yt)):
        linear_unlearning_baseline(X, y, Xt[s], yt[s], 1.01 * q[s])
        with pytest.raises(ValueError, match="no minimiser"):
            linear_unlearning_baseline(X, y, Xt[s], yt[s], 0.99 * q[s])


def test_iif_scores_baseline_is_the_negatively_weighted_fit(trial):
    """lam = N: the baseline is least squares with the test sample given weight -1."""
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    n = X.shape[0]
    scores, fallbacks = iif_scores(X, y, Xt, yt, lam=float(n))
    assert fallbacks == 0
    for s in range(len(yt)):
        A = X.T @ X - np.outer(Xt[s], Xt[s])
        theta = np.linalg.solve(A, X.T @ y - Xt[s] * yt[s])
        delta = linear_delta(X, y, Xt[s : s + 1], yt[s : s + 1], (X @ theta)[:, None])
        # completeness is exact in closed form; unlearning raises the test loss
        assert scores[s].sum() == pytest.approx(delta[0], rel=1e-8)
        assert delta[0] < 0


def test_iif_scores_fall_back_to_influence_without_a_minimiser(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    lam = 0.5 * minimiser_threshold(X, Xt).min()  # below every threshold
    scores, fallbacks = iif_scores(X, y, Xt, yt, lam=lam)
    assert fallbacks == len(yt)
    np.testing.assert_allclose(scores, influence_scores(X, y, Xt, yt), rtol=1e-9, atol=1e-13)
    # a very large lam: the baseline barely moves and IIF tends to IF
    far, _ = iif_scores(X, y, Xt, yt, lam=1e8)
    np.testing.assert_allclose(far, influence_scores(X, y, Xt, yt), rtol=1e-5, atol=1e-9)


def test_noise_has_the_stated_standard_deviation():
    rng = np.random.default_rng(0)
    for kind in ("gaussian", "laplace"):
        draws = Noise(kind, 2.0).sample(rng, 200_000)
        assert draws.std() == pytest.approx(2.0, rel=0.02)
    lap = Noise("laplace", 1.0).sample(rng, 200_000)
    assert np.mean(np.abs(lap)) == pytest.approx(1 / np.sqrt(2), rel=0.02)  # scale b = 1/sqrt 2


def test_protocol_scales():
    full = LinearProtocol.at_scale("full")
    assert (full.n_train, full.dim, full.trials, full.n_subsets) == (100, 10, 100, 5000)
    assert full.lam == 100.0
    smoke = LinearProtocol.at_scale("smoke")
    assert smoke.trials < full.trials and smoke.n_subsets < full.n_subsets
    with pytest.raises(ValueError, match="scale"):
        LinearProtocol.at_scale("huge")


def test_iif_at_lam_n_is_influence_minus_a_leverage_term(trial):
    X, y, Xt, yt = trial.X, trial.y, trial.X_test, trial.y_test
    scores, _ = iif_scores(X, y, Xt, yt, lam=float(X.shape[0]))
    factor, influence, leverage_term = iif_decomposition(X, y, Xt, yt)
    np.testing.assert_allclose(scores, factor[:, None] * (influence - leverage_term),
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(influence, influence_scores(X, y, Xt, yt), rtol=1e-10)
    assert np.all(factor > 1) and np.all(leverage_term >= 0)
