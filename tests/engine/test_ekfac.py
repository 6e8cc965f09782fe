"""EK-FAC and K-FAC factors and solves against per-sample autograd on tiny float64 models:
the factors against explicit sums, the eigenvalues and the solve against dense matrices, and
influence-function scores against an explicit EK-FAC matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iif import CurvatureSettings, ProjectionSettings, Recipe, Task
from iif.engine.ekfac import fit_kronecker
from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated.integrated import IntegratedInfluence

from .test_hooks import _one_thread, _seeded  # noqa: F401 (_one_thread: autouse here too)

EXACT = {"rtol": 1e-9, "atol": 1e-12}
N, CLASSES = 9, 3


def _mlp() -> nn.Module:
    return _seeded(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)))


def _convnet(pooled: bool) -> nn.Module:
    head = ([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, CLASSES)] if pooled
            else [nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES)])
    return _seeded(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), *head), seed=1)


def _soft_targets(n: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, CLASSES, generator=gen, dtype=torch.float64), -1)


def _inputs(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# ---- the reference: a per-sample loop with torch.autograd -----------------------------------
def _layer_terms(layer: nn.Module, inp: torch.Tensor, dy: torch.Tensor):
    """a (T, cols) with the bias's 1, d (T, out) of one sample's call, read directly."""
    if isinstance(layer, nn.Conv2d):
        a = F.unfold(inp, layer.kernel_size, padding=layer.padding)[0].T
        d = dy[0].reshape(dy.shape[1], -1).T
    else:
        a, d = inp[0].reshape(-1, inp.shape[-1]), dy[0].reshape(-1, dy.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a, d


def _reference(model, layers, x, targets, task):
    """Per sample: each layer's (a, d) and the flat loss gradient g (M,) in names order."""
    names = FunctionalModel(model).names
    params = [model.get_parameter(n) for n in names]
    samples = []
    seen = {}

    def record(m, a, o):
        seen[m] = (a[0], o)

    for i in range(x.shape[0]):
        handles = [m.register_forward_hook(record) for m in layers]
        loss = task.sample_loss(model(x[i : i + 1]), targets[i : i + 1])[0]
        for h in handles:
            h.remove()
        outs = [seen[m][1] for m in layers]
        dys = torch.autograd.grad(loss, outs, retain_graph=True)
        g = torch.autograd.grad(loss, params)
        terms = [_layer_terms(m, seen[m][0].detach(), dy)
                 for m, dy in zip(layers, dys, strict=True)]
        samples.append((terms, torch.cat([t.reshape(-1) for t in g])))
    return samples


def _block_index(model, layer: nn.Module) -> torch.Tensor:
    """Flat coordinates (out * cols,) of the layer's gradient matrix (out, cols), row-major,
    weight then bias column (a Conv1D weight is stored (in, out))."""
    fm = FunctionalModel(model)
    offsets = {n: sum(fm.sizes[:k]) for k, n in enumerate(fm.names)}
    names = {id(p): n for n, p in model.named_parameters()}
    w = layer.weight
    start = offsets[names[id(w)]]
    if type(layer).__name__ == "Conv1D":
        idx = start + torch.arange(w.numel()).reshape(w.shape[0], w.shape[1]).T
    else:
        idx = start + torch.arange(w.numel()).reshape(w.shape[0], -1)
    if layer.bias is not None:
        idx = torch.cat([idx, offsets[names[id(layer.bias)]] + torch.arange(idx.shape[0])[:, None]],
                        1)
    return idx.reshape(-1)


def _grad_matrix(terms) -> torch.Tensor:
    a, d = terms
    return (d.T @ a).reshape(-1)  # vec(G) row-major, G = sum_t d_t a_t^T


def _exact_block(samples, k: int) -> torch.Tensor:
    vecs = torch.stack([_grad_matrix(terms[k]) for terms, _ in samples])
    return vecs.T @ vecs / len(samples)


def _explicit_sums(samples, k: int):
    """Both conventions' (A, S) and the exact trace of layer k's Fisher block."""
    n = len(samples)
    pairs = [terms[k] for terms, _ in samples]
    a_sum = sum(torch.outer(a.mean(0), a.mean(0)) for a, _ in pairs) / n
    s_sum = sum(torch.outer(d.sum(0), d.sum(0)) for _, d in pairs) / n
    a_exp = sum(a.T @ a for a, _ in pairs) / sum(a.shape[0] for a, _ in pairs)
    s_exp = sum(d.T @ d for _, d in pairs) / n
    trace = sum(float((d.T @ a).pow(2).sum()) for a, d in pairs) / n
    return {"sum": (a_sum, s_sum), "expand": (a_exp, s_exp)}, trace


def _fit(model, x, targets, kind="ekfac", chunk_size=4):
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    factors = fit_kronecker(fmodel, fmodel.state(), x, targets, task, kind, chunk_size)
    return task, fmodel, factors


def _dense_inverse_check(solver, factors, model, layers, dampings):
    """The solve equals the explicit inverse of blockdiag(Q diag(lambda + delta) Q^T, diag)."""
    m = factors.num_params
    c = torch.zeros(m, m, dtype=torch.float64)
    for layer, block in zip(layers, factors.blocks, strict=True):
        q = torch.kron(block.q_s, block.q_a)
        lam = block.values(factors.kind).reshape(-1) + dampings[block.layout.path]
        idx = _block_index(model, layer)
        c[idx[:, None], idx[None, :]] = q @ torch.diag(lam) @ q.T
    d = factors.diag_index
    c[d, d] = factors.diag + solver.diagonal_damping
    v = _inputs((m, 3), seed=9)
    torch.testing.assert_close(solver.solve(v), torch.linalg.solve(c, v), **EXACT)
    return c


# ---- factors -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "conv-flatten", "conv-pooled"])
def test_covariances_and_ekfac_eigenvalues_equal_explicit_sums(name):
    model = {"mlp": _mlp, "conv-flatten": lambda: _convnet(False),
             "conv-pooled": lambda: _convnet(True)}[name]()
    x = _inputs((N, 4)) if name == "mlp" else _inputs((N, 2, 4, 4))
    targets = _soft_targets(N)
    task, _, factors = _fit(model, x, targets)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    samples = _reference(model, layers, x, targets, task)
    assert [b.layout.path for b in factors.blocks] == [n for n, m in model.named_children()
                                                        if m in layers]
    assert factors.diag_index.numel() == 0
    for k, block in enumerate(factors.blocks):
        candidates, trace = _explicit_sums(samples, k)
        if samples[0][0][k][0].shape[0] == 1:  # one position: the conventions coincide
            assert block.positions == "one"
            for one, other in zip(candidates["sum"], candidates["expand"], strict=True):
                torch.testing.assert_close(one, other, **EXACT)
        else:
            # the convention whose Kronecker trace is closest in ratio to the exact one
            gaps = {c: abs(math.log(float(torch.trace(a) * torch.trace(s)) / trace))
                    for c, (a, s) in candidates.items()}
            assert block.positions == min(gaps, key=gaps.get)
        a, s = candidates["sum" if block.positions == "one" else block.positions]
        torch.testing.assert_close(block.a, a, **EXACT)
        torch.testing.assert_close(block.s, s, **EXACT)
        assert block.trace == pytest.approx(trace, rel=1e-10)
        # EK-FAC: the diagonal of the exact Fisher block in the Kronecker eigenbasis
        q = torch.kron(block.q_s, block.q_a)
        f_l = _exact_block(samples, k)
        torch.testing.assert_close(block.eigen.reshape(-1), torch.diagonal(q.T @ f_l @ q),
                                   **EXACT)


def test_the_conventions_follow_the_head():
    """A convolution before a flatten-and-Linear head expands its positions, one before
    global pooling takes per-sample sums (the trace rule on these models)."""
    x, targets = _inputs((N, 2, 4, 4)), _soft_targets(N)
    assert _fit(_convnet(False), x, targets)[2].blocks[0].positions == "expand"
    assert _fit(_convnet(True), x, targets)[2].blocks[0].positions == "sum"


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["mlp", "conv-pooled"])
def test_the_solve_equals_the_explicit_inverse(kind, name):
    model = _mlp() if name == "mlp" else _convnet(True)
    x = _inputs((N, 4)) if name == "mlp" else _inputs((N, 2, 4, 4))
    _, _, factors = _fit(model, x, _soft_targets(N), kind, chunk_size=5)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    settings = CurvatureSettings(kind=kind, default_damping_ratio=0.2)
    solver = factors.solver(settings)
    # the per-block rule: 0.2 x the mean of the block's own eigenvalues
    for block in factors.blocks:
        assert solver.dampings[block.layout.path] == pytest.approx(
            0.2 * float(block.values(kind).mean()), rel=1e-12)
    _dense_inverse_check(solver, factors, model, layers, solver.dampings)
    report = solver.report()
    assert report["kind"] == kind and report["layers"] == 2 and report["retries"] == 0
    assert report["summary"].startswith(f"{kind}: 2 layers")
    fixed = factors.solver(CurvatureSettings(kind=kind, damping=0.05))
    assert set(fixed.dampings.values()) == {0.05}
    _dense_inverse_check(fixed, factors, model, layers, fixed.dampings)


def test_kfac_block_is_kron_of_s_and_a_in_the_flat_order():
    model, x, targets = _mlp(), _inputs((N, 4)), _soft_targets(N)
    task, _, factors = _fit(model, x, targets, "kfac")
    layers = [model[0], model[2]]
    samples = _reference(model, layers, x, targets, task)
    solver = factors.solver(CurvatureSettings(kind="kfac", damping=0.1))
    m = factors.num_params
    explicit = torch.linalg.inv(solver.solve(torch.eye(m, dtype=torch.float64))) \
        - 0.1 * torch.eye(m, dtype=torch.float64)
    for k, layer in enumerate(layers):
        a, s = _explicit_sums(samples, k)[0]["sum"]
        idx = _block_index(model, layer)
        torch.testing.assert_close(explicit[idx[:, None], idx[None, :]], torch.kron(s, a),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_one_sample_at_one_position_is_the_exact_fisher_block(kind):
    model, x, targets = _mlp(), _inputs((1, 4)), _soft_targets(1)
    task, _, factors = _fit(model, x, targets, kind)
    layers = [model[0], model[2]]
    samples = _reference(model, layers, x, targets, task)
    for k, block in enumerate(factors.blocks):
        q = torch.kron(block.q_s, block.q_a)
        approx = q @ torch.diag(block.values(kind).reshape(-1)) @ q.T
        torch.testing.assert_close(approx, _exact_block(samples, k), rtol=1e-8, atol=1e-12)


# ---- the diagonal part -------------------------------------------------------------------
class TokenModel(nn.Module):
    """Embedding, LayerNorm, a Linear over positions, mean pooling, and an output layer tied
    to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(CLASSES + 4, 4)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, CLASSES + 4, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.norm(self.emb(ids)))).mean(1))


def test_the_diagonal_part_is_the_exact_fisher_diagonal():
    model = _seeded(TokenModel(), seed=4)
    ids = torch.randint(0, CLASSES + 4, (N, 5), generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    targets = torch.softmax(torch.randn(N, CLASSES + 4, generator=gen, dtype=torch.float64), -1)
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    factors = fit_kronecker(fmodel, fmodel.state(), ids, targets, task, "ekfac", 4)
    samples = _reference(model, [model.mix], ids, targets, task)
    g = torch.stack([flat for _, flat in samples])
    assert [b.layout.path for b in factors.blocks] == ["mix"]
    assert list(factors.diagonal) == ["emb.weight", "norm.weight", "norm.bias"]
    assert "tied" in factors.diagonal["emb.weight"]
    torch.testing.assert_close(factors.diag, g[:, factors.diag_index].pow(2).mean(0), **EXACT)
    assert factors.summary() == "ekfac: 1 layer (20 parameters), diagonal: 3 parameters (36)"
    solver = factors.solver(CurvatureSettings(kind="ekfac"))
    assert solver.diagonal_damping == pytest.approx(0.3 * float(factors.diag.mean()))
    _dense_inverse_check(solver, factors, model, [model.mix], solver.dampings)


def test_batch_statistics_are_refused_as_the_hooks_refuse_them():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False),
                          nn.Linear(5, CLASSES)).double()
    with pytest.raises(InputError, match="without running statistics"):
        _fit(model, _inputs((N, 4)), _soft_targets(N))


class MaskedModel(nn.Module):
    """Data-dependent control flow on a padding mask: ``vmap`` refuses its forward."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        mask = (x.abs().sum(-1) > 0).double()  # (n, T): padded positions are zero
        h = torch.tanh(self.inner(x))
        if bool((mask == 0).any()):
            h = h * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_a_model_vmap_refuses_works_through_the_hooks():
    model = _seeded(MaskedModel(), seed=7)
    x = _inputs((N, 4, 3))
    x[::2, 3] = 0  # padding
    targets = _soft_targets(N)
    task, fmodel, factors = _fit(model, x, targets)
    assert fmodel.route == "hooks"
    samples = _reference(model, [model.inner, model.head], x, targets, task)
    for k, block in enumerate(factors.blocks):
        candidates, _ = _explicit_sums(samples, k)
        a, s = candidates["sum" if block.positions == "one" else block.positions]
        torch.testing.assert_close(block.a, a, **EXACT)
        torch.testing.assert_close(block.s, s, **EXACT)
        q = torch.kron(block.q_s, block.q_a)
        torch.testing.assert_close(block.eigen.reshape(-1),
                                   torch.diagonal(q.T @ _exact_block(samples, k) @ q), **EXACT)


def test_transformers_conv1d_layers_are_blocks():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = _seeded(nn.Sequential(conv1d(5, 4), nn.Tanh(), nn.Linear(5, CLASSES)))
    x, targets = _inputs((N, 4)), _soft_targets(N)
    task, _, factors = _fit(model, x, targets)
    layers = [model[0], model[2]]
    samples = _reference(model, layers, x, targets, task)
    for k, block in enumerate(factors.blocks):
        q = torch.kron(block.q_s, block.q_a)
        torch.testing.assert_close(block.eigen.reshape(-1),
                                   torch.diagonal(q.T @ _exact_block(samples, k) @ q), **EXACT)
    solver = factors.solver(CurvatureSettings(kind="ekfac"))
    _dense_inverse_check(solver, factors, model, layers, solver.dampings)


# ---- influence functions -----------------------------------------------------------------
def test_influence_function_scores_equal_the_explicit_ekfac_matrix(tmp_path):
    model = _mlp()
    task = Task(model, "classification", Recipe())
    x, y = _inputs((N, 4)), torch.arange(N) % CLASSES
    xt, yt = _inputs((4, 4), seed=8), torch.tensor([0, 2, 1, 1])
    method = InfluenceFunction(task, (x, y), curvature=CurvatureSettings(kind="ekfac"))
    scores = method.attribute((xt, yt)).scores
    # independent: eigenbases of the explicit A and S, eigenvalues diag(Q^T F_l Q)
    train_targets = method.train.targets
    test_targets = method.validate_test((xt, yt)).targets
    layers = [model[0], model[2]]
    samples = _reference(model, layers, x, train_targets, task)
    g = torch.stack([flat for _, flat in samples])
    g_test = torch.stack([flat for _, flat in _reference(model, layers, xt, test_targets, task)])
    m = g.shape[1]
    c = torch.zeros(m, m, dtype=torch.float64)
    for k, layer in enumerate(layers):
        a, s = _explicit_sums(samples, k)[0]["sum"]
        q = torch.kron(torch.linalg.eigh(s)[1], torch.linalg.eigh(a)[1])
        lam = torch.diagonal(q.T @ _exact_block(samples, k) @ q)
        idx = _block_index(model, layer)
        c[idx[:, None], idx[None, :]] = q @ torch.diag(lam + 0.3 * lam.mean()) @ q.T
    expected = -(g_test @ torch.linalg.solve(c, g.T)) / N
    rel = float((torch.as_tensor(scores) - expected).norm() / expected.norm())
    assert rel < 1e-6
    assert method.attribute((xt, yt)).info["solver"]["kind"] == "ekfac"
    # one fit serves several dampings; a fitted state round-trips through a folder
    [at] = method.attribute_dampings((xt, yt), [0.3], relative=True)
    torch.testing.assert_close(torch.as_tensor(at.scores), torch.as_tensor(scores), **EXACT)
    method.fit(tmp_path)
    again = InfluenceFunction(task, (x, y), curvature=CurvatureSettings(kind="ekfac"))
    again.fit(tmp_path)
    assert again._kron is not None  # loaded, not refitted
    torch.testing.assert_close(torch.as_tensor(again.attribute((xt, yt)).scores),
                               torch.as_tensor(scores), **EXACT)


def test_kronecker_kinds_are_refused_where_they_do_not_apply():
    task = Task(_mlp(), "classification", Recipe())
    data = (_inputs((N, 4)), torch.arange(N) % CLASSES)
    ekfac = CurvatureSettings(kind="ekfac")
    with pytest.raises(InputError, match="curvature 'ekfac' .*projection"):
        InfluenceFunction(task, data, curvature=ekfac, projection=ProjectionSettings(dim=4))
    with pytest.raises(InputError, match="curvature 'kfac' .*solver 'cg'"):
        InfluenceFunction(task, data, curvature=CurvatureSettings(kind="kfac"), solver="cg")
    with pytest.raises(InputError, match="curvature 'ekfac' solves unprojected gradients"):
        IntegratedInfluence(task, data, curvature=ekfac, projection=ProjectionSettings(dim=4))
