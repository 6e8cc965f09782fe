"""Methods declare what the infrastructure needs (store chunking, training-set sharding);
the store and torchrun code ask them instead of switching on method names."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch
from torch import nn

import iif
from iif import BaselineSettings, InfluenceFunction, IntegratedInfluence, ProjectionSettings
from iif.runs.distributed import Sharding

SRC = Path(iif.__file__).parent


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(12) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return iif.Task(model, "classification", iif.Recipe(lr=0.1, epochs=1, batch_size=4)), (x, y)


def test_methods_declare_chunking_and_sharding():
    task, train = _problem()
    per_test = IntegratedInfluence(task, train, test_batch=4)
    shared = IntegratedInfluence(task, train, baseline=BaselineSettings(mode="shared"))
    trak = iif.TRAK(task, train, projection=ProjectionSettings(dim=8))
    exact_if = InfluenceFunction(task, train)
    projected_if = InfluenceFunction(task, train, projection=ProjectionSettings(dim=8))
    assert per_test.store_chunk(10) == 4 and not per_test.scores_test_set_as_one()
    assert shared.store_chunk(10) == 10 and shared.scores_test_set_as_one()
    assert [m.shards_training_set() for m in (per_test, shared, trak, exact_if, projected_if)] \
        == [False, True, True, False, True]
    assert trak.store_chunk(1000) == 256


class _OneProcess(Sharding):
    """The whole training set, summed over one process (no process group needed)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_sharding_is_passed_in_and_reaches_every_ensemble_member():
    task, train = _problem()
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
              for _ in range(2)]
    method = iif.TRAK(task, train, models=models, projection=ProjectionSettings(dim=8))
    sharding = _OneProcess(0, 1)
    with method.sharded(sharding):
        assert all(m.sharding is sharding for m in method.members())
        inside = method.attribute((train[0][:2], train[1][:2])).scores
    assert method.sharding is None and all(m.sharding is None for m in method.members())
    np.testing.assert_allclose(inside, method.attribute((train[0][:2], train[1][:2])).scores,
                               rtol=1e-12)


def test_store_and_torchrun_code_do_not_switch_on_method_names():
    for name in ("results/store.py", "runs/distributed.py"):
        tree = ast.parse((SRC / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("method", "baseline"):
                parent_is_compare = any(
                    isinstance(n, ast.Compare) and node in ast.walk(n) for n in ast.walk(tree))
                assert not parent_is_compare, f"{name} compares method.{node.attr}"
            assert not (isinstance(node, ast.Attribute) and node.attr == "_test_batch"), name
