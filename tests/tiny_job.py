"""A tiny seeded classification job shared by the store, command-line and torchrun tests; its
``job`` function is what ``iif attribute --task tests/tiny_job.py:job`` calls."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import iif
from iif import IntegratedInfluence, PathSettings, ProjectionSettings, Recipe, Task

N_TEST = 6


def problem(n_test: int = N_TEST):
    """(task with a trained float64 MLP, (x, y) training data, (x, y) test data)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    xt = rng.normal(size=(n_test, 4))
    yt = (xt[:, 0] + 0.5 * xt[:, 1] > 0).astype(int)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    task = Task(model, "classification", Recipe(lr=0.2, epochs=30, batch_size=25))
    iif.train(task, (x, y), seed=0)
    return task, (x, y), (xt, yt)


def method(task, train, **kw) -> IntegratedInfluence:
    """The IIF settings the tests use (SETTINGS below in TOML form)."""
    return IntegratedInfluence(task, train, path=PathSettings(steps=3), progress=False,
                               projection=ProjectionSettings(dim=32), **kw)


SETTINGS = """
method = "iif"

[path]
steps = 3

[projection]
dim = 32
"""


def job() -> dict:
    task, train, test = problem()
    return {"task": task, "train": train, "test": test}
