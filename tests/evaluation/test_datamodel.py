"""The datamodel ceiling: exact on planted additive models, at least as good as IF on linear
regression."""

from __future__ import annotations

import numpy as np
import pytest

from iif.errors import InputError
from iif.evaluation import lds, random_subsets
from iif.evaluation.datamodel import datamodel_lds, fit_datamodel, ridge_grid
from iif_paper.experiments.linear_regression import (
    LinearProtocol,
    Noise,
    influence_scores,
    make_trial,
    subset_test_losses,
)


def _planted(n_subsets: int, n_train: int = 40, n_test: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(n_test, n_train))
    intercept = rng.normal(size=n_test)
    return rng, beta, intercept


def test_recovers_a_planted_additive_model_exactly():
    rng, beta, intercept = _planted(300)
    subsets = rng.random((300, 40)) < 0.5  # subsets of varying size: scores fully determined
    losses = subsets @ beta.T + intercept
    np.testing.assert_allclose(fit_datamodel(subsets, losses), beta, atol=1e-9)
    np.testing.assert_allclose(fit_datamodel(subsets, losses, ridge=0.0), beta, atol=1e-9)
    # a ridge shrinks the scores
    shrunk = fit_datamodel(subsets, losses, ridge=1e3)
    assert np.abs(shrunk).sum() < 0.9 * np.abs(beta).sum()


def test_fixed_size_subsets_fix_the_scores_up_to_a_constant():
    _, beta, intercept = _planted(300)
    subsets = random_subsets(300, 40, 0.5, seed=1)  # every subset has 20 samples
    losses = subsets @ beta.T + intercept
    got = fit_datamodel(subsets, losses)
    np.testing.assert_allclose(got, beta - beta.mean(1, keepdims=True), atol=1e-9)
    # the predictions, and so the LDS, are those of the planted model
    assert lds(got, subsets, losses).mean == pytest.approx(1.0)


def test_sign_convention_and_noise():
    rng, beta, intercept = _planted(2000, seed=3)
    subsets = random_subsets(2000, 40, 0.5, seed=4)
    losses = subsets @ beta.T + intercept + 0.5 * rng.normal(size=(2000, 3))
    got = fit_datamodel(subsets, losses)
    centred = beta - beta.mean(1, keepdims=True)
    for s in range(3):
        assert np.corrcoef(got[s], centred[s])[0, 1] > 0.95  # positive: raises the loss
    grid = ridge_grid(subsets)
    assert grid[0] == 0 and np.all(np.diff(grid) > 0)


def test_datamodel_lds_is_at_least_the_influence_function_on_linear_regression():
    protocol = LinearProtocol(n_train=40, dim=5, n_test=10)
    dm_values, if_values = [], []
    for trial_index in range(3):
        rng = np.random.default_rng([7, trial_index])
        t = make_trial(rng, protocol, Noise("gaussian", 1.0), Noise("gaussian", 1.0))
        fit_subsets = random_subsets(2000, 40, 0.5, seed=10 + trial_index)
        eval_subsets = random_subsets(500, 40, 0.5, seed=20 + trial_index)
        fit_losses = subset_test_losses(t.X, t.y, t.X_test, t.y_test, fit_subsets)
        eval_losses = subset_test_losses(t.X, t.y, t.X_test, t.y_test, eval_subsets)
        result = datamodel_lds(fit_subsets, fit_losses, eval_subsets, eval_losses)
        assert result.info["n_fit_subsets"] == 2000 and result.info["ridge_median"] >= 0
        dm_values.append(result.mean)
        if_values.append(lds(influence_scores(t.X, t.y, t.X_test, t.y_test), eval_subsets,
                             eval_losses).mean)
    assert np.mean(dm_values) > 0.5
    assert np.mean(dm_values) >= np.mean(if_values) - 0.02


def test_rejects_bad_input():
    subsets = random_subsets(10, 6, 0.5, seed=0)
    losses = np.ones((10, 2))
    with pytest.raises(InputError, match="boolean"):
        fit_datamodel(subsets.astype(int), losses)
    with pytest.raises(InputError, match=r"\(M, n_test\)"):
        fit_datamodel(subsets, np.ones((9, 2)))
    with pytest.raises(InputError, match="NaN"):
        fit_datamodel(subsets, np.full((10, 2), np.nan))
    with pytest.raises(InputError, match="ridge"):
        fit_datamodel(subsets, losses, ridge=-1.0)
    with pytest.raises(InputError, match="separate"):
        datamodel_lds(subsets, losses, subsets, losses)
