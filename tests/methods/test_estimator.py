"""The shared estimator shape (iif.methods.estimator): products of test features, a solve and
training features, stored or recomputed in chunks, against explicit matrix products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from iif import Recipe, Task
from iif.engine.engine import Budget, Engine
from iif.methods.estimator import KernelEstimator, ensemble_scores, identity, weighted_sum


def _engine(chunk: int) -> Engine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    task = Task(model, "regression", Recipe(lr=0.1, epochs=1, batch_size=4))
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(11, 3, generator=gen, dtype=torch.float64),
            torch.randn(11, 2, generator=gen, dtype=torch.float64))
    return Engine.bind(task, task.validate(data, "training data"), model, Budget(chunk))


def _parts(chunk: int):
    engine = _engine(chunk)

    def featurise(x, t):
        return engine.loss_features(engine.state, x, t)

    gen = torch.Generator().manual_seed(2)
    root = torch.randn(engine.dim, engine.dim, generator=gen, dtype=torch.float64)
    matrix = root @ root.T + torch.eye(engine.dim, dtype=torch.float64)
    return engine, featurise, matrix


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_products_are_test_features_times_solve_times_training_features(chunk):
    engine, featurise, matrix = _parts(chunk)
    train = featurise(engine.train.x, engine.train.targets)
    gen = torch.Generator().manual_seed(3)
    test_x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    test_t = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    want = (featurise(test_x, test_t) @ matrix @ train.T).numpy()
    want_self = torch.einsum("ij,jk,ik->i", train, matrix, train).numpy()
    idx = np.array([7, 0, 3, 10, 3])
    for stored in (train, None):  # stored, or recomputed chunk by chunk
        est = KernelEstimator(engine, featurise, lambda v: matrix @ v, stored)
        got = est.products(est.test_features(test_x, test_t))
        assert got.dtype == torch.float64 and got.shape == (5, 11)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
        np.testing.assert_allclose(est.self_products(idx, step=2).numpy(), want_self[idx],
                                   rtol=1e-12)


def test_identity_solve_gives_plain_gradient_products():
    engine, featurise, _ = _parts(3)
    est = KernelEstimator(engine, featurise, identity)
    train = featurise(engine.train.x, engine.train.targets)
    np.testing.assert_allclose(est.products(train[:2]).numpy(), (train[:2] @ train.T).numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(est.self_products(np.arange(11)).numpy(),
                               train.pow(2).sum(1).numpy(), rtol=1e-12)


def test_weighted_sum_and_ensemble_scores():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    assert torch.equal(weighted_sum([(0.5, a), (2.0, b)]), -(0.5 * a + 2.0 * b))
    with pytest.raises(ValueError):
        weighted_sum([])
    k1, k2 = np.array([[1.0, 2.0], [0.0, 4.0]]), np.array([[3.0, 0.0], [2.0, -2.0]])
    w1, w2 = np.array([1.0, 0.5]), np.array([0.0, 1.5])
    want = -((k1 + k2) / 2) * ((w1 + w2) / 2)[None, :]
    np.testing.assert_allclose(ensemble_scores([(k1, w1), (k2, w2)]), want)
    np.testing.assert_allclose(ensemble_scores([(k1[0], w1), (k2[0], w2)]), want[0])
