"""TRAK's model-output plug-in (iif.methods.trak.outputs): a user's output function end to end
against the TRAK formula with exact features computed here, and the defaults and their checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from iif import ProjectionSettings, Recipe, Task
from iif.errors import InputError
from iif.methods.trak.outputs import Margin, ModelOutput, Output, default_output
from iif.methods.trak.trak import TRAK

DAMPING = 0.05


class TrueLogit(ModelOutput):
    """A plain logit of the true class, weighted by 1 - p_y."""

    name = "true-logit"

    def value(self, outputs, targets):
        return (outputs * targets).sum(-1)

    def weight(self, outputs, targets):
        return 1 - (torch.softmax(outputs, -1) * targets).sum(-1)


def _model(seed: int = 0, out: int = 3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model.eval()


def _data(n: int, seed: int, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.arange(n) % classes


def _explicit(model: nn.Module, train, test) -> tuple[np.ndarray, np.ndarray]:
    """The TRAK formula with exact features: per-sample gradients of the true logit by
    torch.func, K = (Phi^T Phi + lambda I)^{-1}, w = 1 - p_y; scores and self-influence."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logit(p, x, onehot):
        return (functional_call(model, p, (x[None],))[0] * onehot).sum()

    def features(x, y):
        onehot = torch.eye(3, dtype=torch.float64)[y]
        g = vmap(grad(logit), in_dims=(None, 0, 0))(params, x, onehot)
        return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1).numpy()

    def weights(x, y):
        with torch.no_grad():
            p = torch.softmax(model(x), -1)
        return (1 - p[torch.arange(len(y)), y]).numpy()

    phi, phi_test = features(*train), features(*test)
    kernel = np.linalg.inv(phi.T @ phi + DAMPING * np.eye(phi.shape[1]))
    w = weights(*train)
    scores = -(phi_test @ kernel @ phi.T) * w[None, :]
    self_influence = -np.einsum("ij,jk,ik->i", phi, kernel, phi) * w
    return scores, self_influence


def _trak(task, train, **kw) -> TRAK:
    return TRAK(task, train, projection=ProjectionSettings(dim=None), damping=DAMPING,
                chunk_size=4, progress=False, **kw)


def test_user_output_matches_the_trak_formula_with_exact_features():
    model = _model()
    task = Task(model, "classification", Recipe(lr=0.1, epochs=1, batch_size=4))
    train, test = _data(10, 1), _data(4, 2)
    method = _trak(task, train, model_output=TrueLogit())
    result = method.attribute(test)
    want, want_self = _explicit(model, train, test)
    np.testing.assert_allclose(result.scores, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(method.self_influence(), want_self, rtol=1e-9, atol=1e-12)
    assert result.settings["output_function"] == "true-logit"
    # not the margin: the default gives other scores
    default = _trak(task, train).attribute(test).scores
    assert not np.allclose(default, result.scores, rtol=1e-3)


def test_explicit_defaults_equal_the_chosen_ones():
    task = Task(_model(), "classification", Recipe(lr=0.1, epochs=1, batch_size=4))
    train, test = _data(10, 1), _data(4, 2)
    a = _trak(task, train).attribute(test)
    b = _trak(task, train, model_output=Margin()).attribute(test)
    assert np.array_equal(a.scores, b.scores) and b.settings["output_function"] == "margin"

    reg = Task(_model(out=1), "regression", Recipe(lr=0.1, epochs=1, batch_size=4))
    gen = torch.Generator().manual_seed(3)
    data = (train[0], torch.randn(10, 1, generator=gen, dtype=torch.float64))
    tdata = (test[0], torch.randn(4, 1, generator=gen, dtype=torch.float64))
    c = _trak(reg, data).attribute(tdata)
    d = _trak(reg, data, model_output=Output(reg)).attribute(tdata)
    assert np.array_equal(c.scores, d.scores) and c.settings["output_function"] == "output"
    assert isinstance(default_output(reg, 1), Output)


def test_margin_weight_is_one_minus_p_and_output_weight_the_loss_slope():
    outputs = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    onehot = torch.eye(3, dtype=torch.float64)[[0, 2]]
    p = torch.softmax(outputs, -1)[[0, 1], [0, 2]]
    np.testing.assert_allclose(Margin().value(outputs, onehot), torch.log(p / (1 - p)))
    np.testing.assert_allclose(Margin().weight(outputs, onehot), 1 - p)
    reg = Task(_model(out=1), "regression", Recipe(lr=0.1, epochs=1, batch_size=4))
    f = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [0.0]], dtype=torch.float64)
    np.testing.assert_allclose(Output(reg).weight(f, y), (2 * (y - f))[:, 0])
    np.testing.assert_allclose(Output(reg).curvature(f, y), np.sqrt([2.0, 2.0]))


def test_custom_loss_needs_an_output_of_its_own():
    def loss(out, target):
        return -(target * torch.log_softmax(out, -1)).sum(-1) ** 2

    task = Task(_model(), "classification", Recipe(lr=0.1, epochs=1, batch_size=4), loss=loss)
    train = _data(10, 1)
    with pytest.raises(InputError, match="custom loss"):
        _trak(task, train)
    scores = _trak(task, train, model_output=TrueLogit()).attribute(_data(3, 2)).scores
    assert scores.shape == (3, 10) and np.isfinite(scores).all()


def test_bad_outputs_are_refused():
    task = Task(_model(), "classification", Recipe(lr=0.1, epochs=1, batch_size=4))
    train = _data(10, 1)
    with pytest.raises(InputError, match="ModelOutput"):
        _trak(task, train, model_output=lambda o, t: o[..., 0])

    class NoWeight(ModelOutput):
        def value(self, outputs, targets):
            return outputs[..., 0]

    with pytest.raises(InputError, match="weight"):
        _trak(task, train, model_output=NoWeight())

    class Infinite(TrueLogit):
        def weight(self, outputs, targets):
            return torch.full(outputs.shape[:1], float("inf"), dtype=outputs.dtype)

    with pytest.raises(InputError, match="not finite"):
        _trak(task, train, model_output=Infinite()).attribute(_data(3, 2))
