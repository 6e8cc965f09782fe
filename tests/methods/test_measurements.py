"""Measurements: what the scores explain, checked against explicit autograd computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iif import (
    TRAK,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    PathSettings,
    ProjectionSettings,
    Task,
    TracIn,
)
from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.methods.tracin.checkpoints import Checkpoint
from iif.task.measurements import FunctionMeasurement, Logit, LogProb, Margin, TestLoss

from .reference import flat_model, influence, safe_damping, sample_grads, targets


@pytest.fixture(scope="module")
def classifier(mlp_classifier):
    p = mlp_classifier
    return p.task, p.x, p.y, p.xt, p.yt


def _with(task: Task, measurement) -> Task:
    return Task(task.model, task.kind, task.recipe, measurement=measurement)


def _k1(task: Task, x, y, xt, yt, damping: float):
    """IIF with K = 1 from the baseline f(x; theta*): one step at theta* (an IF of the
    measurement against the training losses)."""
    with torch.no_grad():
        base = torch.softmax(task.model(torch.as_tensor(x)), -1).numpy()
    method = IntegratedInfluence(task, (x, y), path=PathSettings(steps=1, sparse=False),
                                 curvature=CurvatureSettings(kind="fisher", damping=damping),
                                 progress=False)
    return method.attribute((xt, yt), baseline_targets=base).scores


def _oracle(task: Task, x, y, xt, yt, measured) -> tuple[np.ndarray, float]:
    """-(1/N) grad m_test^T (F + damping I)^{-1} grad l_i with autograd, one sample at a time;
    ``measured(out (1, C), onehot (1, C)) -> (1,)`` is the loss-oriented measurement."""
    theta, forward = flat_model(task.model)
    x, xt = torch.as_tensor(x), torch.as_tensor(xt)
    t, tt = targets("classification", y, 3), targets("classification", yt, 3)
    g = sample_grads(forward, theta, "classification", x, t)
    fisher = g.T @ g / x.shape[0]
    damping = safe_damping(fisher)
    rows = []
    for i in range(xt.shape[0]):
        th = theta.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(measured(forward(th, xt[i:i + 1]), tt[i:i + 1]).sum(),
                                        th)[0])
    return influence(fisher, damping, torch.stack(rows), g), damping


def _neg_margin(out: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    true = (out * onehot).sum(-1)
    rest = torch.logsumexp(out.masked_fill(onehot > 0.5, float("-inf")), -1)
    return -(true - rest)


@pytest.mark.parametrize("measurement, measured", [
    (Margin(), _neg_margin),
    (Logit(2), lambda out, t: -out[:, 2]),
    (Logit(), lambda out, t: -(out * t).sum(-1)),
])
def test_iif_explains_the_measurement(classifier, measurement, measured):
    task, x, y, xt, yt = classifier
    expected, damping = _oracle(task, x, y, xt, yt, measured)
    scores = _k1(_with(task, measurement), x, y, xt, yt, damping)
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("solver", ["exact", "projected", "cg"])
def test_influence_function_explains_the_measurement(classifier, solver):
    task, x, y, xt, yt = classifier
    expected, damping = _oracle(task, x, y, xt, yt, _neg_margin)
    # a projection as wide as the model is the exact gradient (make_projector)
    wide = {"projection": ProjectionSettings(dim=256)} if solver == "projected" else {}
    method = InfluenceFunction(_with(task, Margin()), (x, y), solver=solver,
                               curvature=CurvatureSettings(kind="fisher", damping=damping),
                               progress=False, **wide)
    scores = method.attribute((xt, yt)).scores
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-8 * np.abs(expected).max())


def test_tracin_explains_the_measurement(classifier):
    task, x, y, xt, yt = classifier
    theta, forward = flat_model(task.model)
    t = targets("classification", y, 3)
    g = sample_grads(forward, theta, "classification", torch.as_tensor(x), t)
    th = theta.clone().requires_grad_(True)
    m = _neg_margin(forward(th, torch.as_tensor(xt[:1])), targets("classification", yt[:1], 3))
    g_test = torch.autograd.grad(m.sum(), th)[0]
    checkpoint = Checkpoint(epoch=1, lr=0.1, state=FunctionalModel(task.model).state())
    scores = TracIn(_with(task, Margin()), (x, y), checkpoints=[checkpoint],
                    progress=False).attribute((xt[:1], yt[:1])).scores
    np.testing.assert_allclose(scores[0], -0.1 * (g @ g_test).numpy(), rtol=1e-8)


def test_trak_refuses_a_task_measurement(classifier):
    task, x, y, *_ = classifier
    with pytest.raises(InputError, match="model_output"):
        TRAK(_with(task, Margin()), (x, y), progress=False)


def test_log_probability_is_minus_the_cross_entropy(classifier):
    task, x, y, xt, yt = classifier
    base = _k1(task, x, y, xt, yt, 0.01)
    for measurement in (LogProb(), TestLoss()):
        np.testing.assert_allclose(_k1(_with(task, measurement), x, y, xt, yt, 0.01), base,
                                   rtol=1e-10, atol=1e-14)


def test_a_scaled_measurement_scales_the_scores_and_its_orientation_flips_them(classifier):
    task, x, y, xt, yt = classifier
    base = _k1(task, x, y, xt, yt, 0.01)

    def ce(out, t):
        return -(t * torch.log_softmax(out, -1)).sum(-1)

    twice = FunctionMeasurement(lambda out, t: 2.0 * ce(out, t), "2 x loss", False)
    np.testing.assert_allclose(_k1(_with(task, twice), x, y, xt, yt, 0.01), 2.0 * base,
                               rtol=1e-10, atol=1e-14)
    # the same value declared "higher is better" is attributed as its negative
    flipped = FunctionMeasurement(ce, "loss, misdeclared", True)
    np.testing.assert_allclose(_k1(_with(task, flipped), x, y, xt, yt, 0.01), -base,
                               rtol=1e-10, atol=1e-14)


def test_completeness_compares_with_the_change_of_the_measurement(classifier):
    task, x, y, xt, yt = classifier
    method = IntegratedInfluence(_with(task, Margin()), (x, y), progress=False)
    result = method.attribute((xt[:2], yt[:2]))
    theta_star = torch.as_tensor(method.task.model(torch.as_tensor(xt[:2])).detach())
    onehot = targets("classification", yt[:2], 3)
    m_star = _neg_margin(theta_star, onehot).numpy()
    # delta = m(theta*) - m(theta'): theta' unlearned the test sample, so its margin is lower
    assert np.all(result.completeness["delta"] < 0)
    assert np.all(np.isfinite(m_star))


def test_measurements_are_checked_against_the_task(classifier):
    task = classifier[0]
    with pytest.raises(InputError, match="Measurement"):
        Task(task.model, "classification", measurement=lambda o, t: o[:, 0])
    with pytest.raises(InputError, match="regression"):
        Task(task.model, "regression", measurement=Margin())
    with pytest.raises(InputError, match="integer >= 0"):
        Logit(-1)

    class Empty(LogProb.__mro__[1]):  # a Measurement without value
        name = "empty"

    with pytest.raises(InputError, match="does not implement value"):
        Task(task.model, "classification", measurement=Empty())


def test_the_measurement_is_in_the_settings(classifier):
    task, x, y, *_ = classifier
    method = IntegratedInfluence(_with(task, Margin()), (x, y), progress=False)
    assert method.settings()["task"]["measurement"] == "margin"
    default = IntegratedInfluence(task, (x, y), progress=False)
    assert default.settings()["task"]["measurement"] == "test loss"


def test_the_measurement_is_in_the_run_key(classifier):
    from iif.results.runkey import method_key

    task, x, y, *_ = classifier

    def first(out, t):
        return out[:, 0]

    def second(out, t):
        return out[:, 1]

    keys = [method_key(IntegratedInfluence(_with(task, m), (x, y), progress=False)).digest
            for m in (None, Logit(1), Logit(2), Margin(),
                      FunctionMeasurement(first, "f", True),
                      FunctionMeasurement(second, "f", True))]
    assert len(set(keys)) == len(keys)


# ---- a user's measurement function: checked once, its errors reported as the user's -----------
def _first_two(out, t):
    return out[:, :2]


@pytest.mark.parametrize("method", [InfluenceFunction, TracIn])
def test_a_measurement_with_more_than_one_value_per_sample_is_refused(classifier, method):
    task, x, y, *_ = classifier
    pair = FunctionMeasurement(_first_two, "first two logits", True)
    extra = {"checkpoints": [Checkpoint(1, 0.1, state=FunctionalModel(task.model).state())]} \
        if method is TracIn else {}
    with pytest.raises(InputError, match=r"measurement 'first two logits' must return one value "
                                         r"per test sample, shape \(n,\), got \(n, 2\)"):
        method(_with(task, pair), (x, y), progress=False, **extra)


def _no_grad_logit(out, t):
    with torch.no_grad():
        return out[:, 0] * 1.0


@pytest.mark.parametrize("fn", [
    lambda out, t: out.detach()[:, 0],
    _no_grad_logit,
    lambda out, t: torch.as_tensor(out.detach().numpy()[:, 0]),
], ids=["detach", "no_grad", "numpy"])
def test_a_measurement_detached_from_the_outputs_is_refused(classifier, fn):
    task, x, y, *_ = classifier
    detached = FunctionMeasurement(fn, "detached logit", True)
    with pytest.raises(InputError, match="measurement 'detached logit' returned a value that "
                                         "does not depend differentiably on the model's "
                                         "outputs"):
        InfluenceFunction(_with(task, detached), (x, y), progress=False)


def test_a_measurement_that_is_not_a_tensor_is_refused(classifier):
    task, x, y, *_ = classifier
    floats = FunctionMeasurement(lambda out, t: out.tolist(), "list", True)
    with pytest.raises(InputError, match="measurement 'list' must return a torch tensor of "
                                         r"shape \(n,\), got list"):
        InfluenceFunction(_with(task, floats), (x, y), progress=False)


def _column_seven(out, t):
    return out[:, 7]


def _fails_one_at_a_time(out, t):
    # the engine differentiates one sample at a time: it fails there, not on the probe
    return out[:, 0] if out.shape[0] > 1 else out[:, 7]


@pytest.mark.parametrize("fn", [_column_seven, _fails_one_at_a_time])
def test_an_error_raised_by_the_measurement_function_is_the_users(classifier, fn):
    from iif.errors import UserCodeError, error_message

    task, x, y, xt, yt = classifier
    measurement = FunctionMeasurement(fn, "seventh logit", True)
    with pytest.raises(UserCodeError) as caught:
        InfluenceFunction(_with(task, measurement), (x, y), progress=False).attribute((xt, yt))
    message = error_message(caught.value)
    assert message.startswith(f"calling the measurement function 'seventh logit' "
                              f"({fn.__name__}) failed: IndexError: ")
    assert f"test_measurements.py, in {fn.__name__})" in message
    assert "bug in iif" not in message
    assert isinstance(caught.value.exc, IndexError)


def test_an_error_raised_by_a_measurement_class_is_the_users(classifier):
    from iif.errors import UserCodeError

    task, x, y, xt, yt = classifier

    class Broken(LogProb.__mro__[1]):  # a user's Measurement
        name = "broken"

        def value(self, outputs, targets):
            return outputs[:, 9]

    with pytest.raises(UserCodeError, match=r"calling value\(\) of the measurement 'broken' "
                                            r"\(Broken\) failed: IndexError"):
        InfluenceFunction(_with(task, Broken()), (x, y), progress=False).attribute((xt, yt))


def test_sequence_measurements_are_probed_on_the_models_logits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5)).double()
    x = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 5, (6, 3))
    for fine in (LogProb(), Margin()):
        InfluenceFunction(Task(model, "sequence", measurement=fine), (x, y), progress=False)
    per_position = FunctionMeasurement(lambda out, t: out.logsumexp(-1), "per position", True)
    with pytest.raises(InputError, match=r"shape \(n,\), got \(n, 3\)"):
        InfluenceFunction(Task(model, "sequence", measurement=per_position), (x, y),
                          progress=False)


def test_a_measurement_flat_on_the_probed_samples_is_warned_about(classifier, caplog):
    task, x, y, *_ = classifier
    rounded = FunctionMeasurement(lambda out, t: torch.round(out[:, 0]), "rounded", True)
    with caplog.at_level("WARNING", logger="iif.task.measurements"):
        InfluenceFunction(_with(task, rounded), (x, y), progress=False)
    assert any("'rounded' has a zero gradient" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="iif.task.measurements"):
        InfluenceFunction(_with(task, Logit(0)), (x, y), progress=False)
    assert not caplog.records
