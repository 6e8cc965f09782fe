"""The engine bound once per trained model (iif.engine.engine): one per ensemble member, the budget
honoured (TRAK's features spill to feature_dir), and one interface for B >= 1 copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import iif.engine.engine as engine_module
import iif.engine.features as features_module
import iif.engine.training as training
from iif.engine.budget import MAX_COPIES, spill_features_to, spill_folder
from iif.engine.engine import NOT_KRONECKER, SHARED_LAYERS, Budget, Engine, Stacking
from iif.engine.projection import ProjectionSettings, make_projector
from iif.engine.stacked import StackedState
from iif.errors import InputError
from iif.methods.integrated.baseline import BaselineSettings, unlearned_baselines
from iif.methods.integrated.integrated import IntegratedInfluence
from iif.methods.integrated.target_path import PathSettings
from iif.methods.trak.trak import TRAK
from iif.task.task import Recipe, Task

KRONECKER = ProjectionSettings(dim=6, structure="kronecker")


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(14, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    return x, torch.arange(14) % 3, xt, torch.arange(3) % 3


def _mlp(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return model.eval()


def _task(seed: int = 4) -> Task:
    return Task(_mlp(seed), "classification", Recipe(lr=0.05, batch_size=4))


def test_each_ensemble_member_has_its_own_engine(data):
    x, y, _, _ = data
    models = [_mlp(s) for s in (7, 8)]
    method = IntegratedInfluence(_task(), (x, y), projection=KRONECKER, models=models,
                                 path=PathSettings(steps=1), progress=False)
    members = method.members()
    engines = [m.engine for m in members]
    assert len({id(e) for e in engines}) == 2
    assert len({id(e.fmodel) for e in engines}) == 2
    assert len({id(e.projector) for e in engines}) == 2
    for engine, model in zip(engines, models, strict=True):
        assert engine.fmodel.module is model
        # the Kronecker hooks sit on this member's own modules
        own = {id(m) for m in model.modules()}
        assert all(id(layer.module) in own for layer in engine.projector.layers)
        torch.testing.assert_close(engine.state.flat(),
                                   torch.cat([p.detach().flatten()
                                              for p in model.parameters()]),
                                   rtol=0, atol=0)
    # the method's attributes are its engine's
    assert method.fmodel is method.engine.fmodel and method.projector is method.engine.projector


def test_settings_changed_rebind_the_engine_at_the_same_theta(data):
    x, y, xt, yt = data
    method = TRAK(_task(), (x, y), projection=ProjectionSettings(dim=6), progress=False)
    state = method.state
    method.chunk_size = 5
    method.attribute((xt, yt))
    assert method.engine.budget == Budget(5, method.max_feature_bytes, None)
    assert method.state is state  # theta* stays frozen

    sentinel = object()
    with method.sharded(sentinel):
        assert method.engine.sharding is sentinel
    assert method.engine.sharding is None


@pytest.mark.parametrize("structure", ["dense", "kronecker"])
def test_trak_features_spill_to_feature_dir(data, tmp_path, monkeypatch, structure):
    x, y, xt, yt = data
    settings = ProjectionSettings(dim=6, structure=structure)
    in_memory = TRAK(_task(), (x, y), projection=settings, progress=False)
    expected = in_memory.attribute((xt, yt)).scores
    expected_self = in_memory.self_influence()

    # training features 14 x 6 float64 = 672 bytes beyond the budget; the 6 x 6 solve fits
    with pytest.raises(InputError, match="raise max_feature_bytes"):
        TRAK(_task(), (x, y), projection=settings, max_feature_bytes=400,
             progress=False).attribute((xt, yt))

    spilled = []
    mkstemp = features_module.tempfile.mkstemp

    def counting(*args, **kwargs):
        spilled.append(kwargs.get("dir"))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(features_module.tempfile, "mkstemp", counting)
    method = TRAK(_task(), (x, y), projection=settings, max_feature_bytes=400,
                  feature_dir=tmp_path / "spill", progress=False)
    np.testing.assert_array_equal(method.attribute((xt, yt)).scores, expected)
    np.testing.assert_array_equal(method.self_influence(), expected_self)
    assert spilled and all(str(d) == str(tmp_path / "spill") for d in spilled)
    assert list((tmp_path / "spill").iterdir()) == []  # unlinked once mapped


def _engine(task: Task, x: torch.Tensor, y: torch.Tensor) -> Engine:
    train = task.validate((x, y), "training data")
    return Engine.bind(task, train, task.model, Budget(chunk_size=4),
                       lambda fm: make_projector(fm.num_params, KRONECKER, task.device,
                                                 task.dtype, fm))


@pytest.mark.parametrize("copies", [1, 3])
def test_one_state_and_stacked_copies_give_the_same_features(data, copies):
    x, y, _, _ = data
    task = _task()
    engine = _engine(task, x, y)
    assert engine.stacks_features()
    targets = engine.train.targets
    stacked = StackedState.repeat(engine.state, copies)

    one = engine.loss_features(engine.state, x, targets)  # (N, P)
    many = engine.loss_features(stacked, x.expand(copies, *x.shape),
                                targets.expand(copies, *targets.shape))  # (B, N, P)
    assert many.shape == (copies, *one.shape)
    for b in range(copies):
        torch.testing.assert_close(many[b], one, rtol=1e-12, atol=1e-14)

    gen = torch.Generator().manual_seed(0)
    rho_prev = torch.softmax(torch.randn(targets.shape, generator=gen,
                                         dtype=torch.float64), dim=1)
    u, psi = engine.step_features(engine.state, x, targets, rho_prev)
    u_b, psi_b = engine.step_features(stacked, x, targets.expand(copies, *targets.shape),
                                      rho_prev.expand(copies, *rho_prev.shape))
    for b in range(copies):
        torch.testing.assert_close(u_b[b], u, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(psi_b[b], psi, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(u, one, rtol=1e-12, atol=1e-14)  # u is the loss gradient


def test_engine_budget_refuses_or_spills(data, tmp_path):
    x, y, _, _ = data
    task = _task()
    train = task.validate((x, y), "training data")
    tight = Engine.bind(task, train, task.model, Budget(4, 100))
    with pytest.raises(InputError, match="feature_dir"):
        tight.loss_features(tight.state, x, train.targets)
    spill = Engine.bind(task, train, task.model, Budget(4, 100, str(tmp_path)))
    roomy = Engine.bind(task, train, task.model, Budget(4))
    torch.testing.assert_close(spill.loss_features(spill.state, x, train.targets),
                               roomy.loss_features(roomy.state, x, train.targets),
                               rtol=0, atol=0)


# ---- training and unlearning: one interface over B >= 1 copies ------------------------------
def _soft_targets(copies: int, n: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(copies, n, 3, generator=gen, dtype=torch.float64), dim=2)


def _extra(params, buffers, scale):
    # a per-copy extra objective with that copy's slice of ``extra_data``
    return scale * sum(p.pow(2).sum() for p in params.values())


def _same_states(a, b) -> bool:
    return torch.equal(a.flat(), b.flat()) and all(
        torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


@pytest.mark.parametrize("one", ["model state", "stacked state"])
def test_fit_of_one_copy_is_the_plain_run(data, one):
    x, y, _, _ = data
    task = _task()
    engine = _engine(task, x, y)
    state = engine.state if one == "model state" else StackedState.repeat(engine.state, 1)
    (res,) = engine.fit(state, x, engine.train.targets, epochs=2,
                        generator=torch.Generator().manual_seed(3))
    plain = training.fit(task, engine.fmodel, engine.state, x, engine.train.targets, epochs=2,
                         generator=torch.Generator().manual_seed(3))
    assert _same_states(res.state, plain.state)
    assert res.losses == plain.losses and res.finite and res.epochs == plain.epochs == 2


def test_fit_of_three_copies_equals_three_runs_of_one(data):
    x, y, _, _ = data
    engine = _engine(_task(), x, y)
    targets = _soft_targets(3, len(x))
    scale = torch.tensor([0.0, 0.01, 0.05], dtype=torch.float64)
    options = dict(epochs=2, extra=_extra, extra_data=(scale,))
    many = engine.fit(StackedState.repeat(engine.state, 3), x, targets,
                      generator=torch.Generator().manual_seed(3), **options)
    assert len(many) == 3
    for b, res in enumerate(many):
        (alone,) = engine.fit(engine.state, x, targets[b], epochs=2,
                              extra=_extra, extra_data=(scale[b : b + 1],),
                              generator=torch.Generator().manual_seed(3))
        assert res.finite and res.epochs == alone.epochs == 2
        torch.testing.assert_close(res.state.flat(), alone.state.flat(), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(res.losses, alone.losses, rtol=1e-10)


def test_a_task_that_cannot_be_stacked_trains_copy_by_copy(data, monkeypatch):
    x, y, _, _ = data
    task = Task(_mlp(4), "classification",
                Recipe(lr=0.05, batch_size=4,
                       optimizer=lambda ts: torch.optim.SGD(ts, lr=0.05, momentum=0.5)))
    engine = _engine(task, x, y)

    def refuse(*args, **kwargs):
        raise AssertionError("a custom optimizer cannot train stacked copies")

    monkeypatch.setattr(engine_module, "fit_stacked", refuse)
    targets = _soft_targets(3, len(x))
    gen = torch.Generator().manual_seed(3)
    many = engine.fit(StackedState.repeat(engine.state, 3), x, targets, epochs=2, generator=gen)
    for b, res in enumerate(many):
        plain = training.fit(task, engine.fmodel, engine.state, x, targets[b], epochs=2,
                             generator=torch.Generator().manual_seed(3))
        assert _same_states(res.state, plain.state) and res.losses == plain.losses


def test_unlearning_three_copies_equals_three_runs_of_one(data):
    x, y, xt, yt = data
    task = _task()
    engine = _engine(task, x, y)
    tests = [task.validate((xt[j : j + 1], yt[j : j + 1])) for j in range(3)]
    settings = BaselineSettings(epochs=2)
    many = unlearned_baselines(engine, tests, settings, torch.Generator().manual_seed(0))
    for test, base in zip(tests, many, strict=True):
        (alone,) = unlearned_baselines(engine, [test], settings, torch.Generator().manual_seed(0))
        assert not (alone.fell_back or base.fell_back)
        assert not torch.equal(alone.state.flat(), engine.state.flat())  # it moved
        torch.testing.assert_close(base.state.flat(), alone.state.flat(), rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(base.targets, alone.targets, rtol=1e-10, atol=1e-12)


# ---- the policy: stacking and memory ---------------------------------------------------------
def test_copies_that_fit_at_the_boundaries():
    """Copies get a quarter of max_feature_bytes, at least one, at most ``most`` (32)."""
    budget = Budget(max_feature_bytes=4 * 100 * 5)  # a quarter: 500 bytes
    assert budget.copies_that_fit(100) == 5
    assert budget.copies_that_fit(101) == 4  # 500 // 101
    assert budget.copies_that_fit(100, most=3) == 3
    assert budget.copies_that_fit(501) == 1  # not one fits: one copy runs anyway
    assert Budget(max_feature_bytes=0).copies_that_fit(1) == 1
    assert Budget(max_feature_bytes=4 << 30).copies_that_fit(1) == MAX_COPIES == 32
    assert budget.copies_that_fit(0) == 32  # nothing per copy: the cap
    assert budget.holds(2000) and not budget.holds(2001)


def test_check_features_refuses_naming_the_matrix():
    budget = Budget(max_feature_bytes=14 * 6 * 8)
    budget.check_features(14, 6, "TRAK training features", 8)  # exactly the budget
    with pytest.raises(InputError, match=r"^TRAK training features would take 0\.0 GiB "
                                         r"\(15 x 6\); use a smaller projection"):
        budget.check_features(15, 6, "TRAK training features", 8)
    with pytest.raises(InputError, match=r"TRAK kernel would take .* \(14 x 6\).*raise "
                                         r"max_feature_bytes"):
        budget.check_features(14, 6, "TRAK kernel", 8, solve_bytes=1)
    # with a feature_dir the features spill: only the solver's bytes count, and must fit
    spilling = Budget(max_feature_bytes=100, feature_dir="anywhere")
    spilling.check_features(10**6, 6, "TRAK training features", 8, solve_bytes=100)
    with pytest.raises(InputError, match=r"TRAK training features .* \(0 x 6\)"):
        spilling.check_features(10**6, 6, "TRAK training features", 8, solve_bytes=101)


def test_spill_folder_holds_spills_or_refuses(tmp_path):
    assert spill_folder((3, 4), torch.float64, torch.device("cpu"), 96, "path features") is None
    with pytest.raises(InputError, match=r"^path features would take .* \(3 x 5\); use a "
                                         r"projection .*feature_dir="):
        spill_folder((3, 5), torch.float64, torch.device("cpu"), 96, "path features")
    with spill_features_to(tmp_path):
        assert spill_folder((3, 5), torch.float64, torch.device("cpu"), 96, "x") == tmp_path


def test_engine_check_features_uses_the_projection_and_dtype(data):
    x, y, _, _ = data
    task = _task()
    base = _engine(task, x, y)
    engine = base.rebound(base.projector, Budget(max_feature_bytes=14 * 4 * 8))
    assert engine.dim == 4
    engine.check_features(14, "test features")
    with pytest.raises(InputError, match=r"test features would take .* \(15 x 4\)"):
        engine.check_features(15, "test features")
    assert engine.copies_that_fit(14 * 2) == 4 and engine.copies_that_fit(1, most=2) == 2


class _Twice(nn.Module):
    """One Linear layer called twice per forward (shared weights)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_stacking_says_why_not(data):
    x, y, _, _ = data
    assert _engine(_task(), x, y).stacking() == Stacking(None, None)
    custom = Task(_mlp(4), "classification",
                  Recipe(optimizer=lambda ts: torch.optim.SGD(ts, lr=0.05)))
    stacking = _engine(custom, x, y).stacking()
    assert not stacking.training and stacking.features
    assert "custom optimizer" in stacking.why_not_training
    bn = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 3))
    stacking = _engine(Task(bn.double().eval(), "classification"), x, y).stacking()
    assert "momentum=None" in stacking.why_not_training
    assert stacking.why_not_features == NOT_KRONECKER  # BatchNorm's parameters: no layer
    exact = Engine.bind(_task(), _task().validate((x, y)), _mlp(4), Budget())
    assert exact.stacking().training and exact.stacking().why_not_features == NOT_KRONECKER
    twice = Task(_Twice().double().eval(), "classification")
    stacking = _engine(twice, x, y).stacking()
    assert stacking.training and stacking.why_not_features == SHARED_LAYERS
    assert not _engine(twice, x, y).stacks_path_features(1)


def test_path_features_stack_while_they_fit(data):
    x, y, _, _ = data
    task = _task()
    base = _engine(task, x, y)
    per_copy = 2 * len(x) * base.dim * 8  # u and psi, float64
    engine = base.rebound(base.projector, Budget(max_feature_bytes=3 * per_copy))
    assert engine.stacks_path_features(3) and not engine.stacks_path_features(4)
