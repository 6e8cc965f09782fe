"""Features of stacked model copies against the one-copy fast path, copy by copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iif import ProjectionSettings
from iif.engine.features import (
    can_stack_features,
    loss_features,
    step_features,
)
from iif.engine.functional import FunctionalModel
from iif.engine.projection import make_projector
from iif.engine.stacked import StackedState
from iif.task.task import Recipe, Task


def _copies(model: nn.Module, n: int) -> list:
    fmodel = FunctionalModel(model)
    gen = torch.Generator().manual_seed(5)
    states = []
    for _ in range(n):
        s = fmodel.state().clone()
        for v in s.params.values():
            v.add_(0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
        states.append(s)
    return fmodel, states


def test_stacked_features_equal_each_copy_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    task = Task(model, "classification", Recipe())
    fmodel, states = _copies(model, 3)
    projector = make_projector(fmodel.num_params, ProjectionSettings(dim=24,
                               structure="kronecker"), "cpu", torch.float64, fmodel)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    rho = torch.softmax(torch.randn(3, 11, 3, generator=gen, dtype=torch.float64), -1)
    prev = torch.softmax(torch.randn(3, 11, 3, generator=gen, dtype=torch.float64), -1)
    stacked = StackedState.stack(states)
    assert can_stack_features(fmodel, states[0], x, projector)
    u, psi = step_features(fmodel, stacked, x, rho, prev, task, projector, chunk_size=2)
    xt = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    tt = torch.nn.functional.one_hot(torch.tensor([[0, 2], [1, 1], [2, 0]]), 3).double()
    gamma = loss_features(fmodel, stacked, xt, tt, task, projector, chunk_size=1)
    assert u.shape == psi.shape == (3, 11, projector.dim) and gamma.shape == (3, 2, projector.dim)
    for b, s in enumerate(states):
        u1, psi1 = step_features(fmodel, s, x, rho[b], prev[b], task, projector, chunk_size=4)
        torch.testing.assert_close(u[b], u1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(psi[b], psi1, rtol=1e-10, atol=1e-12)
        g1 = loss_features(fmodel, s, xt[b], tt[b], task, projector)
        torch.testing.assert_close(gamma[b], g1, rtol=1e-10, atol=1e-12)


def test_dense_projection_or_other_layers_do_not_stack():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    fmodel = FunctionalModel(model)
    x = torch.zeros(2, 4, dtype=torch.float64)
    dense = make_projector(fmodel.num_params, ProjectionSettings(dim=8), "cpu", torch.float64)
    kron = make_projector(fmodel.num_params, ProjectionSettings(dim=8, structure="kronecker"),
                          "cpu", torch.float64, fmodel)
    assert not can_stack_features(fmodel, fmodel.state(), x, dense)
    assert not can_stack_features(fmodel, fmodel.state(), x, kron)  # LayerNorm is not Linear


def test_features_beyond_the_budget_are_memory_mapped_with_a_feature_dir(tmp_path, monkeypatch):
    """Past max_feature_bytes, features are refused, or memory-mapped from unnamed files in
    feature_dir: the same scores, no file left behind."""
    import numpy as np
    import tiny_job

    from iif.errors import InputError

    task, train, test = tiny_job.problem()
    small = tiny_job.method(task, train, test_batch=1, max_feature_bytes=2_000)
    with pytest.raises(InputError, match="feature_dir"):
        small.attribute(test)
    mapped = []
    original = np.memmap

    def counting(*args, **kwargs):
        mapped.append(kwargs.get("shape"))
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", counting)
    spilled = tiny_job.method(task, train, test_batch=1, max_feature_bytes=2_000,
                              feature_dir=tmp_path / "spill").attribute(test)
    expected = tiny_job.method(task, train, test_batch=1).attribute(test)
    assert mapped and all(shape[-1] == 32 for shape in mapped)  # (N, P) feature matrices
    np.testing.assert_allclose(spilled.scores, expected.scores, rtol=1e-12, atol=1e-15)
    assert list((tmp_path / "spill").iterdir()) == []
