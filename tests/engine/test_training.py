"""The minibatch optimisation loop against a hand-written SGD loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch.func import functional_call

import iif
from iif.engine.functional import FunctionalModel
from iif.engine.training import FitOptions, fit, seeded
from iif.task.task import Recipe, Task


@dataclass(frozen=True)
class _SGDSettings:
    """The keywords of :func:`_hand_sgd`."""

    lr: float
    batch_size: int
    epochs: int
    seed: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    extra_coef: float = 0.0
    max_steps: int | None = None


def _hand_sgd(model, x, y, **settings):
    """Plain minibatch SGD (PyTorch's momentum and weight-decay conventions) on MSE;
    ``settings``: the fields of :class:`_SGDSettings` (lr, batch_size, epochs, seed required)."""
    sgd = _SGDSettings(**settings)
    lr, batch_size, epochs, seed = sgd.lr, sgd.batch_size, sgd.epochs, sgd.seed
    momentum, weight_decay, extra_coef, max_steps = (sgd.momentum, sgd.weight_decay,
                                                     sgd.extra_coef, sgd.max_steps)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    velocity = {n: None for n in names}
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    losses, steps = [], 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            out = functional_call(model, {**live, **buffers}, (x[idx],))
            loss = ((out - y[idx]) ** 2).mean(dim=1).mean()
            loss = loss + extra_coef * sum((p**2).sum() for p in live.values())
            grads = torch.autograd.grad(loss, [live[k] for k in names])
            for k, g in zip(names, grads, strict=True):
                g = g + weight_decay * params[k]
                if momentum:
                    velocity[k] = g if velocity[k] is None else momentum * velocity[k] + g
                    g = velocity[k]
                params[k] = params[k] - lr * g
            total += float(loss.detach()) * len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return params, losses + [total / (start + len(idx))]
        losses.append(total / n)
    return params, losses


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "batch_size"), [(0.0, 0.0, 5), (0.0, 0.01, 4), (0.9, 0.02, 5)]
)
def test_fit_matches_hand_written_sgd(mlp_factory, regression_data, momentum, weight_decay,
                                      batch_size):
    x, y = regression_data
    model = mlp_factory(seed=5)
    task = Task(model, "regression", Recipe(lr=0.1, batch_size=batch_size, momentum=momentum,
                                            weight_decay=weight_decay))
    fmodel = FunctionalModel(model)
    res = fit(task, fmodel, fmodel.state(), x, y, epochs=3,
              generator=torch.Generator().manual_seed(17))
    expected, losses = _hand_sgd(model, x, y, lr=0.1, batch_size=batch_size, epochs=3, seed=17,
                                 momentum=momentum, weight_decay=weight_decay)
    assert res.finite
    assert set(res.state.params) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(res.state.params[k], v, rtol=1e-10, atol=1e-12)
    assert res.losses == pytest.approx(losses, rel=1e-10)


def test_fit_lr_and_batch_size_override_recipe(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=6)
    task = Task(model, "regression", Recipe(lr=5.0, batch_size=1))
    fmodel = FunctionalModel(model)
    res = fit(task, fmodel, fmodel.state(), x, y, epochs=2, lr=0.05, batch_size=3,
              generator=torch.Generator().manual_seed(2))
    expected, _ = _hand_sgd(model, x, y, lr=0.05, batch_size=3, epochs=2, seed=2)
    for k, v in expected.items():
        torch.testing.assert_close(res.state.params[k], v, rtol=1e-10, atol=1e-12)


def test_fit_with_extra_loss(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=7)
    task = Task(model, "regression", Recipe(lr=0.1, batch_size=5))
    fmodel = FunctionalModel(model)

    def extra(params, buffers):
        return 0.05 * sum((p**2).sum() for p in params.values())

    res = fit(task, fmodel, fmodel.state(), x, y, epochs=2, extra=extra,
              generator=torch.Generator().manual_seed(4))
    expected, losses = _hand_sgd(model, x, y, lr=0.1, batch_size=5, epochs=2, seed=4,
                                 extra_coef=0.05)
    for k, v in expected.items():
        torch.testing.assert_close(res.state.params[k], v, rtol=1e-10, atol=1e-12)
    assert res.losses == pytest.approx(losses, rel=1e-10)


def test_fit_stop_after_first_step(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=8)
    task = Task(model, "regression", Recipe(lr=0.1, batch_size=5))
    fmodel = FunctionalModel(model)
    calls = []

    def stop(params, buffers):
        calls.append(1)
        return True

    res = fit(task, fmodel, fmodel.state(), x, y, epochs=3, stop=stop,
              generator=torch.Generator().manual_seed(9))
    expected, losses = _hand_sgd(model, x, y, lr=0.1, batch_size=5, epochs=3, seed=9,
                                 max_steps=1)
    assert len(calls) == 1
    assert res.finite
    for k, v in expected.items():
        torch.testing.assert_close(res.state.params[k], v, rtol=1e-10, atol=1e-12)
    assert res.losses == pytest.approx(losses, rel=1e-10)


def test_fit_zero_epochs_returns_the_state(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory()
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    res = fit(task, fmodel, state, x, y, epochs=0)
    assert res.losses == []
    for k, v in state.params.items():
        assert torch.equal(res.state.params[k], v)


def test_fit_does_not_modify_input_state_or_module(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(batchnorm=True, seed=2).train()
    module_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = Task(model, "regression", Recipe(lr=0.1, batch_size=4))
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    snapshot = state.clone()
    res = fit(task, fmodel, state, x, y, epochs=2, generator=torch.Generator().manual_seed(0))
    for k in snapshot.params:
        assert torch.equal(state.params[k], snapshot.params[k])
        assert not state.params[k].requires_grad
    assert not torch.equal(res.state.params["0.weight"], snapshot.params["0.weight"])
    for k in snapshot.buffers:
        assert torch.equal(state.buffers[k], snapshot.buffers[k])
    # Training mode updated the running statistics of the result, not of the input.
    assert not torch.equal(res.state.buffers["1.running_mean"], snapshot.buffers["1.running_mean"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, module_before[k])
    assert model.training
    assert all(not v.requires_grad for v in res.state.params.values())


def test_fit_diverging_run_is_not_finite(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=3)
    task = Task(model, "regression", Recipe(lr=1e6, batch_size=4))
    fmodel = FunctionalModel(model)
    res = fit(task, fmodel, fmodel.state(), x, y * 100, epochs=50,
              generator=torch.Generator().manual_seed(0))
    assert res.finite is False
    assert len(res.losses) < 50
    assert all(math.isfinite(v) for v in res.losses)


def test_fit_nan_targets_are_not_finite(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory()
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    y = y.clone()
    y[:] = float("nan")
    res = fit(task, fmodel, fmodel.state(), x, y, epochs=2)
    assert res.finite is False
    assert res.losses == []


def _mean_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def test_train_decreases_the_loss(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=1)
    task = Task(model, "regression", Recipe(lr=0.1, epochs=30, batch_size=4))
    before = _mean_loss(model, x, y)
    losses = iif.train(task, (x, y), progress=False)
    after = _mean_loss(model, x, y)
    assert len(losses) == 30
    assert after < 0.7 * before
    assert losses[-1] < losses[0]


def test_train_classifier_decreases_the_loss(mlp_factory, classification_data):
    x, labels = classification_data
    model = mlp_factory(out_dim=3, seed=2)
    task = Task(model, "classification", Recipe(lr=0.2, epochs=40, batch_size=4))

    def ce():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), labels))

    before = ce()
    iif.train(task, (x.numpy(), labels.numpy()), progress=False)
    assert ce() < 0.8 * before


def test_train_is_deterministic_per_seed(mlp_factory, regression_data):
    x, y = regression_data
    trained = []
    for seed in (0, 0, 1):
        model = mlp_factory(seed=1)
        iif.train(Task(model, "regression", Recipe(lr=0.1, epochs=3, batch_size=4)), (x, y),
                  seed=seed, progress=False)
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(trained[0], trained[1])
    assert not torch.equal(trained[0], trained[2])


def test_train_epochs_override_and_matches_fit(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=4)
    task = Task(model, "regression", Recipe(lr=0.1, epochs=99, batch_size=5))
    expected, _ = _hand_sgd(model, x, y, lr=0.1, batch_size=5, epochs=2, seed=3)
    losses = iif.train(task, (x, y), epochs=2, seed=3, progress=False)
    assert len(losses) == 2
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-10, atol=1e-12)


def test_seeded_restores_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    with seeded(5, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(4), expected_next)
    torch.manual_seed(5)
    assert torch.equal(inside, torch.rand(3))


def test_fit_rejected_epoch_returns_the_last_sound_one(mlp_factory, regression_data):
    """``sound`` rejecting epoch 3 ends the run with the state after epoch 2, equal to a run of
    two epochs from the same seed."""
    x, y = regression_data
    model = mlp_factory(seed=2)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=4))
    fmodel = FunctionalModel(model)
    calls = []

    def sound(state):
        calls.append(state)
        return len(calls) < 3

    res = fit(task, fmodel, fmodel.state(), x, y, epochs=5, sound=sound,
              generator=torch.Generator().manual_seed(0))
    two = fit(task, fmodel, fmodel.state(), x, y, epochs=2,
              generator=torch.Generator().manual_seed(0))
    assert (res.finite, res.epochs, len(calls), len(res.losses)) == (False, 2, 3, 2)
    for k in two.state.params:
        torch.testing.assert_close(res.state.params[k], two.state.params[k], rtol=0, atol=0)


def test_fit_nan_mid_run_keeps_the_last_finite_epoch(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=3)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=4))
    fmodel = FunctionalModel(model)
    steps = []

    def extra(params, buffers):  # a loss term that turns NaN in the third epoch
        steps.append(1)
        return torch.tensor(float("nan") if len(steps) > 6 else 0.0, dtype=torch.float64)

    res = fit(task, fmodel, fmodel.state(), x, y, epochs=5, extra=extra,
              generator=torch.Generator().manual_seed(0))
    assert (res.finite, res.epochs) == (False, 2)  # 12 samples / batch 4: 3 steps per epoch
    assert res.state.is_finite()


def test_fit_on_epoch_sees_every_epoch_state(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=4)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=4))
    fmodel = FunctionalModel(model)
    seen = []
    res = fit(task, fmodel, fmodel.state(), x, y, epochs=3,
              on_epoch=lambda e, s: seen.append((e, s)),
              generator=torch.Generator().manual_seed(0))
    assert [e for e, _ in seen] == [1, 2, 3]
    torch.testing.assert_close(seen[-1][1].flat(), res.state.flat(), rtol=0, atol=0)
    two = fit(task, fmodel, fmodel.state(), x, y, epochs=2,
              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[1][1].flat(), two.state.flat(), rtol=0, atol=0)


def test_train_ensemble_members_are_independent(mlp_factory, classification_data):
    x, y = classification_data
    model = mlp_factory(out_dim=3, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    task = Task(model, "classification", Recipe(lr=0.1, epochs=3, batch_size=4))
    models = iif.train_ensemble(task, (x, y), 3, seed=5)
    flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[1], flat[2])
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)  # the task's own model is untouched
    # member k is a fresh model seeded with seed + k, trained like iif.train with that seed
    again = iif.train_ensemble(task, (x, y), 1, seed=6)[0]
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in again.parameters()]),
                               flat[1], rtol=0, atol=0)


def test_train_ensemble_on_halves_sees_half_the_data(mlp_factory, regression_data):
    x, y = regression_data
    task = Task(mlp_factory(seed=1), "regression", Recipe(lr=0.1, epochs=1, batch_size=100))
    seen = []
    original = iif.engine.training.train

    def spy(member, data, **kwargs):
        seen.append(len(data[0]))
        return original(member, data, **kwargs)

    iif.engine.training.train = spy
    try:
        iif.train_ensemble(task, (x, y), 2, subset="half")
    finally:
        iif.engine.training.train = original
    assert seen == [len(x) // 2] * 2


def test_train_ensemble_rejects_bad_arguments(mlp_factory, regression_data):
    task = Task(mlp_factory(), "regression")
    for kwargs in ({"n_models": 0}, {"n_models": 2, "subset": "bootstrap"}):
        with pytest.raises(ValueError):
            iif.train_ensemble(task, regression_data, **kwargs)

    class Scale(torch.nn.Module):  # a parameter without reset_parameters
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(ValueError, match="re-initialise"):
        iif.train_ensemble(Task(Scale(), "regression"), regression_data, 1)


def test_train_cached_trains_once_and_retrains_on_other_inputs(tmp_path, caplog):
    from torch import nn

    def build(seed: int = 0) -> Task:
        torch.manual_seed(seed)  # the user's construction, seeded
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        return Task(model, "classification", Recipe(lr=0.1, epochs=3, batch_size=4))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(10) % 2
    path = tmp_path / "model.pt"
    first = build()
    assert iif.train_cached(first, (x, y), path) is True
    reference = build()
    iif.train(reference, (x, y))
    for a, b in zip(first.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same as train()
    again = build()
    assert iif.train_cached(again, (x, y), path) is False  # loaded, not trained
    for a, b in zip(again.model.parameters(), first.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert iif.train_cached(build(), (x[:-1], y[:-1]), path) is True  # other data
    assert iif.train_cached(build(seed=1), (x[:-1], y[:-1]), path) is True  # other init
    path.write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="iif"):
        assert iif.train_cached(build(), (x, y), path) is True
    assert "cannot use" in caplog.text


def test_fit_options_equal_keywords():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=4))
    fmodel = FunctionalModel(model)
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    by_keywords = fit(task, fmodel, fmodel.state(), x, y, epochs=2,
                      generator=torch.Generator().manual_seed(1))
    options = FitOptions(epochs=5, generator=torch.Generator().manual_seed(1))
    by_options = fit(task, fmodel, fmodel.state(), x, y, options, epochs=2)  # keywords win
    assert by_options.epochs == by_keywords.epochs == 2
    for k, v in by_keywords.state.params.items():
        assert torch.equal(v, by_options.state.params[k])
