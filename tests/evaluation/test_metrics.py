"""LDS and AUC against hand-computed cases and scipy / scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from iif.evaluation import auc, lds, random_subsets, spearman_columns, subset_predictions


def test_spearman_columns_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(30, 4)).astype(float)  # many ties
    b = rng.normal(size=(30, 4))
    got = spearman_columns(a, b)
    for j in range(4):
        assert got[j] == pytest.approx(spearmanr(a[:, j], b[:, j])[0], abs=1e-12)
    assert np.isnan(spearman_columns(np.ones((5, 1)), b[:5, :1])[0])


def test_lds_hand_computed():
    # two training samples, three subsets, one test sample
    subsets = np.array([[True, False], [False, True], [True, True]])
    scores = np.array([[1.0, 2.0]])  # q = [1, 2, 3]
    np.testing.assert_array_equal(subset_predictions(scores, subsets)[:, 0], [1, 2, 3])
    assert lds(scores, subsets, np.array([[0.1], [0.2], [0.3]])).mean == pytest.approx(1.0)
    assert lds(scores, subsets, np.array([[0.3], [0.2], [0.1]])).mean == pytest.approx(-1.0)
    assert lds(scores, subsets, np.array([[0.2], [0.1], [0.3]])).mean == pytest.approx(0.5)


def test_lds_random_against_scipy():
    rng = np.random.default_rng(1)
    subsets = random_subsets(40, 20, 0.5, seed=2)
    scores = rng.normal(size=(6, 20))
    losses = subsets.astype(float) @ scores.T + rng.normal(size=(40, 6))
    result = lds(scores, subsets, losses)
    q = subsets.astype(float) @ scores.T
    expected = [spearmanr(losses[:, s], q[:, s])[0] for s in range(6)]
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert result.stderr == pytest.approx(np.std(expected, ddof=1) / np.sqrt(6), abs=1e-12)
    assert result.n_subsets == 40 and result.mean > 0.3


def test_random_subsets_have_the_requested_size_and_seed():
    s = random_subsets(10, 9, 0.5, seed=3)
    assert s.shape == (10, 9) and s.dtype == bool
    assert np.all(s.sum(1) == round(0.5 * 9))
    np.testing.assert_array_equal(s, random_subsets(10, 9, 0.5, seed=3))
    assert not np.array_equal(s, random_subsets(10, 9, 0.5, seed=4))


def test_auc_against_sklearn_and_by_hand():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # a tie counts half
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=500), 1)  # ties
    labels = rng.random(500) < 0.2
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("call", [
    lambda: lds(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 2))),  # not boolean
    lambda: lds(np.zeros((2, 3)), np.zeros((4, 2), bool), np.zeros((4, 2))),  # N mismatch
    lambda: lds(np.zeros((2, 3)), np.zeros((4, 3), bool), np.zeros((3, 2))),  # M mismatch
    lambda: lds(np.full((2, 3), np.nan), np.zeros((4, 3), bool), np.zeros((4, 2))),
    lambda: auc(np.array([1.0, 2.0]), np.array([True, True])),
    lambda: random_subsets(1, 10),
    lambda: random_subsets(5, 10, fraction=1.0),
])
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
