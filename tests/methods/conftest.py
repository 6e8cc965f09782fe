"""Small trained problems shared by the method tests (float64, seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import iif
from iif import Recipe, Task

from .reference import Problem, mlp


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every module of tests/methods runs on one thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def mlp_regression() -> Problem:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    w = np.array([1.0, -1.0, 0.5])
    y = np.sin(x @ w)[:, None] + 0.1 * rng.normal(size=(60, 1))
    xt = rng.normal(size=(4, 3))
    yt = np.sin(xt @ w)[:, None]
    task = Task(mlp([3, 8, 1], 0), "regression", Recipe(lr=0.1, epochs=300, batch_size=20))
    iif.train(task, (x, y), seed=0)
    return Problem(task, x, y, xt, yt)


@pytest.fixture(scope="module")
def mlp_classifier() -> Problem:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3))
    x = rng.normal(size=(60, 4))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(60, 3)), 1)
    xt = rng.normal(size=(4, 4))
    yt = np.argmax(xt @ w, 1)
    task = Task(mlp([4, 16, 3], 1), "classification", Recipe(lr=0.3, epochs=200, batch_size=20))
    iif.train(task, (x, y), seed=0)
    return Problem(task, x, y, xt, yt, classes=3)


@pytest.fixture(scope="module")
def linear_regression() -> Problem:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    y = x @ np.array([0.5, -1.0, 2.0]) + 0.3 + 0.2 * rng.normal(size=40)
    xt = rng.normal(size=(3, 3))
    yt = xt @ np.array([0.5, -1.0, 2.0]) + 0.3
    torch.manual_seed(2)
    task = Task(nn.Linear(3, 1).double(), "regression", Recipe(lr=0.1, epochs=200, batch_size=40))
    iif.train(task, (x, y[:, None]), seed=0)
    return Problem(task, x, y[:, None], xt, yt[:, None])


