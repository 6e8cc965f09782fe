"""Factored (layer input x output gradient) products and Woodbury solves against dense
per-sample gradients on tiny float64 MLPs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import iif.engine.factored as factored
from iif.engine.curvature import CurvatureSettings, gram_solver
from iif.engine.factored import (
    FactoredFisher,
    apply_rows,
    combine_rows,
    dense_rows,
    factored_influence_scores,
    factored_step_scores,
    from_flat,
    gram,
    grams,
    linear_factors,
    linear_layers,
    supports_factored,
    to_flat,
    woodbury_scores,
)
from iif.engine.functional import FunctionalModel
from iif.engine.grads import path_step_fn, per_sample_grads, per_sample_jacobians, sample_loss_fn
from iif.errors import InputError
from iif.task.task import Recipe, Task

EXACT = {"rtol": 1e-10, "atol": 1e-12}
SCORES = {"rtol": 1e-9, "atol": 1e-12}
FISHER = CurvatureSettings(kind="fisher")
N, N_TEST, IN, HID, OUT = 11, 3, 5, 7, 3


def _mlp(bias: bool = True, act: type[nn.Module] = nn.Tanh, dropout: bool = False,
         seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(IN, HID, bias=bias), act()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(HID, OUT, bias=bias))
    # training mode on purpose: the factors must switch dropout off themselves
    return nn.Sequential(*layers).double().train()


MODELS = {
    "tanh-bias": lambda: _mlp(),
    "relu-nobias": lambda: _mlp(bias=False, act=nn.ReLU),
    "relu-dropout": lambda: _mlp(act=nn.ReLU, dropout=True),
    "inplace-relu": lambda: _mlp(act=lambda: nn.ReLU(inplace=True)),
}


def _data(n: int = N, seed: int = 1, kind: str = "classification"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    if kind == "classification":
        rho = torch.softmax(2 * torch.randn(n, OUT, generator=gen, dtype=torch.float64), -1)
        prev = torch.softmax(2 * torch.randn(n, OUT, generator=gen, dtype=torch.float64), -1)
    else:
        rho = torch.randn(n, OUT, generator=gen, dtype=torch.float64)
        prev = torch.randn(n, OUT, generator=gen, dtype=torch.float64)
    return x, rho, prev


def _setup(name: str = "tanh-bias", kind: str = "classification"):
    model = MODELS[name]()
    task = Task(model, kind, Recipe())
    fmodel = FunctionalModel(model)
    return task, fmodel, fmodel.state()


def _dense_step(fmodel, state, task, x, rho, prev):
    """Dense per-sample gradients (N, 2, M): u (row 0) and psi (row 1)."""
    return torch.cat([j for _, j in per_sample_jacobians(fmodel, state, x, path_step_fn(task),
                                                          rho, prev, chunk_size=4)])


# ---- which models qualify --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_supports_factored_accepts_linear_mlps(name):
    _, fmodel, state = _setup(name)
    x, _, _ = _data()
    assert linear_layers(fmodel) is not None
    assert supports_factored(fmodel, state, x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, IN)
        self.b = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Sequence(nn.Module):
    """A Linear on (batch, tokens, features) inputs: its gradient sums over tokens."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.a(x.reshape(x.shape[0], 1, IN).expand(-1, 2, -1)).sum(1)


class _Scaled(nn.Linear):
    """A Linear subclass whose forward uses its weight differently."""

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight.tanh(), self.bias)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, IN)
        self.b = nn.Linear(IN, IN)
        self.b.weight = self.a.weight
        self.c = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.c(self.b(torch.tanh(self.a(x))))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2 * IN, OUT)

    def forward(self, x):
        return self.fc(self.conv(x.reshape(-1, 1, 1, IN)).flatten(1))


UNSUPPORTED = {
    "conv2d": _Conv,
    "linear-twice": _Twice,
    "layernorm": lambda: nn.Sequential(nn.Linear(IN, HID), nn.LayerNorm(HID),
                                       nn.Linear(HID, OUT)),
    "sequence-input": _Sequence,
    "subclass-forward": lambda: nn.Sequential(_Scaled(IN, OUT)),
    "tied-weights": _Tied,
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_supports_factored_refuses(name):
    torch.manual_seed(0)
    model = UNSUPPORTED[name]().double()
    fmodel = FunctionalModel(model)
    x, _, _ = _data()
    assert not supports_factored(fmodel, fmodel.state(), x)


def test_frozen_parameters_stay_out_of_the_factors():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    x, rho, prev = _data()
    assert supports_factored(fmodel, state, x)
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev)
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    for row in (0, 1):
        torch.testing.assert_close(dense_rows(fmodel, f, row), dense[:, row], **EXACT)


def test_a_layer_called_twice_is_an_error():
    torch.manual_seed(0)
    model = _Twice().double()
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    x, rho, _ = _data()
    with pytest.raises(InputError, match="called 2 times"):
        linear_factors(fmodel, fmodel.state(), x, sample_loss_fn(task), rho)


# ---- factors and products --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_factors_give_the_per_sample_gradients(name, kind):
    task, fmodel, state = _setup(name, kind)
    x, rho, prev = _data(kind=kind)
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev, chunk_size=4)
    assert len(f) == N and f.rows == 2
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    for row in (0, 1):
        torch.testing.assert_close(dense_rows(fmodel, f, row), dense[:, row], **EXACT)
        torch.testing.assert_close(f.sq_norms(row), dense[:, row].pow(2).sum(1), **EXACT)


@pytest.mark.parametrize("block", [512, 4])
def test_grams_equal_dense_grams(monkeypatch, block):
    monkeypatch.setattr(factored, "GRAM_BLOCK", block)  # 4: several blocks, mirrored
    task, fmodel, state = _setup("relu-dropout")
    x, rho, prev = _data()
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev)
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    u, psi = dense[:, 0], dense[:, 1]
    k_uu, k_pu, k_up = grams(f, pairs=((0, 0), (1, 0), (0, 1)))
    torch.testing.assert_close(k_uu, u @ u.T, **EXACT)
    torch.testing.assert_close(k_pu, psi @ u.T, **EXACT)
    torch.testing.assert_close(k_up, u @ psi.T, **EXACT)
    xt, tt, _ = _data(N_TEST, seed=3)
    t = linear_factors(fmodel, state, xt, sample_loss_fn(task), tt)
    g = per_sample_grads(fmodel, state, xt, tt, task)
    torch.testing.assert_close(gram(f, t, (1, 0)), psi @ g.T, **EXACT)
    torch.testing.assert_close(gram(t, f, (0, 0)), g @ u.T, **EXACT)


def test_matrix_vector_products_equal_dense():
    task, fmodel, state = _setup("tanh-bias")
    x, rho, prev = _data()
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev)
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(4, fmodel.num_params, generator=gen, dtype=torch.float64)
    w = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    mats = from_flat(fmodel, f.layers, v)
    torch.testing.assert_close(to_flat(fmodel, f.layers, mats), v, rtol=0, atol=0)
    for row in (0, 1):
        torch.testing.assert_close(apply_rows(f, mats, row), dense[:, row] @ v.T, **EXACT)
        torch.testing.assert_close(to_flat(fmodel, f.layers, combine_rows(f, w, row)),
                                   w.T @ dense[:, row], **EXACT)
    # one row per vector
    rows = [0, 1, 1, 0]
    want = torch.stack([dense[:, r] @ v[s] for s, r in enumerate(rows)], dim=1)
    torch.testing.assert_close(apply_rows(f, mats, rows), want, **EXACT)
    want = torch.stack([w[:, s] @ dense[:, r] for s, r in enumerate(rows)])
    torch.testing.assert_close(to_flat(fmodel, f.layers, combine_rows(f, w, rows)), want,
                               **EXACT)


# ---- solves and scores -----------------------------------------------------------------------
def _dense_scores(fmodel, state, task, x, rho, prev, xt, tt, settings):
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    u, psi = dense[:, 0], dense[:, 1]
    gamma = per_sample_grads(fmodel, state, xt, tt, task)
    solver = gram_solver(u, N, settings, "fisher")
    return -(psi @ solver.solve(gamma.T)).T / N, solver


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("route", [True, False])
def test_step_scores_equal_the_dense_woodbury_solve(monkeypatch, name, kind, route):
    monkeypatch.setattr(factored, "_kernel_route", lambda *a: route)
    task, fmodel, state = _setup(name, kind)
    assert N < fmodel.num_params
    x, rho, prev = _data(kind=kind)
    xt, tt, _ = _data(N_TEST, seed=3, kind=kind)
    settings = CurvatureSettings(kind="fisher")
    want, dense_solver = _dense_scores(fmodel, state, task, x, rho, prev, xt, tt, settings)
    scores, solver = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task, settings,
                                          chunk_size=4)
    assert scores.shape == (N_TEST, N) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, want, **SCORES)
    assert solver.damping == pytest.approx(dense_solver.damping, rel=1e-12)
    assert solver.retries == 0 and solver.report()["solver"] == "factored"


def test_effective_dim_and_explicit_damping_follow_the_dense_rule():
    task, fmodel, state = _setup()
    x, rho, prev = _data()
    xt, tt, _ = _data(N_TEST, seed=3)
    dense = _dense_step(fmodel, state, task, x, rho, prev)
    for settings, dim in [(FISHER, N), (replace(FISHER, damping=0.3), None)]:
        scores, solver = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task,
                                              settings, effective_dim=dim)
        ref = gram_solver(dense[:, 0], N, settings, "fisher", effective_dim=dim)
        assert solver.damping == pytest.approx(ref.damping, rel=1e-12)
    assert solver.damping == 0.3


def test_solver_solves_m_vectors_like_the_dense_solver():
    task, fmodel, state = _setup("relu-nobias")
    x, rho, prev = _data()
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev)
    u = _dense_step(fmodel, state, task, x, rho, prev)[:, 0]
    settings = CurvatureSettings(kind="fisher")
    solver = FactoredFisher(fmodel, f, settings).solver()
    ref = gram_solver(u, N, settings, "fisher")
    v = torch.randn(fmodel.num_params, 2, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    torch.testing.assert_close(solver.solve(v), ref.solve(v), **SCORES)
    torch.testing.assert_close(solver.solve(v[:, 0]), ref.solve(v[:, 0]), **SCORES)


@pytest.mark.parametrize("method", ["eigh", "cholesky", "auto"])
def test_several_dampings_equal_separate_solves(method):
    task, fmodel, state = _setup("relu-dropout")
    x, rho, prev = _data()
    xt, tt, _ = _data(N_TEST, seed=3)
    values = [1e-3, 0.05, 2.0]
    many, solvers = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task,
                                         FISHER, dampings=values, method=method)
    assert [s.damping for s in solvers] == values
    used = "eigh" if method == "eigh" else "cholesky"  # auto: eigh only for many values
    assert all(s.report()["factorisation"] == used for s in solvers)
    for value, scores in zip(values, many, strict=True):
        one, _ = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task,
                                      CurvatureSettings(kind="fisher", damping=value))
        torch.testing.assert_close(scores, one, **SCORES)
        want, _ = _dense_scores(fmodel, state, task, x, rho, prev, xt, tt,
                                CurvatureSettings(kind="fisher", damping=value))
        torch.testing.assert_close(scores, want, **SCORES)


def test_zero_damping_is_raised_and_reported():
    task, fmodel, state = _setup()
    x, rho, prev = _data()
    xt, tt, _ = _data(N_TEST, seed=3)
    scores, solver = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task,
                                          CurvatureSettings(kind="fisher", damping=0.0))
    assert solver.damping > 0 and solver.retries >= 1
    want, _ = _dense_scores(fmodel, state, task, x, rho, prev, xt, tt,
                            CurvatureSettings(kind="fisher", damping=solver.damping))
    torch.testing.assert_close(scores, want, **SCORES)
    [_], [eig] = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task,
                                      FISHER, dampings=[0.0], method="eigh")
    assert eig.damping > 0 and eig.retries >= 1
    with pytest.raises(InputError, match="dampings"):
        factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task, FISHER,
                             dampings=[-1.0])


def test_paired_paths_equal_one_path_each():
    """B paths sharing the model and rho, test sample b scored against path b's psi (the
    first step of stacked per-test paths)."""
    task, fmodel, state = _setup("relu-dropout")
    x, rho, _ = _data()
    gen = torch.Generator().manual_seed(4)
    prevs = torch.softmax(torch.randn(N_TEST, N, OUT, generator=gen, dtype=torch.float64), -1)
    xt, tt, _ = _data(N_TEST, seed=3)
    scores, solver = factored_step_scores(fmodel, state, x, rho, prevs, xt, tt, task,
                                          CurvatureSettings(kind="fisher"), chunk_size=4)
    assert scores.shape == (N_TEST, N)
    for b in range(N_TEST):
        one, _ = factored_step_scores(fmodel, state, x, rho, prevs[b], xt[b : b + 1],
                                      tt[b : b + 1], task, CurvatureSettings(kind="fisher"))
        torch.testing.assert_close(scores[b], one[0], **SCORES)


def test_scores_against_other_psi_factors():
    task, fmodel, state = _setup()
    x, rho, prev = _data()
    xt, tt, _ = _data(N_TEST, seed=3)
    f = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev)
    psi_only = linear_factors(fmodel, state, x, lambda o, r, p: sample_loss_fn(task)(o, r)
                              - sample_loss_fn(task)(o, p), rho, prev)
    test = linear_factors(fmodel, state, xt, sample_loss_fn(task), tt)
    solver = FactoredFisher(fmodel, f, CurvatureSettings(kind="fisher")).solver()
    [mine] = woodbury_scores([solver], test, psi_row=0, psi=psi_only)
    torch.testing.assert_close(mine, solver.scores(test), **SCORES)


def test_influence_scores_equal_the_dense_woodbury_solve():
    task, fmodel, state = _setup("tanh-bias")
    x, rho, _ = _data()
    xt, tt, _ = _data(N_TEST, seed=3)
    g = per_sample_grads(fmodel, state, x, rho, task)
    gt = per_sample_grads(fmodel, state, xt, tt, task)
    settings = CurvatureSettings(kind="fisher")
    ref = gram_solver(g, N, settings, "fisher")
    scores, solver = factored_influence_scores(fmodel, state, x, rho, xt, tt, task, settings)
    torch.testing.assert_close(scores, -(g @ ref.solve(gt.T)).T / N, **SCORES)
    assert solver.damping == pytest.approx(ref.damping, rel=1e-12)


def test_other_curvature_kinds_are_refused():
    task, fmodel, state = _setup()
    x, rho, prev = _data()
    with pytest.raises(InputError, match="empirical Fisher"):
        factored_step_scores(fmodel, state, x, rho, prev, x[:1], rho[:1], task,
                             CurvatureSettings(kind="hessian"))
