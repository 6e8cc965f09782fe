"""A zoo of common architectures, each built from a tiny configuration and attributed as it
is, without a wrapper: GPT-2 and Llama language models (next-token labels from
:func:`iif.causal_lm_labels`), a BERT classifier fed dictionary batches with padding masks, a
residual CNN with BatchNorm and an embedding + LSTM classifier.

Every method runs on every model and gives finite, non-zero scores by the gradient route the
model needs (``vmap``, or module hooks for a forward that cannot run under ``vmap``). The
engine's per-sample gradients match a per-sample autograd loop on the model itself;
influence functions (exact, dense- and Kronecker-projected), TRAK and TracIn match their
definitions on such gradients; and Integrated Influence with one step from the model's own
predictions equals the influence function of the same curvature and projection (paper
Lemma 2.5)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import iif
from iif import (
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    PathSettings,
    ProjectionSettings,
    Recipe,
    Task,
)
from iif.task.task import IGNORE

from .reference import influence

transformers = pytest.importorskip("transformers")

N_TRAIN, N_TEST, LENGTH, VOCAB = 8, 2, 6, 16
RECIPE = Recipe(lr=0.05, epochs=2, batch_size=4)


# ---- the models ------------------------------------------------------------------------------
class Residual(nn.Module):
    """conv-bn-relu-conv-bn with the input added back, then relu."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + inner)


class ResNet(nn.Module):
    """A ResNet in miniature: a conv-bn-relu stem, one residual block, global average pooling
    and a Linear head."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.block = Residual(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class LSTMClassifier(nn.Module):
    """Token embedding, one LSTM layer, a Linear head on the last hidden state."""

    def __init__(self, vocab: int = 12, width: int = 4, hidden: int = 5, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


class Texts(torch.utils.data.Dataset):
    """Tokenised texts as a tokenizer's dictionaries, labels included."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


@dataclass
class Member:
    """A trained model of the zoo, its data as the methods take them and as the reference
    loop calls the model (a tensor, or a dict of keyword tensors), and its gradient route."""

    task: Task
    train: Any
    test: Any
    inputs: Any  # the training inputs followed by the test inputs
    labels: torch.Tensor
    route: str
    checkpoints: list | None = None  # after each training epoch

    def call(self, model: nn.Module, i: int) -> torch.Tensor:
        """The model's output tensor for sample i alone (training samples first)."""
        if isinstance(self.inputs, dict):
            out = model(**{k: v[i : i + 1] for k, v in self.inputs.items()})
        else:
            out = model(self.inputs[i : i + 1])
        return out.logits if hasattr(out, "logits") else out


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _padded_ids(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, every third sample right-padded (id 0) after 4 tokens."""
    ids = torch.randint(1, VOCAB, (N_TRAIN + N_TEST, LENGTH), generator=_generator(seed))
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    return ids * mask, mask


def _texts(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """A Hugging Face model's member: dictionary batches from a DataLoader."""
    def loader(part: slice) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Texts(ids[part], mask[part], labels[part]),
                                           batch_size=4)

    return dict(train=loader(slice(0, N_TRAIN)), test=loader(slice(N_TRAIN, None)),
                inputs={"input_ids": ids, "attention_mask": mask}, labels=labels)


def _tensors(x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    return dict(train=(x[:N_TRAIN], labels[:N_TRAIN]), test=(x[N_TRAIN:], labels[N_TRAIN:]),
                inputs=x, labels=labels)


def gpt2() -> tuple[nn.Module, str, dict[str, Any], str]:
    """Padded dictionary batches: the attention mask's data-dependent branches send the
    forward to hooks (for every parameter, the tied output layer included)."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1,
                                  n_head=2, n_inner=16, bos_token_id=1, eos_token_id=1)
    ids, mask = _padded_ids(1)
    data = _texts(ids, mask, iif.causal_lm_labels(ids, mask))
    return transformers.GPT2LMHeadModel(cfg), "sequence", data, "hooks"


def _llama_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=16,
                                    bos_token_id=1, eos_token_id=1)


def llama() -> tuple[nn.Module, str, dict[str, Any], str]:
    """Unpadded token ids as one tensor: the forward runs under vmap."""
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, LENGTH), generator=_generator(2))
    data = _tensors(ids, iif.causal_lm_labels(ids))
    return transformers.LlamaForCausalLM(_llama_config()), "sequence", data, "vmap"


def llama_padded() -> tuple[nn.Module, str, dict[str, Any], str]:
    """Padded dictionary batches: hooks, and a per-sample loop for the RMSNorm weights."""
    ids, mask = _padded_ids(6)
    data = _texts(ids, mask, iif.causal_lm_labels(ids, mask))
    return transformers.LlamaForCausalLM(_llama_config()), "sequence", data, "hooks"


def bert() -> tuple[nn.Module, str, dict[str, Any], str]:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=8, num_labels=2)
    ids, mask = _padded_ids(3)
    data = _texts(ids, mask, (ids[:, 0] > VOCAB // 2).long())
    return transformers.BertForSequenceClassification(cfg), "classification", data, "hooks"


def resnet() -> tuple[nn.Module, str, dict[str, Any], str]:
    x = torch.randn(N_TRAIN + N_TEST, 1, 6, 6, generator=_generator(4), dtype=torch.float64)
    data = _tensors(x, torch.arange(N_TRAIN + N_TEST) % 3)
    return ResNet(), "classification", data, "vmap"


def lstm() -> tuple[nn.Module, str, dict[str, Any], str]:
    """torch's LSTM cannot run under vmap: hooks, and a per-sample loop for its weights."""
    ids = torch.randint(0, 12, (N_TRAIN + N_TEST, 5), generator=_generator(5))
    data = _tensors(ids, (ids[:, 0] > 5).long())
    return LSTMClassifier(), "classification", data, "hooks"


ZOO = {"gpt2": gpt2, "llama": llama, "llama-padded": llama_padded, "bert": bert,
       "resnet": resnet, "lstm": lstm}


@pytest.fixture(scope="module", params=list(ZOO))
def member(request) -> Member:
    """The zoo's model, trained for two epochs with a checkpoint after each, in eval mode."""
    torch.manual_seed(0)
    model, kind, data, route = ZOO[request.param]()
    task = Task(model.double().eval(), kind, RECIPE)
    out = Member(task=task, route=route, **data)
    out.checkpoints = iif.train_with_checkpoints(task, out.train, progress=False)
    model.eval()
    return out


# ---- every method on every model -------------------------------------------------------------
def _check(result: iif.Attribution, member: Member) -> None:
    """Finite scores of every test sample for every training sample, not all zero, taken by
    the gradient route the model needs."""
    assert result.scores.shape == (N_TEST, N_TRAIN)
    assert np.isfinite(result.scores).all()
    assert np.abs(result.scores).max() > 0
    assert result.info["gradient_route"] == member.route


@pytest.mark.parametrize("structure", [None, "kronecker"])
def test_integrated_influence_attributes_every_model_of_the_zoo(member, structure):
    """The defaults, and a Kronecker projection (the other methods are checked against their
    definitions below)."""
    projection = (ProjectionSettings() if structure is None
                  else ProjectionSettings(dim=16, structure=structure))
    method = IntegratedInfluence(member.task, member.train, progress=False,
                                 projection=projection)
    _check(method.attribute(member.test), member)


# ---- against autograd on the model itself ----------------------------------------------------
def _positions(member: Member, i: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i's logits (positions, V) at its labelled positions, and those labels (one
    position for a classifier)."""
    logits, label = member.call(model, i)[0], member.labels[i]
    if member.task.kind == "sequence":
        keep = label != IGNORE
        return logits[keep], label[keep]
    return logits[None], label[None]


def _sample_loss(member: Member, model: nn.Module, i: int) -> torch.Tensor:
    """Sample i's loss, written out: the cross-entropy of its class, or the next-token
    cross-entropy summed over its labelled positions."""
    logits, labels = _positions(member, i, model)
    return -torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels].sum()


def _margin(member: Member, model: nn.Module, i: int) -> torch.Tensor:
    """TRAK's output function of sample i: ``log p_y - log(1 - p_y)`` summed over its
    labelled positions."""
    logits, labels = _positions(member, i, model)
    rows = torch.arange(len(labels))
    others = logits.clone()
    others[rows, labels] = float("-inf")
    return (logits[rows, labels] - torch.logsumexp(others, -1)).sum()


def _model_at(member: Member, state=None) -> nn.Module:
    """An eval-mode copy of the model, at ``state``'s parameters and buffers if given."""
    model = copy.deepcopy(member.task.model).eval()
    if state is not None:
        with torch.no_grad():
            for name, value in state.params.items():
                model.get_parameter(name).copy_(value)
            for name, value in state.buffers.items():
                model.get_buffer(name).copy_(value)
    return model


def _reference_grads(member: Member, state=None, value=_sample_loss) -> torch.Tensor:
    """Per-sample gradients (N_TRAIN + N_TEST, M) of ``value`` (the loss), one autograd call
    per sample on an eval-mode copy of the model (at ``state`` if given)."""
    model = _model_at(member, state)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(member.labels)):
        grads = torch.autograd.grad(value(member, model, i), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(params, grads, strict=True)]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def grads(member) -> torch.Tensor:
    """The reference loss gradients at theta*, training samples then test samples."""
    return _reference_grads(member)


def _assert_close(got: np.ndarray, want: np.ndarray | torch.Tensor) -> None:
    want = np.asarray(want)
    assert np.abs(want).max() > 0
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_the_engine_s_per_sample_gradients_are_those_of_autograd_on_the_model(member, grads):
    method = InfluenceFunction(member.task, member.train, progress=False)
    got = method.engine.per_sample_grads(method.state, method.train.x, method.train.targets)
    want = grads[:N_TRAIN]
    assert got.shape == want.shape
    for i in range(N_TRAIN):
        assert float((got[i] - want[i]).norm() / want[i].norm()) < 1e-6, i
    assert method.engine.gradient_route() == member.route


@pytest.mark.parametrize("structure", [None, "dense", "kronecker"])
def test_influence_functions_are_their_definition_on_autograd_gradients(member, grads,
                                                                          structure):
    """``-(1/N) phi_s^T (F + lambda I)^{-1} phi_i`` with ``phi = A^T g`` (A = I when exact),
    F the empirical Fisher of the phi and the default damping."""
    projection = ProjectionSettings(dim=None if structure is None else 16,
                                    structure=structure or "dense")
    solver = "exact" if structure is None else "projected"
    method = InfluenceFunction(member.task, member.train, progress=False, solver=solver,
                               projection=projection)
    got = method.attribute(member.test)
    _check(got, member)
    assert got.settings["solver"] == solver
    matrix = method.projector.project(torch.eye(grads.shape[1], dtype=grads.dtype))
    phi = grads @ matrix
    train, test = phi[:N_TRAIN], phi[N_TRAIN:]
    fisher = train.T @ train / N_TRAIN
    # the default: a ratio of the mean of its (at most N) nonzero eigenvalues
    damping = CurvatureSettings().default_damping_ratio * float(fisher.trace()) / N_TRAIN
    assert got.settings["curvature"]["damping"] is None
    _assert_close(got.scores, influence(fisher, damping, test, train))


def test_trak_is_its_definition_on_autograd_gradients(member):
    """``-(phi_s^T (Phi^T Phi + lambda I)^{-1} phi_i) w_i`` with phi the margin's gradients
    (unprojected: the default dim exceeds M) and w_i the mean of ``1 - p_y`` over sample i's
    labelled positions."""
    phi = _reference_grads(member, value=_margin)
    train, test = phi[:N_TRAIN], phi[N_TRAIN:]
    model = _model_at(member)
    with torch.no_grad():
        weights = []
        for i in range(N_TRAIN):
            logits, labels = _positions(member, i, model)
            p = torch.softmax(logits, -1)[torch.arange(len(labels)), labels]
            weights.append(float((1 - p).mean()))
    gram = train.T @ train
    damping = 0.1 * float(gram.trace()) / N_TRAIN  # TRAK's default: 0.1 x its mean eigenvalue
    kernel = torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=gram.dtype),
                                test.T)
    want = -(train @ kernel).T * torch.tensor(weights, dtype=phi.dtype)
    got = iif.TRAK(member.task, member.train, progress=False).attribute(member.test)
    _check(got, member)
    _assert_close(got.scores, want)


def test_tracin_is_its_definition_on_autograd_gradients(member):
    """``-sum_c lr_c g_s(theta_c)^T g_i(theta_c)`` over the run's checkpoints."""
    want = 0.0
    for c in member.checkpoints:
        g = _reference_grads(member, c.state)
        want = want - c.lr * g[N_TRAIN:] @ g[:N_TRAIN].T
    got = iif.TracIn(member.task, member.train, checkpoints=member.checkpoints,
                     progress=False).attribute(member.test)
    _check(got, member)
    assert len(member.checkpoints) == RECIPE.epochs
    _assert_close(got.scores, want)


@pytest.mark.parametrize("structure", [None, "kronecker"])
def test_one_step_from_the_model_s_own_predictions_is_the_influence_function(member,
                                                                               structure):
    """IIF with K = 1 from the baseline f(x; theta*) equals the influence function of the same
    Fisher, damping and projection (exact, or Kronecker-projected)."""
    curvature = CurvatureSettings(kind="fisher", damping=1e-3)
    projection = (ProjectionSettings() if structure is None
                  else ProjectionSettings(dim=16, structure=structure))
    method = IntegratedInfluence(member.task, member.train, progress=False,
                                 path=PathSettings(steps=1, sparse=False),
                                 curvature=curvature, projection=projection)
    train = method.train
    with torch.no_grad():
        own = member.task.prediction_targets(method.engine.outputs(method.state, train.x),
                                             train.targets)
    got = method.attribute(member.test, baseline_targets=own).scores
    want = InfluenceFunction(member.task, member.train, progress=False, curvature=curvature,
                             projection=projection).attribute(member.test).scores
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    assert np.abs(want).max() > 0
