"""Unlearning baselines: divergence handling (keep the last sound epoch, or fall back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from iif.engine.engine import Budget, Engine
from iif.engine.functional import FunctionalModel
from iif.engine.training import fit
from iif.methods.integrated.baseline import (
    BaselineSettings,
    mean_loss,
    trivial_loss,
    unlearned_baselines,
)
from iif.task.task import Recipe, Task


def _least_squares():
    """A fitted linear model and a test point far outside the training cloud (|x|^2 = 25):
    the ascent on its loss is unbounded and outruns the training term within a few epochs."""
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(40, 3)))
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)[:, None]
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
    task = Task(model, "regression", Recipe(lr=0.02, batch_size=10))
    train = task.validate((x, y))
    test = task.validate((torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64),
                          torch.tensor([[2.0]], dtype=torch.float64)))
    return task, FunctionalModel(model), train, test


def _unlearn(settings):
    task, fmodel, train, test = _least_squares()
    state = fmodel.state()
    engine = Engine.bind(task, train, fmodel.module, Budget())
    (base,) = unlearned_baselines(engine, [test], settings, torch.Generator().manual_seed(0))
    return task, fmodel, state, train, test, base


def test_divergence_after_some_epochs_keeps_the_last_sound_epoch():
    settings = BaselineSettings(lam=2.0, lr=0.02, epochs=8, stop_test_loss=None)
    task, fmodel, state, train, test, base = _unlearn(settings)
    assert base.truncated and not base.fell_back
    limit = settings.divergence_factor * max(
        mean_loss(task, fmodel, state, train.x, train.targets),
        trivial_loss(task, train.targets))
    assert mean_loss(task, fmodel, base.state, train.x, train.targets) <= limit
    # the kept state is that of an unlearning run stopped one epoch earlier, with the same seed
    sign_term = lambda p, b: -task.sample_loss(fmodel(p, b, test.x), test.targets).mean() / 2.0  # noqa: E731
    for epochs in range(1, 8):
        run = fit(task, fmodel, state, train.x, train.targets, epochs=epochs, extra=sign_term,
                  generator=torch.Generator().manual_seed(0))
        if torch.equal(run.state.flat(), base.state.flat()):
            break
    else:
        raise AssertionError("the kept state is not the end of any whole unlearning epoch")
    assert mean_loss(task, fmodel, base.state, test.x, test.targets) > mean_loss(
        task, fmodel, state, test.x, test.targets)
    np.testing.assert_allclose(base.targets.numpy(),
                               fmodel.outputs(base.state, train.x).numpy())


def test_divergence_in_the_first_epoch_falls_back_to_theta_star():
    settings = BaselineSettings(lam=0.5, lr=1.0, stop_test_loss=None)
    task, fmodel, state, train, test, base = _unlearn(settings)
    assert base.fell_back and not base.truncated
    assert torch.equal(base.state.flat(), state.flat())


def test_a_sound_run_is_neither_truncated_nor_fallen_back():
    _, _, state, _, _, base = _unlearn(BaselineSettings(lam=50.0, epochs=2))
    assert not base.truncated and not base.fell_back
    assert not torch.equal(base.state.flat(), state.flat())


def test_chance_stop_ends_unlearning_at_the_trivial_loss():
    """The default stop ends the ascent at the first step whose test loss reaches the loss of
    predicting the mean; without it the same run goes on to diverge."""
    task, fmodel, state, train, test, base = _unlearn(BaselineSettings(lam=2.0, epochs=8))
    chance = trivial_loss(task, train.targets)
    assert not base.truncated and not base.fell_back
    assert mean_loss(task, fmodel, base.state, test.x, test.targets) >= chance
    assert _unlearn(BaselineSettings(lam=2.0, epochs=8, stop_test_loss=None))[-1].truncated


def test_bad_stop_setting_is_rejected():
    for bad in ("median", float("nan")):
        with pytest.raises(ValueError, match="stop_test_loss"):
            BaselineSettings(stop_test_loss=bad)
