"""The gradient engine against plain autograd definitions, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from iif.engine.functional import FunctionalModel
from iif.engine.grads import (
    full_hessian,
    loss_and_target_difference,
    loss_and_target_jvp,
    loss_and_target_jvps,
    mean_loss_grad,
    output_hessian_factor,
    path_step_fn,
    per_sample_grads,
    per_sample_jacobians,
)
from iif.errors import InputError
from iif.task.task import Task

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _flat_grad(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def _loop_grads(model, task, x, targets):
    """Per-sample gradients, one sample at a time, with plain autograd (model in eval mode)."""
    model.eval()
    params = [p for _, p in _trainable(model)]
    rows = []
    for i in range(x.shape[0]):
        loss = task.sample_loss(model(x[i : i + 1]), targets[i : i + 1])[0]
        rows.append(_flat_grad(loss, params))
    return torch.stack(rows)


def _quartic(out, target):
    return ((out - target) ** 4).mean(-1)


# ---- (1) per-sample gradients ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 100])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_per_sample_grads_equal_autograd_loop(
    mlp_factory, regression_data, chunk_size, batchnorm
):
    x, y = regression_data
    model = mlp_factory(batchnorm=batchnorm)
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    got = per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=chunk_size)
    expected = _loop_grads(model, task, x, y)
    assert got.shape == (x.shape[0], fmodel.num_params)
    torch.testing.assert_close(got, expected, **TOL)


def test_per_sample_grads_use_batchnorm_running_statistics(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(batchnorm=True)
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    base = per_sample_grads(fmodel, state, x, y, task, chunk_size=5)
    # The buffers of the state, not the module's, are used.
    shifted = state.clone()
    shifted.buffers["1.running_mean"] += 1.0
    moved = per_sample_grads(fmodel, shifted, x, y, task, chunk_size=5)
    assert not torch.allclose(base, moved)
    with torch.no_grad():
        model[1].running_mean += 1.0
    torch.testing.assert_close(moved, _loop_grads(model, task, x, y), **TOL)


def test_per_sample_grads_classification(mlp_factory, classification_data):
    x, labels = classification_data
    model = mlp_factory(out_dim=3)
    task = Task(model, "classification")
    d = task.validate((x, labels))
    fmodel = FunctionalModel(model)
    got = per_sample_grads(fmodel, fmodel.state(), d.x, d.targets, task, chunk_size=5)
    params = [p for _, p in _trainable(model)]
    expected = torch.stack([
        _flat_grad(torch.nn.functional.cross_entropy(model(x[i : i + 1]), labels[i : i + 1]),
                   params)
        for i in range(x.shape[0])
    ])
    torch.testing.assert_close(got, expected, **TOL)


def test_per_sample_grads_skip_frozen_parameters(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory()
    model[0].weight.requires_grad_(False)
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    assert "0.weight" not in fmodel.names
    got = per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=5)
    torch.testing.assert_close(got, _loop_grads(model, task, x, y), **TOL)


def test_per_sample_grads_restore_module_mode(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(batchnorm=True).train()
    running = model[1].running_mean.clone()
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    per_sample_grads(fmodel, fmodel.state(), x, y, task)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, running)


def test_mean_loss_grad_equals_autograd(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory(batchnorm=True)
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    got = mean_loss_grad(fmodel, fmodel.state(), x, y, task)
    expected = _flat_grad(((model(x) - y) ** 2).mean(), [p for _, p in _trainable(model)])
    torch.testing.assert_close(got, expected, **TOL)


# ---- (2) target-Jacobian products ----------------------------------------------------------


def _jdy_autograd(model, task, x, rho, rho_prev):
    """d/dtheta <dl/drho (f(x_i), rho_i), rho_i - rho_prev_i>, per sample, by its definition."""
    model.eval()
    params = [p for _, p in _trainable(model)]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        r = rho[i : i + 1].clone().requires_grad_(True)
        (g_rho,) = torch.autograd.grad(task.sample_loss(out, r)[0], r, create_graph=True)
        directional = (g_rho * (rho[i : i + 1] - rho_prev[i : i + 1])).sum()
        rows.append(_flat_grad(directional, params))
    return torch.stack(rows)


def _soft_targets(n, d, seed, normalised=True):
    gen = torch.Generator().manual_seed(seed)
    if normalised:
        return torch.softmax(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return torch.rand(n, d, generator=gen, dtype=torch.float64) * 1.5


def _path_pair(kind, n, d, seed):
    if kind == "regression":
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(n, d, generator=gen, dtype=torch.float64),
                torch.randn(n, d, generator=gen, dtype=torch.float64))
    if kind == "classification":
        return _soft_targets(n, d, seed), _soft_targets(n, d, seed + 1)
    return _soft_targets(n, d, seed, False), _soft_targets(n, d, seed + 1, False)


def _make_task(mlp_factory, kind, loss=None, linear=True):
    out_dim = 2 if kind == "regression" else 3
    task_kind = "regression" if kind == "regression" else "classification"
    model = mlp_factory(out_dim=out_dim, batchnorm=True, seed=7)
    return Task(model, task_kind, loss=loss, linear_in_target=linear), out_dim


@pytest.mark.parametrize("kind", ["regression", "classification", "classification-unnormalised"])
@pytest.mark.parametrize("make_fn", [loss_and_target_difference, loss_and_target_jvp])
def test_target_jacobian_product_equals_definition(mlp_factory, regression_data, kind, make_fn):
    x, _ = regression_data
    task, d = _make_task(mlp_factory, kind)
    rho, rho_prev = _path_pair(kind, x.shape[0], d, seed=11)
    fmodel = FunctionalModel(task.model)
    chunks = list(per_sample_jacobians(
        fmodel, fmodel.state(), x, make_fn(task), rho, rho_prev, chunk_size=5
    ))
    assert [start for start, _ in chunks] == [0, 5, 10]
    jac = torch.cat([j for _, j in chunks])
    assert jac.shape == (x.shape[0], 2, fmodel.num_params)
    torch.testing.assert_close(jac[:, 0], _loop_grads(task.model, task, x, rho), **TOL)
    torch.testing.assert_close(
        jac[:, 1], _jdy_autograd(task.model, task, x, rho, rho_prev), **TOL
    )


def test_target_jacobian_product_for_nonlinear_loss(mlp_factory, regression_data):
    x, _ = regression_data
    task, d = _make_task(mlp_factory, "regression", loss=_quartic, linear=False)
    rho, rho_prev = _path_pair("regression", x.shape[0], d, seed=5)
    fmodel = FunctionalModel(task.model)
    state = fmodel.state()
    expected = _jdy_autograd(task.model, task, x, rho, rho_prev)

    def second_row(fn):
        return torch.cat([j[:, 1] for _, j in per_sample_jacobians(
            fmodel, state, x, fn, rho, rho_prev, chunk_size=7)])

    torch.testing.assert_close(second_row(loss_and_target_jvp(task)), expected, **TOL)
    torch.testing.assert_close(second_row(path_step_fn(task)), expected, **TOL)
    # The gradient difference is not the product when the loss is not linear in its target.
    assert not torch.allclose(second_row(loss_and_target_difference(task)), expected)


@pytest.mark.parametrize("linear", [True, False])
def test_path_step_fn_follows_linear_in_target(mlp_factory, linear):
    task, _ = _make_task(mlp_factory, "regression", linear=linear)
    fn = path_step_fn(task)
    expected = loss_and_target_difference if linear else loss_and_target_jvp
    assert fn.__qualname__.startswith(expected.__name__)


def test_per_sample_jacobians_scalar_function(mlp_factory, regression_data):
    x, _ = regression_data
    model = mlp_factory(out_dim=2)
    fmodel = FunctionalModel(model)
    jac = torch.cat([j for _, j in per_sample_jacobians(
        fmodel, fmodel.state(), x, lambda out: out.sum(), chunk_size=5)])
    assert jac.shape == (x.shape[0], 1, fmodel.num_params)
    params = [p for _, p in _trainable(model)]
    expected = torch.stack([_flat_grad(model(x[i : i + 1]).sum(), params)
                            for i in range(x.shape[0])])
    torch.testing.assert_close(jac[:, 0], expected, **TOL)


# ---- (3) explicit Hessian ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_full_hessian_equals_autograd(mlp_factory, regression_data, kind):
    x, _ = regression_data
    task, d = _make_task(mlp_factory, kind)
    targets, _ = _path_pair(kind, x.shape[0], d, seed=3)
    model = task.model
    fmodel = FunctionalModel(model)
    got = full_hessian(fmodel, fmodel.state(), x, targets, task, chunk_size=5)

    named = _trainable(model)
    buffers = dict(model.named_buffers())
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def mean_loss(flat):
        params, offset = {}, 0
        for n, p in named:
            params[n] = flat[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        out = functional_call(model, {**params, **buffers}, (x,))
        return task.sample_loss(out, targets).mean()

    model.eval()
    expected = torch.autograd.functional.hessian(mean_loss, flat0)
    assert got.shape == (flat0.numel(), flat0.numel())
    torch.testing.assert_close(got, expected, **TOL)


def test_full_hessian_refuses_large_models(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory()
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    with pytest.raises(InputError, match="hessian"):
        full_hessian(fmodel, fmodel.state(), x, y, task, max_params=fmodel.num_params - 1)


# ---- (4) output-space Hessian factors ------------------------------------------------------


def _output_hessians(task, out, targets):
    return torch.stack([
        torch.autograd.functional.hessian(
            lambda o, t=targets[i]: task.sample_loss(o[None], t[None])[0], out[i]
        )
        for i in range(out.shape[0])
    ])


@pytest.mark.parametrize("kind", ["regression", "classification", "classification-unnormalised"])
def test_output_hessian_factor(mlp_factory, kind):
    task, d = _make_task(mlp_factory, kind)
    gen = torch.Generator().manual_seed(9)
    out = torch.randn(6, d, generator=gen, dtype=torch.float64) * 2
    targets, _ = _path_pair(kind, 6, d, seed=4)
    factor = output_hessian_factor(task, out, targets)
    assert factor.shape == (6, d, d)
    got = factor @ factor.transpose(1, 2)
    torch.testing.assert_close(got, _output_hessians(task, out, targets), **TOL)
    if kind == "regression":
        eye = torch.eye(d, dtype=torch.float64).expand(6, d, d)
        torch.testing.assert_close(got, 2.0 / d * eye, **TOL)
    else:
        p = torch.softmax(out, dim=1)
        mass = targets.sum(1)[:, None, None]
        closed = mass * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        torch.testing.assert_close(got, closed, **TOL)


def test_output_hessian_factor_clips_negative_curvature(mlp_factory):
    def saddle(out, target):
        return (out[..., 0] - target[..., 0]) ** 2 - 3 * (out[..., 1] - target[..., 1]) ** 2

    task = Task(mlp_factory(out_dim=2), "regression", loss=saddle, linear_in_target=False)
    out = torch.randn(4, 2, dtype=torch.float64)
    factor = output_hessian_factor(task, out, torch.zeros(4, 2, dtype=torch.float64))
    expected = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)).expand(4, 2, 2)
    torch.testing.assert_close(factor @ factor.transpose(1, 2), expected, **TOL)


@pytest.mark.parametrize("kind", ["regression", "classification", "quartic"])
def test_target_jacobian_products_of_several_paths_share_one_forward(mlp_factory,
                                                                      regression_data, kind):
    """Row 0 is the loss gradient, row 1 + b the product J dy_b of path b, each equal to the
    autograd definition (also for a loss that is not linear in its target)."""
    x, _ = regression_data
    if kind == "quartic":
        task, d = _make_task(mlp_factory, "regression", loss=_quartic, linear=False)
    else:
        task, d = _make_task(mlp_factory, kind)
    pair_kind = "regression" if kind == "quartic" else kind
    rho, _ = _path_pair(pair_kind, x.shape[0], d, seed=3)
    prevs = torch.stack([_path_pair(pair_kind, x.shape[0], d, seed=20 + b)[1] for b in range(3)])
    fmodel = FunctionalModel(task.model)
    jac = torch.cat([j for _, j in per_sample_jacobians(
        fmodel, fmodel.state(), x, loss_and_target_jvps(task), rho, prevs.transpose(0, 1),
        chunk_size=5)])
    assert jac.shape == (x.shape[0], 4, fmodel.num_params)
    torch.testing.assert_close(jac[:, 0], _loop_grads(task.model, task, x, rho), **TOL)
    for b in range(3):
        torch.testing.assert_close(
            jac[:, 1 + b], _jdy_autograd(task.model, task, x, rho, prevs[b]), **TOL)


def test_output_hessian_factor_of_a_saturated_softmax_is_exact_in_float32():
    # p_y = 1 - 2e-9: float32 cannot hold p_y - p_y^2, so the factor is taken in float64
    from iif.engine.grads import output_hessian_factor
    from iif.task.task import Recipe, Task

    task = Task(torch.nn.Linear(2, 3), "classification", Recipe())
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    factor = output_hessian_factor(task, logits, target)
    assert factor.dtype == torch.float32
    p = torch.softmax(logits.double(), -1)[0]
    exact = torch.diag(p) - torch.outer(p, p)
    got = (factor[0].double() @ factor[0].double().T)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-14)
