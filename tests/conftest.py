"""Shared tiny fixtures: small float64 models with seeded initialisation and synthetic data."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from iif.task.task import Recipe, Task

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one test process per core: more torch threads would only contend
    torch.set_num_threads(1)

IN_DIM = 3
HIDDEN = 4
N_SAMPLES = 12
N_CLASSES = 3
OUT_REG = 2


def build_mlp(
    in_dim: int = IN_DIM,
    out_dim: int = OUT_REG,
    hidden: int = HIDDEN,
    seed: int = 0,
    batchnorm: bool = False,
) -> nn.Module:
    """A float64 MLP with a smooth activation; BatchNorm buffers get non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, out_dim)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
        if batchnorm:
            bn = model[1]
            bn.running_mean.copy_(torch.randn(hidden, generator=gen, dtype=torch.float64))
            bn.running_var.copy_(
                torch.rand(hidden, generator=gen, dtype=torch.float64) * 2.0 + 0.5
            )
    return model.eval()


@pytest.fixture
def mlp_factory() -> Callable[..., nn.Module]:
    return build_mlp


@pytest.fixture
def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=gen, dtype=torch.float64)
    y = torch.randn(N_SAMPLES, OUT_REG, generator=gen, dtype=torch.float64)
    return x, y


@pytest.fixture
def classification_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=gen, dtype=torch.float64)
    y = torch.arange(N_SAMPLES) % N_CLASSES
    return x, y


@pytest.fixture
def regression_task() -> Task:
    return Task(build_mlp(out_dim=OUT_REG, seed=3), "regression", Recipe(lr=0.05, batch_size=4))


@pytest.fixture
def classification_task() -> Task:
    return Task(
        build_mlp(out_dim=N_CLASSES, seed=4), "classification", Recipe(lr=0.05, batch_size=4)
    )


@pytest.fixture(scope="module")
def single_thread():
    """Tiny float64 models: threads only add contention (use per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
