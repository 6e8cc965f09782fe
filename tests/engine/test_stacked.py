"""Stacked model copies against one ``fit`` per copy with the same minibatch order."""

from __future__ import annotations

import pytest
import torch

from iif.engine.engine import why_training_cannot_stack
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.stacked import StackedState, fit_stacked, stacked_losses, stacked_outputs
from iif.engine.training import FitResult, fit
from iif.task.task import Recipe, Task

COPIES = 3


def _perturbed(fmodel: FunctionalModel, copies: int) -> list[ModelState]:
    base = fmodel.state()
    gen = torch.Generator().manual_seed(11)
    states = []
    for _ in range(copies):
        s = base.clone()
        for v in s.params.values():
            v.add_(0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
        states.append(s)
    return states


def _assert_same(result, expected) -> None:
    assert result.finite == expected.finite
    assert result.epochs == expected.epochs
    assert result.losses == pytest.approx(expected.losses, rel=1e-10)
    for k in expected.state.params:
        torch.testing.assert_close(result.state.params[k], expected.state.params[k],
                                   rtol=1e-10, atol=1e-12)
    for k in expected.state.buffers:
        torch.testing.assert_close(result.state.buffers[k], expected.state.buffers[k],
                                   rtol=1e-10, atol=1e-12)


def _one_by_one(task, fmodel, states, x, targets, *, extra_coefs=None, stop_at=None, **kw):
    """``fit`` per copy, each with a fresh generator of the same seed."""
    out = []
    for b, s in enumerate(states):
        extra = stop = None
        if extra_coefs is not None:
            def extra(p, buf, c=extra_coefs[b]):
                return c * sum((v**2).sum() for v in p.values())
        if stop_at is not None:
            def stop(p, buf, limit=stop_at[b]):
                return bool(sum((v**2).sum() for v in p.values()) >= limit)
        t = targets[b] if targets.dim() == 3 else targets
        out.append(fit(task, fmodel, s, x, t, extra=extra, stop=stop,
                       generator=torch.Generator().manual_seed(4), **kw))
    return out


def _stacked(task, fmodel, states, x, targets, *, extra_coefs=None, stop_at=None, **kw):
    extra = stop = None
    data = ()
    if extra_coefs is not None:
        def extra(p, buf, c):
            return c * sum((v**2).sum() for v in p.values())
        data = (torch.as_tensor(extra_coefs, dtype=torch.float64),)
    if stop_at is not None:
        limits = torch.as_tensor(stop_at, dtype=torch.float64)

        def stop(p, buf):
            norms = sum((v**2).flatten(1).sum(1) for v in p.values())
            return norms >= limits
    return fit_stacked(task, fmodel, StackedState.stack(states), x, targets, extra=extra,
                       extra_data=data, stop=stop,
                       generator=torch.Generator().manual_seed(4), **kw)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_each_copy_follows_its_own_fit(mlp_factory, regression_data, optimizer):
    x, y = regression_data
    model = mlp_factory(seed=2)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=5, momentum=0.9,
                                            weight_decay=0.01, optimizer=optimizer))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, COPIES)
    gen = torch.Generator().manual_seed(3)
    targets = y + 0.3 * torch.randn(COPIES, *y.shape, generator=gen, dtype=y.dtype)
    kw = dict(epochs=3, extra_coefs=[0.0, 0.01, -0.02])
    got = _stacked(task, fmodel, states, x, targets, **kw)
    want = _one_by_one(task, fmodel, states, x, targets, **kw)
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)
    # shared targets broadcast to every copy
    got = _stacked(task, fmodel, states, x, y, epochs=2)
    want = _one_by_one(task, fmodel, states, x, y, epochs=2)
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


def test_copies_stop_and_diverge_independently(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=2)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=5, momentum=0.9))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, COPIES)
    norms = [float(sum((v**2).sum() for v in s.params.values())) for s in states]
    # copy 0 grows its norm until a stop fires mid-run; copy 1 is pushed to overflow (NaN/inf
    # ends it at its last sound epoch); copy 2 trains all epochs
    coefs = [-0.5, -1e30, 0.0]
    stop_at = [norms[0] * 1.3, float("inf"), float("inf")]
    kw = dict(epochs=4, extra_coefs=coefs, stop_at=stop_at)
    got = _stacked(task, fmodel, states, x, y, **kw)
    want = _one_by_one(task, fmodel, states, x, y, **kw)
    assert want[0].finite and 0 < len(want[0].losses) <= 4 and want[0].epochs < 4
    assert not want[1].finite and want[1].epochs >= 1  # kept its last sound epoch
    assert want[2].finite and want[2].epochs == 4
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


def test_sound_check_rejects_an_epoch_of_one_copy(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=2)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=5))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, 2)
    calls = {0: 0, 1: 0}

    def sound(b, state):
        calls[b] += 1
        return b == 0 or calls[b] < 2  # copy 1's second epoch is rejected

    res = fit_stacked(task, fmodel, StackedState.stack(states), x, y, epochs=3, sound=sound,
                      generator=torch.Generator().manual_seed(4))
    one = fit(task, fmodel, states[1], x, y, epochs=1, generator=torch.Generator().manual_seed(4))
    assert res[0].finite and res[0].epochs == 3
    assert not res[1].finite and res[1].epochs == 1
    kept = res[1]
    _assert_same(FitResult(kept.state, True, kept.losses, kept.epochs), one)


def test_batchnorm_buffers_are_per_copy(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=2, batchnorm=True)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=6))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, COPIES)
    got = _stacked(task, fmodel, states, x, y, epochs=2)
    want = _one_by_one(task, fmodel, states, x, y, epochs=2)
    assert not torch.equal(want[0].state.buffers["1.running_mean"],
                           states[0].buffers["1.running_mean"])
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


def test_stacked_outputs_and_members(mlp_factory, regression_data):
    x, _ = regression_data
    model = mlp_factory(seed=2)
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, COPIES)
    stacked = StackedState.stack(states)
    assert len(stacked) == COPIES
    out = stacked_outputs(fmodel, stacked, x, chunk_size=5)
    assert out.shape == (COPIES, len(x), 2)
    for b, s in enumerate(stacked.members()):
        torch.testing.assert_close(out[b], fmodel.outputs(s, x))
        torch.testing.assert_close(s.params["0.weight"], states[b].params["0.weight"])


@pytest.mark.parametrize("per_copy_generators", [False, True], ids=["shared", "own"])
@pytest.mark.parametrize("per_copy_targets", [False, True], ids=["shared-y", "own-y"])
def test_each_copy_on_its_own_subset_and_order(mlp_factory, regression_data,
                                               per_copy_generators, per_copy_targets):
    """Copy b with ``subsets[b]`` (and generator b) equals ``fit`` on ``x[subsets[b]]``."""
    x, y = regression_data
    model = mlp_factory(seed=2, batchnorm=True)
    # SGD: under Adam the bias in front of BatchNorm (true gradient zero) amplifies rounding
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=3, momentum=0.9))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, COPIES)
    gen = torch.Generator().manual_seed(3)
    subsets = torch.stack([torch.randperm(len(x), generator=gen)[:7] for _ in range(COPIES)])
    targets = y + 0.3 * torch.randn(COPIES, *y.shape, generator=gen, dtype=y.dtype)
    targets = targets if per_copy_targets else y
    generator = ([torch.Generator().manual_seed(10 + b) for b in range(COPIES)]
                 if per_copy_generators else torch.Generator().manual_seed(4))
    got = fit_stacked(task, fmodel, StackedState.stack(states), x, targets, epochs=3,
                      generator=generator, subsets=subsets)
    for b, s in enumerate(states):
        seed = 10 + b if per_copy_generators else 4
        t = targets[b] if per_copy_targets else targets
        want = fit(task, fmodel, s, x[subsets[b]], t[subsets[b]], epochs=3,
                   generator=torch.Generator().manual_seed(seed))
        _assert_same(got[b], want)


def test_a_generator_per_copy_without_subsets(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(seed=2)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=5))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, 2)
    got = fit_stacked(task, fmodel, StackedState.stack(states), x, y, epochs=2,
                      generator=[torch.Generator().manual_seed(b) for b in (7, 8)])
    for b, seed in enumerate((7, 8)):
        _assert_same(got[b], fit(task, fmodel, states[b], x, y, epochs=2,
                                 generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(ValueError, match="one generator per copy"):
        fit_stacked(task, fmodel, StackedState.stack(states), x, y, epochs=1,
                    generator=[torch.Generator()])
    with pytest.raises(ValueError, match="subsets must be"):
        fit_stacked(task, fmodel, StackedState.stack(states), x, y, epochs=1,
                    subsets=torch.zeros(3, 4, dtype=torch.long))


def test_frozen_parameters_of_each_copy(regression_data):
    """``StackedState.frozen``: per-copy parameters that are used but never trained."""
    x, y = regression_data
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    model[2].bias.requires_grad_(False)
    task = Task(model, "regression", Recipe(lr=0.05, batch_size=5))
    fmodel = FunctionalModel(model)
    states = _perturbed(fmodel, 2)
    biases = [torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.0],
                                                                           dtype=torch.float64)]
    stacked = StackedState.stack(states)
    stacked.frozen = {"2.bias": torch.stack(biases)}
    got = fit_stacked(task, fmodel, stacked, x, y, epochs=2,
                      generator=torch.Generator().manual_seed(4))
    assert torch.equal(stacked.clone().frozen["2.bias"], stacked.frozen["2.bias"])
    trained = StackedState.stack([r.state for r in got])
    trained.frozen = stacked.frozen
    outs = stacked_outputs(fmodel, trained, x)
    losses = stacked_losses(task, fmodel, trained, x, y)
    for b in range(2):
        with torch.no_grad():
            model[2].bias.copy_(biases[b])
        one = FunctionalModel(model)
        want = fit(task, one, states[b], x, y, epochs=2,
                   generator=torch.Generator().manual_seed(4))
        _assert_same(got[b], want)
        # a batched matmul under vmap may round differently from a plain one on some CPUs
        # (AVX-512 kernels): the outputs agree to round-off, the training above bit for bit
        torch.testing.assert_close(outs[b], one.outputs(want.state, x), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(losses[b], task.sample_loss(outs[b], y), rtol=0, atol=0)


def test_custom_optimizers_cannot_be_stacked(mlp_factory):
    model = mlp_factory()
    assert why_training_cannot_stack(Task(model, "regression", Recipe(optimizer="adamw"))) is None
    custom = Recipe(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert "custom optimizer" in why_training_cannot_stack(Task(model, "regression", custom))
