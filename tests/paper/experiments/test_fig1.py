"""Figure 1's construction: A is fitted exactly, so LOO and IF give it nothing; IIF does not."""

from __future__ import annotations

import numpy as np
import pytest

from iif_paper.experiments.fig1 import ToySettings, attribute, make_toy, summarise


@pytest.fixture(scope="module")
def toy_and_scores():
    toy = make_toy(ToySettings(), seed=0)
    return toy, attribute(toy)


def test_a_is_fitted_exactly_and_removing_it_changes_nothing(toy_and_scores):
    toy, att = toy_and_scores
    X = toy.design()
    assert np.linalg.matrix_rank(X) == X.shape[1] < X.shape[0]
    assert abs(att["residual_a"]) < 1e-10
    np.testing.assert_allclose(att["theta_minus_a"], att["theta_star"], atol=1e-10)
    # brute-force LOO of A on B's loss is zero
    y_b = toy.y_b
    xb = toy.test_design()[0]
    loss = (xb @ att["theta_star"] - y_b) ** 2
    loss_minus = (xb @ att["theta_minus_a"] - y_b) ** 2
    assert abs(loss - loss_minus) < 1e-10


def test_loo_and_if_give_a_nothing_but_iif_does(toy_and_scores):
    toy, att = toy_and_scores
    a, scores = toy.a, att["scores"]
    assert abs(scores["LOO"][a]) < 1e-10 and abs(scores["IF"][a]) < 1e-10
    iif = summarise(scores["IIF"], a)
    assert iif["score_A"] < -1e-2  # a proponent of B: including A lowers B's loss
    assert iif["rank_A"] <= 3 and iif["share_A"] > 0.1
    # the other samples do get IF and LOO scores: A's zero is specific to A
    assert np.abs(scores["IF"]).max() > 1e-3 and np.abs(scores["LOO"]).max() > 1e-3
    # completeness of the closed form
    assert scores["IIF"].sum() == pytest.approx(att["delta"], rel=1e-9)
    # the baseline exists at the paper's lambda: B's leverage is below 1
    assert att["leverage_b"] < 1 and att["lam"] == len(toy.y)
    assert att["lam_note"] is None
