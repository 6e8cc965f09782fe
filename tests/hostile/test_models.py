"""Models as users have them: BatchNorm (1d, 2d) in eval mode, dropout, LayerNorm and an
embedding over integer tokens, through IIF, IF, TracIn and TRAK.

The package's rule (``iif.methods.base._warn_train_mode``): gradients, features and losses are
taken in eval mode (dropout off, BatchNorm on its running statistics); training epochs
(unlearning, path models, checkpoints) keep the recipe's train mode. Every oracle here is an
independent computation with plain autograd on the module in eval mode, never the engine.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import iif
from iif import (
    BaselineSettings,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    PathSettings,
    Recipe,
    Task,
)
from iif.engine.engine import why_training_cannot_stack
from iif.engine.factored import supports_factored
from iif.engine.functional import FunctionalModel
from iif.engine.stacked import StackedState, fit_stacked
from iif.engine.training import fit
from iif.errors import InputError
from iif.methods.integrated.baseline import complement_loss
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif.methods.tracin.tracin import TracIn
from iif.methods.trak.trak import TRAK
from iif.views.explain import explain

N_TRAIN, N_TEST, CLASSES = 12, 3, 3
MODELS = ["batchnorm1d", "batchnorm2d", "dropout", "layernorm", "embedding"]


pytestmark = pytest.mark.usefixtures("single_thread")


# ---- models and data -----------------------------------------------------------------------------
class TokenModel(nn.Module):
    """Mean of token embeddings -> tanh -> Linear: inputs are integer token ids (n, length)."""

    def __init__(self, vocab: int = 7, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(1)))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "batchnorm1d":
        model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    elif name == "batchnorm1d_plain":  # no affine parameters: every parameter in a Linear
        model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(),
                              nn.Linear(6, 3))
    elif name == "batchnorm2d":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(8, 3))
    elif name == "dropout":
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    elif name == "layernorm_plain":
        model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6, elementwise_affine=False),
                              nn.Tanh(), nn.Linear(6, 3))
    elif name == "embedding":
        model = TokenModel()
    else:
        raise ValueError(name)
    return model.double()


def make_data(name: str, n: int, rng: np.random.Generator):
    if name == "embedding":
        x = rng.integers(0, 7, size=(n, 4))
        y = x[:, 0] % CLASSES
    elif name == "batchnorm2d":
        x = rng.normal(size=(n, 1, 4, 4))
        y = np.argmax(x[:, 0, 1, 1:], axis=1)
    else:
        x = rng.normal(size=(n, 3))
        y = np.argmax(x, axis=1)
    return x, y


class Problem:
    def __init__(self, name: str, n_train: int = N_TRAIN, batch_size: int = 4):
        rng = np.random.default_rng(sum(map(ord, name)))
        self.name = name
        self.train = make_data(name, n_train, rng)
        self.test = make_data(name, N_TEST, rng)
        self.model = build(name)
        self.task = Task(self.model, "classification",
                         Recipe(lr=0.2, epochs=3, batch_size=batch_size))
        # trains the model in place (train mode, as the recipe), one checkpoint per epoch
        self.checkpoints = train_with_checkpoints(self.task, self.train, seed=0)
        self.model.eval()  # the user's model, as handed over: eval mode


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return {}


def problem(problems: dict[str, Problem], name: str) -> Problem:
    if name not in problems:
        problems[name] = Problem(name)
    return problems[name]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- independent references (plain autograd, module in eval mode) --------------------------------
def as_input(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if not x.is_floating_point() else x.double()


def flat_forward(model: nn.Module, buffers: dict[str, torch.Tensor] | None = None):
    """theta as one vector and ``forward(theta, x)`` of the module in eval mode, with the
    given buffers (default: the module's own)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names]).clone()
    buffers = dict(model.named_buffers()) if buffers is None else buffers

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        model.eval()
        return functional_call(model, {**params, **buffers}, (x,))

    return theta, forward


def sample_grads(forward, theta, x, y) -> torch.Tensor:
    """Cross-entropy gradients (n, M), one autograd call per sample."""
    x, y = as_input(x), torch.as_tensor(y)
    rows = []
    for i in range(len(y)):
        th = theta.clone().requires_grad_(True)
        value = nn.functional.cross_entropy(forward(th, x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(value, th)[0])
    return torch.stack(rows)


def explicit_influence(curv, damping, g_test, g_train) -> np.ndarray:
    eye = torch.eye(curv.shape[0], dtype=torch.float64)
    sol = torch.linalg.solve(curv + damping * eye, g_test.T)
    return (-(g_train @ sol).T / g_train.shape[0]).numpy()


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- every model, every method: runs, finite, right shape, and agrees with an oracle -------------
@pytest.mark.parametrize("name", MODELS)
def test_iif_default_settings(problems, name):
    p = problem(problems, name)
    before = snapshot(p.model)
    result = IntegratedInfluence(p.task, p.train, progress=False).attribute(p.test)
    assert result.scores.shape == (N_TEST, N_TRAIN)
    assert np.isfinite(result.scores).all()
    comp = result.completeness
    np.testing.assert_allclose(comp["sum"], result.scores.sum(1), rtol=1e-10, atol=1e-14)
    # the unlearning baseline raised every test loss (delta = L(theta*) - L(theta') < 0)
    assert result.info["fallbacks"] == 0
    assert np.all(comp["delta"] < 0), comp["delta"]
    # the user's module is neither retrained nor left in train mode (BatchNorm statistics of
    # the training epochs live in the engine's copies)
    assert not p.model.training
    after = snapshot(p.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    if name != "dropout":  # dropout draws differ between stacked and separate runs
        one_by_one = IntegratedInfluence(p.task, p.train, progress=False,
                                         test_batch=1).attribute(p.test)
        np.testing.assert_allclose(result.scores, one_by_one.scores, rtol=1e-9,
                                   atol=1e-12 * np.abs(result.scores).max())
        np.testing.assert_allclose(comp["delta"], one_by_one.completeness["delta"],
                                   rtol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_if_and_iif_k1_equal_explicit_fisher_influence(problems, name):
    """IF (exact Fisher) equals the explicit-Fisher influence of the eval-mode model, and so
    does IIF with K = 1, dense targets and the baseline f(x; theta*) (Lemma 2.5)."""
    p = problem(problems, name)
    theta, forward = flat_forward(p.model)
    g_train = sample_grads(forward, theta, *p.train)
    g_test = sample_grads(forward, theta, *p.test)
    fisher = g_train.T @ g_train / N_TRAIN
    damping = 0.1 * float(torch.linalg.eigvalsh(fisher).clamp_min(0).sum()) / N_TRAIN
    want = explicit_influence(fisher, damping, g_test, g_train)
    assert np.abs(want).max() > 1e-6

    curvature = CurvatureSettings(kind="fisher", damping=damping)
    scores_if = InfluenceFunction(p.task, p.train, curvature=curvature).attribute(p.test).scores
    assert scores_if.shape == (N_TEST, N_TRAIN) and np.isfinite(scores_if).all()
    assert max_rel(scores_if, want) < 1e-7

    with torch.no_grad():
        probs = torch.softmax(p.model(as_input(p.train[0])), -1).numpy()
    iif_k1 = IntegratedInfluence(p.task, p.train, progress=False, curvature=curvature,
                                 path=PathSettings(steps=1, sparse=False))
    result = iif_k1.attribute(p.test, baseline_targets=probs)
    assert result.info["damping"] == [damping]
    assert max_rel(result.scores, want) < 1e-7


def _double_backward_hessian(loss, theta: torch.Tensor) -> torch.Tensor:
    """Hessian rows by double backward: torch.func.hessian (forward over reverse) is wrong
    through layer_norm on torch 2.13 (tests/engine/test_torch_defects.py)."""
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0]
                        for i in range(theta.numel())])


@pytest.mark.parametrize("name", MODELS)
def test_if_hessian_equals_explicit_hessian_influence(problems, name):
    p = problem(problems, name)
    theta, forward = flat_forward(p.model)
    x, y = as_input(p.train[0]), torch.as_tensor(p.train[1])
    h = _double_backward_hessian(
        lambda th: nn.functional.cross_entropy(forward(th, x), y), theta)
    h = 0.5 * (h + h.T)
    eig = torch.linalg.eigvalsh(h)
    damping = 1e-2 * float(eig.abs().max()) + 2.0 * max(0.0, -float(eig.min()))
    want = explicit_influence(h, damping, sample_grads(forward, theta, *p.test),
                              sample_grads(forward, theta, *p.train))
    result = InfluenceFunction(p.task, p.train, curvature=CurvatureSettings(
        kind="hessian", damping=damping)).attribute(p.test)
    assert result.info["solver"]["retries"] == 0
    assert max_rel(result.scores, want) < 1e-7


@pytest.mark.parametrize("name", MODELS)
def test_tracin_equals_sum_over_checkpoints(problems, name):
    """``-sum_c lr_c g_test(theta_c)^T g_i(theta_c)``, each checkpoint with its own BatchNorm
    running statistics, in eval mode."""
    p = problem(problems, name)
    assert len(p.checkpoints) == 3
    want = 0.0
    for c in p.checkpoints:
        model = copy.deepcopy(p.model)
        model.load_state_dict({**c.state.params, **c.state.buffers})
        theta, forward = flat_forward(model)
        want = want - c.lr * (sample_grads(forward, theta, *p.test)
                              @ sample_grads(forward, theta, *p.train).T).numpy()
    result = TracIn(p.task, p.train, checkpoints=p.checkpoints).attribute(p.test)
    assert result.scores.shape == (N_TEST, N_TRAIN) and np.isfinite(result.scores).all()
    assert max_rel(result.scores, want) < 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_trak_equals_direct_formula(problems, name):
    """Unprojected TRAK: ``-phi_s^T (Phi^T Phi + lambda I)^{-1} phi_i (1 - p_i)`` with phi the
    gradient of the margin ``log p_y - log(1 - p_y)``."""
    p = problem(problems, name)
    theta, forward = flat_forward(p.model)

    def terms(x, y):
        x, grads, weights = as_input(x), [], []
        for i in range(len(y)):
            th = theta.clone().requires_grad_(True)
            out = forward(th, x[i : i + 1])[0]
            others = torch.ones(CLASSES, dtype=torch.bool)
            others[int(y[i])] = False
            value = out[int(y[i])] - torch.logsumexp(out[others], 0)
            grads.append(torch.autograd.grad(value, th)[0].numpy())
            weights.append(1.0 - float(torch.softmax(out.detach(), 0)[int(y[i])]))
        return np.array(grads), np.array(weights)

    phi, w = terms(*p.train)
    phi_t, _ = terms(*p.test)
    gram = phi.T @ phi + 0.05 * np.eye(phi.shape[1])
    want = -(phi_t @ np.linalg.solve(gram, phi.T)) * w[None, :]
    result = TRAK(p.task, p.train, projection=iif.ProjectionSettings(dim=None),
                  damping=0.05).attribute(p.test)
    assert result.scores.shape == (N_TEST, N_TRAIN) and np.isfinite(result.scores).all()
    assert max_rel(result.scores, want) < 1e-8


@pytest.mark.parametrize("name", MODELS)
def test_self_influence_of_every_method_is_finite(problems, name):
    p = problem(problems, name)
    methods = [IntegratedInfluence(p.task, p.train, progress=False),
               InfluenceFunction(p.task, p.train), TRAK(p.task, p.train),
               TracIn(p.task, p.train, checkpoints=p.checkpoints)]
    for method in methods:
        values = method.self_influence()
        assert values.shape == (N_TRAIN,) and np.isfinite(values).all(), method.method


# ---- eval-mode semantics -------------------------------------------------------------------------
def test_dropout_is_off_for_gradients_and_on_in_training_epochs(problems):
    p = problem(problems, "dropout")
    # the same network without its dropout layer: identical per-sample quantities
    plain = copy.deepcopy(p.model)
    plain[2] = nn.Identity()
    plain_task = Task(plain, "classification", p.task.recipe)
    for make in (lambda t, s: InfluenceFunction(t, p.train, seed=s),
                 lambda t, s: TRAK(t, p.train, seed=s),
                 lambda t, s: TracIn(t, p.train, checkpoints=p.checkpoints, seed=s)):
        noisy = make(p.task, 0).attribute(p.test).scores
        again = make(p.task, 1).attribute(p.test).scores  # seeds draw no dropout masks
        clean = make(plain_task, 0).attribute(p.test).scores
        np.testing.assert_array_equal(noisy, again)
        np.testing.assert_allclose(noisy, clean, rtol=1e-12, atol=1e-15)
    # IIF's unlearning and path epochs are training: dropout is active there, seeded by
    # ``seed`` (the same seed gives the same scores; the no-dropout network other ones)
    first = IntegratedInfluence(p.task, p.train, progress=False, seed=3).attribute(p.test)
    second = IntegratedInfluence(p.task, p.train, progress=False, seed=3).attribute(p.test)
    np.testing.assert_array_equal(first.scores, second.scores)
    clean = IntegratedInfluence(plain_task, p.train, progress=False, seed=3).attribute(p.test)
    assert not np.allclose(first.scores, clean.scores)


@pytest.mark.parametrize("name", ["batchnorm1d", "batchnorm2d"])
@pytest.mark.parametrize("test_batch", [1, 3])
def test_unlearning_test_term_uses_running_statistics(problems, name, test_batch):
    """One full-batch unlearning step by hand: the training term in train mode (batch
    statistics, which also move the running statistics), the test term ``-log(1 - p_y)`` of
    the single test sample in eval mode (running statistics), then delta in eval mode."""
    p = problem(problems, name)
    lr, lam = 0.05, 2.0
    x, y = as_input(p.train[0]), torch.as_tensor(p.train[1])
    xt, yt = as_input(p.test[0]), torch.as_tensor(p.test[1])
    want = []
    for s in range(N_TEST):
        ref = copy.deepcopy(p.model).train()
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        train_term = nn.functional.cross_entropy(ref(x), y)  # updates running stats
        ref.eval()
        onehot = nn.functional.one_hot(yt[s : s + 1], CLASSES).double()
        test_term = complement_loss(ref(xt[s : s + 1]), onehot).mean() / lam
        (train_term + test_term).backward()
        opt.step()
        with torch.no_grad():
            want.append(float(nn.functional.cross_entropy(p.model(xt[s : s + 1]), yt[s : s + 1])
                              - nn.functional.cross_entropy(ref(xt[s : s + 1]), yt[s : s + 1])))
    method = IntegratedInfluence(
        p.task, p.train, progress=False, test_batch=test_batch,
        baseline=BaselineSettings(epochs=1, lr=lr, lam=lam, batch_size=N_TRAIN),
        path=PathSettings(steps=1))
    result = method.attribute(p.test)
    assert result.info["fallbacks"] == 0
    np.testing.assert_allclose(result.completeness["delta"], want, rtol=1e-9)
    assert np.all(np.array(want) < 0)


def test_lone_sample_of_a_minibatch_uses_running_statistics():
    """N % batch_size == 1 leaves a minibatch of one sample: BatchNorm normalises it with its
    running statistics (PyTorch refuses batch statistics of one value) and leaves them."""
    model = build("batchnorm1d").eval()
    task = Task(model, "classification", Recipe(lr=0.1, epochs=1, batch_size=4))
    rng = np.random.default_rng(0)
    x, y = make_data("batchnorm1d", 1, rng)
    data = task.validate((x, y))
    fmodel = FunctionalModel(model)
    start = fmodel.state()
    res = fit(task, fmodel, start, data.x, data.targets, epochs=1)
    assert res.finite
    theta, forward = flat_forward(model)
    g = sample_grads(forward, theta, x, y)[0]
    got = res.state.flat()
    torch.testing.assert_close(got, theta - 0.1 * g, rtol=1e-12, atol=1e-14)
    for k, v in start.buffers.items():
        assert torch.equal(res.state.buffers[k], v), k  # unchanged by the lone sample
    stacked = fit_stacked(task, fmodel, StackedState.repeat(start, 2), data.x, data.targets,
                          epochs=1)
    for r in stacked:
        torch.testing.assert_close(r.state.flat(), got, rtol=1e-12, atol=1e-14)
    # larger minibatches keep batch statistics and move the running ones
    x13, y13 = make_data("batchnorm1d", 13, rng)
    d13 = task.validate((x13, y13))
    res = fit(task, fmodel, start, d13.x, d13.targets, epochs=1)
    assert res.finite
    assert int(res.state.buffers["1.num_batches_tracked"]) == 3  # 4 + 4 + 4, not the lone one
    assert not torch.equal(res.state.buffers["1.running_mean"], start.buffers["1.running_mean"])
    # and everything downstream runs on 13 samples (the last path minibatch holds one)
    iif.train(task, (x13, y13), epochs=2)
    model.eval()
    test = make_data("batchnorm1d", N_TEST, rng)
    result = IntegratedInfluence(task, (x13, y13), progress=False).attribute(test)
    assert np.isfinite(result.scores).all() and result.scores.shape == (N_TEST, 13)


def test_cumulative_batchnorm_is_not_stacked():
    """BatchNorm with momentum=None cannot train under vmap: IIF runs its test samples one by
    one instead of failing."""
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    rng = np.random.default_rng(1)
    train, test = make_data("batchnorm1d", N_TRAIN, rng), make_data("batchnorm1d", N_TEST, rng)
    task = Task(model, "classification", Recipe(lr=0.2, epochs=2, batch_size=4))
    iif.train(task, train)
    model.eval()
    assert "momentum=None" in why_training_cannot_stack(task)
    result = IntegratedInfluence(task, train, progress=False).attribute(test)
    assert np.isfinite(result.scores).all() and result.scores.shape == (N_TEST, N_TRAIN)


def test_validation_keeps_each_submodules_mode(problems):
    """A train-mode model with a frozen (eval-mode) BatchNorm keeps exactly those flags after
    the task validates data (which runs the model once in eval mode)."""
    model = build("batchnorm1d").train()
    model[1].eval()
    task = Task(model, "classification")
    x, y = problem(problems, "batchnorm1d").train
    task.validate((x, y))
    InfluenceFunction(task, (x, y)).attribute((x[:2], y[:2]))
    assert [m.training for m in model] == [True, False, True, True]


def test_explain_batchnorm1d_model(problems, tmp_path):
    p = problem(problems, "batchnorm1d")
    method = IntegratedInfluence(p.task, p.train, progress=False)
    text, record = explain(method, p.test, 1, tmp_path, k=3)
    assert "Test sample 1" in text and "proponents" in text
    saved = json.loads((tmp_path / "explain_1.json").read_text())
    entries = [e for rows in saved["rows"].values() for e in rows]
    assert len(entries) == 6 and all(np.isfinite(e["score"]) for e in entries)
    assert record["predicted"] == int(p.model(as_input(p.test[0][1:2])).argmax())


# ---- integer inputs ------------------------------------------------------------------------------
def test_integer_token_inputs_stay_integers(problems):
    p = problem(problems, "embedding")
    data = p.task.validate(p.train)
    assert data.x.dtype == torch.int64 and torch.equal(data.x, torch.as_tensor(p.train[0]))
    assert p.task.validate((p.train[0].astype(np.int32), p.train[1])).x.dtype == torch.int64
    regression = Task(TokenModel().double(), "regression")
    assert regression.validate((p.train[0], np.zeros((N_TRAIN, CLASSES)))).x.dtype == \
        torch.int64
    # a model that cannot take integers still gets a clear error at the boundary
    linear = Task(nn.Linear(4, 3).double(), "classification")
    with pytest.raises(InputError, match="floating point"):
        linear.validate(p.train)
    with pytest.raises(InputError, match="floating point"):
        p.task.validate((p.train[0] > 3, p.train[1]))  # booleans are not token ids


def test_frozen_embedding_takes_the_kronecker_fast_paths(problems):
    """A frozen embedding under a Linear head: every trainable parameter is a Linear weight, so
    the Kronecker projection runs from layer factors, for B stacked test samples too, whose
    probes must have the parameters' dtype, not the integer inputs'."""
    p = problem(problems, "embedding")
    model = copy.deepcopy(p.model)
    model.embed.weight.requires_grad_(False)
    task = Task(model, "classification", p.task.recipe)
    projection = iif.ProjectionSettings(dim=6, structure="kronecker")
    stacked = IntegratedInfluence(task, p.train, progress=False, projection=projection)
    assert stacked._stackable(N_TEST)
    got = stacked.attribute(p.test).scores
    want = IntegratedInfluence(task, p.train, progress=False, projection=projection,
                               test_batch=1).attribute(p.test).scores
    assert np.isfinite(got).all() and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


# ---- factored solves: exact for the model or declined --------------------------------------------
@pytest.mark.parametrize("name, covered", [
    ("batchnorm1d", False), ("batchnorm2d", False), ("layernorm", False), ("embedding", False),
    ("dropout", True), ("batchnorm1d_plain", True), ("layernorm_plain", True),
])
def test_factored_solves_are_exact_or_declined(problems, name, covered, monkeypatch):
    """Normalisation and embedding parameters are not Linear weights: the factored solve
    declines them. Parameter-free normalisation between Linear layers is per sample in eval
    mode, so the layer factors are exact there and the factored IF equals the per-sample
    gradient solve."""
    p = problem(problems, name)
    fmodel = FunctionalModel(p.model)
    data = p.task.validate(p.train)
    assert supports_factored(fmodel, fmodel.state(), data.x) is covered
    curvature = CurvatureSettings(kind="fisher", damping=1e-3)
    method = InfluenceFunction(p.task, p.train, curvature=curvature)
    assert method._use_factored() is covered
    factored = method.attribute(p.test).scores
    monkeypatch.setattr(InfluenceFunction, "_use_factored", lambda self: False)
    dense = InfluenceFunction(p.task, p.train, curvature=curvature).attribute(p.test).scores
    np.testing.assert_allclose(factored, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())
    if covered:  # IIF's factored path too
        monkeypatch.undo()
        kwargs = {"progress": False, "curvature": curvature}
        a = IntegratedInfluence(p.task, p.train, **kwargs)
        assert a._use_factored()
        got = a.attribute(p.test).scores
        monkeypatch.setattr(IntegratedInfluence, "_use_factored", lambda self: False)
        want = IntegratedInfluence(p.task, p.train, **kwargs).attribute(p.test).scores
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
