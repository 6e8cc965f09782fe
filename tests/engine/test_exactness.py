"""Every engine path that claims to be exact, on a zoo of tiny float64 models, against a
reference written without ``torch.func`` and without the engine.

The reference differentiates the module itself: per-sample gradients by a loop of
``torch.autograd.grad``, Hessian rows by double backward (checked against finite differences
below), output Jacobians row by row, the softmax Hessian in closed form, and every solve in
float64 with ``torch.linalg``. The paths: the explicit Hessian (scores and self-influence), the
Fisher from layer factors and from dense rows, the Gauss-Newton matrix, conjugate gradients on
Hessian-, Fisher- and Gauss-Newton-vector products, TRAK unprojected and TracIn on one
checkpoint. A path that cannot serve a model must refuse it in one line naming the layer and
the remedy (``REFUSED``); a raw torch error, or scores off the reference, fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from iif import TRAK, CurvatureSettings, InfluenceFunction, ProjectionSettings, Recipe, Task, TracIn
from iif.engine.curvature import CGSettings
from iif.engine.functional import FunctionalModel
from iif.errors import InputError, UserCodeError
from iif.methods.tracin.checkpoints import Checkpoint

N_TRAIN, N_TEST, CLASSES = 6, 2, 3
CHUNK = 4  # two chunks of the training set: the products add them up
TOLERANCE = 1e-6  # relative, Frobenius


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Tiny models: one thread (tests/conftest.py)."""


# ---- the zoo ----------------------------------------------------------------------------------
@dataclass
class Problem:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    kind: str = "classification"
    # the methods built on it, by settings: paths that differ only in what they ask of one
    # fitted method share it
    methods: dict = field(default_factory=dict)


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn at a scale where all terms matter."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen,
                                                 dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen,
                                               dtype=torch.float64) + 0.5)
    return model


def _floats(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N_TRAIN + N_TEST,), generator=gen)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _ids(vocab: int, length: int, classes: int, seed: int, pad: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (N_TRAIN + N_TEST, length), generator=gen)
    if pad:  # every other sample padded at its end (id 0)
        ids[::2, length - 2:] = 0
    y = torch.randint(0, classes, (N_TRAIN + N_TEST,), generator=gen)
    return ids[:N_TRAIN], y[:N_TRAIN], ids[N_TRAIN:], y[N_TRAIN:]


def _mlp(*middle: nn.Module, width: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, width), *middle, nn.Tanh(), nn.Linear(width, CLASSES))


class Tied(nn.Module):
    """The first layer's weight, transposed, is also the read-out (outside any layer)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(CLASSES, 4)
        self.bias = nn.Parameter(torch.zeros(CLASSES))

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.bias)


class Twice(nn.Module):
    """One hidden layer called twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


def _frozen() -> nn.Module:
    model = _mlp(nn.Tanh(), nn.Linear(4, 4))
    model[0].bias.requires_grad_(False)
    model[2].requires_grad_(False)
    return model


class Raw(nn.Module):
    """Parameters used directly, no layer modules."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(4))
        self.v, self.scale = nn.Parameter(torch.zeros(4, CLASSES)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b) @ self.v * self.scale.exp()


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 3), nn.Linear(3, CLASSES)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids).mean(1)))


class Conv(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv, self.norm = conv(2, 2, 3), norm(2)
        self.out = nn.Linear(2 * 2 ** dims, CLASSES)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.conv(x))).flatten(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn, self.out = cell(2, 3, batch_first=True), nn.Linear(3, CLASSES)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class GPT2Last(nn.Module):
    """GPT-2 (lm_head tied to the token embedding): next-token logits of the last position."""

    def __init__(self, attention: str):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(vocab_size=7, n_embd=4, n_layer=1, n_head=2,
                                      n_positions=4, n_inner=6, bos_token_id=0, eos_token_id=0,
                                      attn_implementation=attention)
        self.lm = transformers.GPT2LMHeadModel(cfg)

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, -1]


class MaskedBert(nn.Module):
    """BERT whose padding (id 0) is masked out, the mask written from the ids."""

    def __init__(self, attention: str = "sdpa"):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(vocab_size=7, hidden_size=4, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=6,
                                      max_position_embeddings=4, num_labels=CLASSES,
                                      attn_implementation=attention)
        self.bert = transformers.BertForSequenceClassification(cfg)

    def forward(self, ids):
        return self.bert(input_ids=ids, attention_mask=(ids != 0)).logits


class _Tanh(torch.autograd.Function):
    """tanh written as a custom function: a backward in torch operations (differentiable
    again), no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _FusedTanh(_Tanh):
    """The same with its backward marked once differentiable, as a fused kernel's is."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class Custom(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]):
        super().__init__()
        self.inp, self.out, self.function = nn.Linear(3, 4), nn.Linear(4, CLASSES), function

    def forward(self, x):
        return self.out(self.function.apply(self.inp(x)))


def _regression() -> Problem:
    x, _, xt, _ = _floats(3, seed=17)
    gen = torch.Generator().manual_seed(18)
    y, yt = (torch.randn(n, 1, generator=gen, dtype=torch.float64) for n in (N_TRAIN, N_TEST))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return Problem(_randomised(model, 17), x, y, xt, yt, "regression")


ZOO: dict[str, Callable[[], Problem]] = {
    "mlp": lambda: Problem(_randomised(_mlp(), 0), *_floats(3, seed=0)),
    "mlp-regression": _regression,
    "tied": lambda: Problem(_randomised(Tied(), 1), *_floats(3, seed=1)),
    "called-twice": lambda: Problem(_randomised(Twice(), 2), *_floats(3, seed=2)),
    "frozen": lambda: Problem(_randomised(_frozen(), 3), *_floats(3, seed=3)),
    "raw-parameters": lambda: Problem(_randomised(Raw(), 4), *_floats(3, seed=4)),
    "batchnorm-eval": lambda: Problem(_randomised(_mlp(nn.BatchNorm1d(4)), 5),
                                      *_floats(3, seed=5)),
    "embedding-pool": lambda: Problem(_randomised(Pooled(), 6), *_ids(7, 3, CLASSES, seed=6)),
    "layernorm": lambda: Problem(_randomised(_mlp(nn.LayerNorm(4)), 7), *_floats(3, seed=7)),
    "conv1d-batchnorm": lambda: Problem(_randomised(Conv(1), 8), *_floats(2, 4, seed=8)),
    "conv2d-batchnorm": lambda: Problem(_randomised(Conv(2), 9), *_floats(2, 4, 4, seed=9)),
    "gru": lambda: Problem(_randomised(Recurrent(nn.GRU), 10), *_floats(3, 2, seed=10)),
    "lstm": lambda: Problem(_randomised(Recurrent(nn.LSTM), 11), *_floats(3, 2, seed=11)),
    "dropout": lambda: Problem(_randomised(_mlp(nn.Dropout(0.5)), 12), *_floats(3, seed=12)),
    "gpt2-eager": lambda: Problem(_randomised(GPT2Last("eager"), 13), *_ids(7, 4, 7, seed=13)),
    "gpt2-sdpa": lambda: Problem(_randomised(GPT2Last("sdpa"), 14), *_ids(7, 4, 7, seed=14)),
    "bert-padding-mask": lambda: Problem(_randomised(MaskedBert(), 15),
                                         *_ids(7, 4, CLASSES, seed=15, pad=True)),
    "bert-eager-padding-mask": lambda: Problem(_randomised(MaskedBert("eager"), 17),
                                               *_ids(7, 4, CLASSES, seed=17, pad=True)),
    "custom-function": lambda: Problem(_randomised(Custom(_Tanh), 16), *_floats(3, seed=16)),
    "once-differentiable": lambda: Problem(_randomised(Custom(_FusedTanh), 19),
                                           *_floats(3, seed=19)),
}

_NO_HESSIAN = ("curvature 'hessian' needs second derivatives of the model, which torch drops "
               "for _FusedTanh (a torch.autograd.Function marked @once_differentiable); use "
               "CurvatureSettings(kind='fisher') or kind='ggn'")
# (model, path) -> the one line the path refuses the model with
REFUSED: dict[tuple[str, str], str] = {
    **{("once-differentiable", path): _NO_HESSIAN
       for path in ("hessian", "hessian-self-influence", "cg-hessian")},
    ("once-differentiable", "cg-ggn"): (
        "conjugate gradients on Gauss-Newton products need second derivatives of the model, "
        "which torch drops for _FusedTanh (a torch.autograd.Function marked "
        "@once_differentiable); use solver 'exact' (first derivatives only) or "
        "CurvatureSettings(kind='fisher')"),
}


# ---- the reference ----------------------------------------------------------------------------
@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, attention in plain operations (its fused kernels have no double backward)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m, flag in flags:
            m.training = flag


class Reference:
    """Gradients, curvatures and scores of one problem, by plain autograd on the module."""

    def __init__(self, p: Problem):
        self.p = p
        self.params = [q for q in p.model.parameters() if q.requires_grad]
        self.n = p.x.shape[0]

    def _flat(self, value: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(value, self.params, retain_graph=True,
                                    create_graph=create_graph, allow_unused=True)
        return torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                          for g, q in zip(grads, self.params, strict=True)])

    def losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.p.kind == "regression":
            return ((out - y) ** 2).mean(-1)
        return -torch.log_softmax(out, -1).gather(1, y[:, None])[:, 0]

    def margins(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.p.kind == "regression":
            return out[:, 0]
        true = out.gather(1, y[:, None])[:, 0]
        others = out.scatter(1, y[:, None], float("-inf"))
        return true - torch.logsumexp(others, -1)

    def _rows(self, x: torch.Tensor, y: torch.Tensor, value) -> torch.Tensor:
        with _eval(self.p.model):
            return torch.stack([self._flat(value(self.p.model(x[i:i + 1]), y[i:i + 1])[0])
                                for i in range(x.shape[0])])

    @cached_property
    def g_train(self) -> torch.Tensor:
        return self._rows(self.p.x, self.p.y, self.losses)

    @cached_property
    def g_test(self) -> torch.Tensor:
        return self._rows(self.p.xt, self.p.yt, self.losses)

    @cached_property
    def hessian(self) -> torch.Tensor:
        """Rows of the mean training loss's Hessian, each the gradient of one gradient entry."""
        with _eval(self.p.model):
            g = self._flat(self.losses(self.p.model(self.p.x), self.p.y).mean(), True)
            h = torch.stack([self._flat(g[k]) for k in range(g.numel())])
        return 0.5 * (h + h.T)

    @cached_property
    def fisher(self) -> torch.Tensor:
        return self.g_train.T @ self.g_train / self.n

    @cached_property
    def ggn(self) -> torch.Tensor:
        """(1/N) sum_i J_i^T H_i J_i, H_i the loss Hessian in output space in closed form."""
        total = torch.zeros_like(self.fisher)
        with _eval(self.p.model):
            for i in range(self.n):
                out = self.p.model(self.p.x[i:i + 1])[0]
                jac = torch.stack([self._flat(out[c]) for c in range(out.numel())])
                if self.p.kind == "regression":
                    h = 2 * torch.eye(out.numel(), dtype=out.dtype) / out.numel()
                else:
                    prob = torch.softmax(out.detach(), -1)
                    h = torch.diag(prob) - torch.outer(prob, prob)
                total += jac.T @ h @ jac
        return total / self.n

    @cached_property
    def damping(self) -> float:
        """Makes the damped Hessian clearly positive definite and keeps every solve well
        conditioned (CG converges in tens of steps). Any positive value serves a model whose
        Hessian paths are refused."""
        eig = torch.linalg.eigvalsh(self.hessian)
        return 0.2 * float(eig.abs().max()) + 2 * max(0.0, -float(eig.min()))

    def influence(self, curvature: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(curvature.shape[0], dtype=torch.float64)
        sol = torch.linalg.solve(curvature + self.damping * eye, self.g_train.T)
        return -(self.g_test @ sol) / self.n

    def self_influence(self, curvature: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(curvature.shape[0], dtype=torch.float64)
        sol = torch.linalg.solve(curvature + self.damping * eye, self.g_train.T)
        return -(self.g_train * sol.T).sum(1) / self.n

    def trak(self) -> torch.Tensor:
        """TRAK's estimator on the margin (classification) or the output (regression)."""
        p = self.p
        phi = self._rows(p.x, p.y, self.margins)
        phi_t = self._rows(p.xt, p.yt, self.margins)
        with torch.no_grad(), _eval(p.model):
            out, out_t = p.model(p.x), p.model(p.xt)
        if p.kind == "regression":
            rows, w, c = np.sqrt(2.0) * phi, 2 * (p.y - out)[:, 0], 2 * (p.yt - out_t)[:, 0]
        else:
            rows, w, c = phi, torch.sigmoid(-self.margins(out, p.y)), torch.ones(p.xt.shape[0])
        kernel = rows.T @ rows + self.damping * torch.eye(phi.shape[1], dtype=torch.float64)
        return -(c[:, None] * (phi_t @ torch.linalg.solve(kernel, phi.T))) * w[None]


# ---- the engine's paths -----------------------------------------------------------------------
LR = 0.5  # TracIn's checkpoint learning rate


def _task(p: Problem) -> Task:
    return Task(p.model, p.kind, Recipe(lr=LR))


def _influence(p: Problem, d: float, kind: str, solver: str = "exact") -> InfluenceFunction:
    if (kind, solver) not in p.methods:
        p.methods[kind, solver] = InfluenceFunction(
            _task(p), (p.x, p.y), progress=False, chunk_size=CHUNK, solver=solver,
            curvature=CurvatureSettings(kind=kind, damping=d, ggn_rank=None),
            cg=CGSettings(tol=1e-11, max_iter=500))
    return p.methods[kind, solver]


def _scores(method, p: Problem) -> np.ndarray:
    return method.attribute((p.xt, p.yt)).scores


def _dense_fisher(p: Problem, d: float) -> np.ndarray:
    """The Fisher from its per-sample-gradient rows (Woodbury), never from layer factors."""
    return _influence(p, d, "fisher").attribute_dampings((p.xt, p.yt), [d])[0].scores


def _trak(p: Problem, d: float) -> np.ndarray:
    return _scores(TRAK(_task(p), (p.x, p.y), progress=False, chunk_size=CHUNK, damping=d,
                        projection=ProjectionSettings(dim=None)), p)


def _tracin(p: Problem, d: float) -> np.ndarray:
    state = FunctionalModel(p.model).state()
    return _scores(TracIn(_task(p), (p.x, p.y), progress=False, chunk_size=CHUNK,
                          checkpoints=[Checkpoint(epoch=1, lr=LR, state=state)]), p)


PATHS: dict[str, tuple[Callable[[Problem, float], np.ndarray],
                       Callable[[Reference], torch.Tensor]]] = {
    "hessian": (lambda p, d: _scores(_influence(p, d, "hessian"), p),
                lambda r: r.influence(r.hessian)),
    "hessian-self-influence": (lambda p, d: _influence(p, d, "hessian").self_influence(),
                               lambda r: r.self_influence(r.hessian)),
    "fisher-factored": (lambda p, d: _scores(_influence(p, d, "fisher"), p),
                        lambda r: r.influence(r.fisher)),
    "fisher-dense": (_dense_fisher, lambda r: r.influence(r.fisher)),
    "ggn": (lambda p, d: _scores(_influence(p, d, "ggn"), p), lambda r: r.influence(r.ggn)),
    "cg-hessian": (lambda p, d: _scores(_influence(p, d, "hessian", "cg"), p),
                   lambda r: r.influence(r.hessian)),
    "cg-fisher": (lambda p, d: _scores(_influence(p, d, "fisher", "cg"), p),
                  lambda r: r.influence(r.fisher)),
    "cg-ggn": (lambda p, d: _scores(_influence(p, d, "ggn", "cg"), p),
               lambda r: r.influence(r.ggn)),
    "trak-unprojected": (_trak, lambda r: r.trak()),
    "tracin-one-checkpoint": (_tracin, lambda r: -LR * r.g_test @ r.g_train.T),
}


@pytest.fixture(scope="module")
def problems() -> Callable[[str], tuple[Problem, Reference]]:
    """Each zoo entry built once, with its reference (computed on demand)."""
    built: dict[str, tuple[Problem, Reference]] = {}

    def get(name: str) -> tuple[Problem, Reference]:
        if name not in built:
            p = ZOO[name]()
            built[name] = (p, Reference(p))
        return built[name]

    return get


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().numpy()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(ZOO))
def test_every_exact_path_agrees_with_the_reference_or_refuses_in_one_line(name, path,
                                                                          problems):
    p, ref = problems(name)
    run, expected = PATHS[path]
    if (name, path) in REFUSED:
        with pytest.raises(InputError) as info:
            run(p, ref.damping)
        assert not isinstance(info.value, UserCodeError)
        assert str(info.value) == REFUSED[name, path]
        return
    got = run(p, ref.damping)
    error = relative_error(got, expected(ref))
    assert error <= TOLERANCE, f"{path} on {name}: {error:.1e} off the reference"


@pytest.mark.parametrize("name", ["layernorm", "gpt2-eager", "gpt2-sdpa", "bert-padding-mask"])
def test_the_reference_hessian_agrees_with_finite_differences(name, problems):
    """Along a few random directions v: central differences of the gradient against H v."""
    p, ref = problems(name)
    theta = [q.detach().clone() for q in ref.params]
    sizes = [q.numel() for q in ref.params]

    def grad_at(step: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for q, t, s in zip(ref.params, theta, step.split(sizes), strict=True):
                q.copy_(t + s.reshape(t.shape))
        with _eval(p.model):
            return ref._flat(ref.losses(p.model(p.x), p.y).mean()).detach()

    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(4, sum(sizes), generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    eps = 1e-5
    try:
        fd = torch.stack([(grad_at(eps * v) - grad_at(-eps * v)) / (2 * eps)
                          for v in directions])
    finally:
        grad_at(torch.zeros(sum(sizes), dtype=torch.float64))
    assert relative_error(fd.numpy(), directions @ ref.hessian) < 1e-6
