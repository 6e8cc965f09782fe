"""The language-model building blocks: corpus, tokenizer, a small transformer under
torch.func, and Kronecker-projected per-sample gradients over token positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from iif import ProjectionSettings
from iif.engine.features import loss_features
from iif.engine.functional import FunctionalModel
from iif.engine.projection import KroneckerProjector, make_projector
from iif.task.task import Task
from iif_paper.lm import (
    BOS,
    EOS,
    IGNORE,
    PAD,
    build_model,
    decode,
    encode,
    load_fortunes,
    read_fortunes,
    sequence_log_prob,
    sequence_loss,
    train_lm,
)

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny_fortunes"
T = 8


def test_tiny_corpus_is_parsed_deduplicated_and_split_by_seed():
    docs = read_fortunes(TINY, max_bytes=126)
    assert len(docs) == 36  # 38 entries, one duplicate, one too long
    assert "Time flies like an arrow;\nfruit flies like a banana." in docs  # tabs normalised
    assert all(0 < len(d.encode()) <= 126 and "%" not in d for d in docs)
    assert len(read_fortunes(TINY, max_bytes=20)) < len(docs)
    a, b = load_fortunes(TINY, n_test=6, seed=1), load_fortunes(TINY, n_test=6, seed=1)
    assert a == b and len(a.test) == 6 and len(a.train) == 30
    assert not set(a.train) & set(a.test)
    assert load_fortunes(TINY, n_test=6, seed=2).test != a.test


def test_missing_corpus_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        read_fortunes(tmp_path / "absent")


def test_byte_tokenizer_round_trips_and_shifts_targets():
    texts = ["hi", "Café", ""]
    ids, targets = encode(texts, 8)
    assert ids.shape == targets.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [BOS, ord("h"), ord("i"), EOS, PAD, PAD, PAD, PAD]
    assert targets[0].tolist() == [ord("h"), ord("i"), EOS] + [IGNORE] * 5
    assert targets[2].tolist() == [EOS] + [IGNORE] * 7
    assert [decode(row) for row in ids] == texts
    cut, cut_targets = encode(["abcdefghij"], 4)  # cut to 4 ids: no EOS, last target unknown
    assert decode(cut[0]) == "abc" and cut_targets[0, -1] == IGNORE


def _tiny_lm(seed: int = 0) -> nn.Module:
    return build_model(seed, hidden=16, layers=1, heads=2, intermediate=32,
                       max_length=T).double()


def _data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents cut to T ids, and two short ones that end in padding."""
    return encode(read_fortunes(TINY)[: n - 2] + ["x", "ab"], T)


def test_padding_does_not_change_the_logits_of_the_text():
    model = _tiny_lm()
    ids, _ = encode(["abc"], T)
    other = ids.clone()
    other[0, 5:] = 65  # different tokens after the text (where PAD was)
    assert torch.equal(model(ids)[0, :5], model(other)[0, :5])
    assert model(ids).shape == (1, T, 260)


def test_per_sample_gradients_under_vmap_equal_a_loop():
    model = _tiny_lm()
    ids, targets = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, i, t):
        return sequence_loss(functional_call(model, p, (i[None],)), t[None])[0]

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, targets)
    for j in range(ids.shape[0]):
        model.zero_grad()
        sequence_loss(model(ids[j:j + 1]), targets[j:j + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][j], p.grad, rtol=1e-9, atol=1e-12)


def test_training_lowers_the_loss_and_log_prob_is_minus_the_loss():
    ids, targets = encode(read_fortunes(TINY), 48)
    model = build_model(0, hidden=32, layers=1, heads=2, max_length=48)
    before = -sequence_log_prob(model, ids, targets).mean()
    history = train_lm(model, ids, targets, epochs=6, lr=1e-2, batch_size=8, seed=0)
    after = -sequence_log_prob(model, ids, targets)
    assert after.shape == (ids.shape[0],)
    assert history[-1] < history[0] and after.mean() < 0.8 * before
    with torch.no_grad():
        torch.testing.assert_close(after, sequence_loss(model(ids), targets))


# ---- Kronecker projection of per-sample gradients over token positions ---------------------
def _explicit_grads(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients (n, M), one autograd.grad per sample, in the order of
    ``FunctionalModel`` (the trainable parameters in ``named_parameters`` order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for j in range(x.shape[0]):
        loss = sequence_loss(model(x[j:j + 1]), targets[j:j + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _projected(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, KroneckerProjector]:
    """The core's Kronecker loss features of a sequence model and the projected explicit
    gradients. The targets go in as float64: the feature buffer takes their dtype."""
    fmodel = FunctionalModel(model)
    projector = make_projector(fmodel.num_params, ProjectionSettings(
        dim=dim, structure="kronecker", seed=3), "cpu", torch.float64, fmodel)
    assert isinstance(projector, KroneckerProjector)
    task = Task(model, "regression", loss=sequence_loss)
    feats = loss_features(fmodel, fmodel.state(), x, targets.double(), task, projector,
                          chunk_size=2)
    return feats, projector.project(_explicit_grads(model, x, targets)), projector


class _LinearSequenceModel(nn.Module):
    """Only Linear layers over (n, T, in) inputs: the all-in-layers fast path."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 260, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_kronecker_features_sum_linear_gradients_over_positions():
    torch.manual_seed(0)
    model = _LinearSequenceModel().double()
    x = torch.randn(5, T, 6, dtype=torch.float64)
    _, targets = _data()
    feats, expected, projector = _projected(model, x, targets, dim=64)
    assert projector.all_params_in_layers
    assert feats.shape == (5, projector.dim)
    torch.testing.assert_close(feats, expected, rtol=1e-9, atol=1e-11)


def test_kronecker_features_of_a_transformer_with_embeddings_and_norms(monkeypatch):
    model = _tiny_lm()
    ids, targets = _data()
    fmodel_names = [n for n, _ in model.named_parameters()]
    assert any("embed" in n for n in fmodel_names) and any("norm" in n for n in fmodel_names)
    # the Linear and Embedding layers take the fast path: no per-sample Jacobian of all M
    # parameters
    import iif.engine.features

    def refuse(*args, **kwargs):
        raise AssertionError("full per-sample Jacobians were formed")

    monkeypatch.setattr(iif.engine.features, "per_sample_jacobians", refuse)
    feats, expected, projector = _projected(model, ids, targets, dim=200)
    assert not projector.all_params_in_layers and projector.rest is not None
    # the token embedding, q, k, v, o, gate, up, down and the output head
    assert [layer.embedding for layer in projector.layers] == [True] + [False] * 8
    torch.testing.assert_close(feats, expected, rtol=1e-9, atol=1e-11)
    # the features are not all alike: each document has its own gradient
    assert torch.linalg.matrix_rank(feats) == ids.shape[0]
