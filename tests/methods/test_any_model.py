"""Models whose forward cannot run under ``torch.func.vmap`` (data-dependent control flow, a
Hugging Face attention mask with padding) are attributed through module hooks: the engine
decides once with a probe, says so in one INFO line and in ``result.info``, trains copies one
by one instead of stacked, and gives the scores the vmap route gives on an equal model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import iif
from iif import InfluenceFunction, IntegratedInfluence, PathSettings, ProjectionSettings, Task


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(3, 6).double(), nn.Linear(6, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


class Branchy(Plain):
    """The same function as :class:`Plain`, through a branch on the data: a Python ``if``
    on a tensor, which ``vmap`` cannot trace."""

    def forward(self, x):
        if bool((x.abs() > 1e6).any()):  # never taken on these data
            x = x.clamp(-1e6, 1e6)
        return super().forward(x)


def _data(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


METHODS = {
    "iif": lambda task, train: IntegratedInfluence(task, train, progress=False,
                                                   path=PathSettings(steps=2)),
    "iif-projected": lambda task, train: IntegratedInfluence(
        task, train, progress=False, path=PathSettings(steps=2),
        projection=ProjectionSettings(dim=12)),
    "if": lambda task, train: InfluenceFunction(task, train, progress=False),
    "trak": lambda task, train: iif.TRAK(task, train, progress=False),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_forward_that_vmap_cannot_run_gives_the_scores_of_an_equal_model(name, caplog):
    train, test = _data(), _data(4, seed=1)
    plain = METHODS[name](Task(Plain(), "classification"), train).attribute(test)
    with caplog.at_level(logging.INFO, logger="iif.engine.grads"):
        branchy = METHODS[name](Task(Branchy(), "classification"), train).attribute(test)
    assert plain.info["gradient_route"] == "vmap"
    assert branchy.info["gradient_route"] == "hooks"
    assert "cannot run under torch.func.vmap" in branchy.info["gradient_route_note"]
    said = [r.getMessage() for r in caplog.records if "module hooks" in r.getMessage()]
    assert len(said) == 1 and "hooks for 4 of 4 parameters (linear 4)" in said[0]
    assert "vmap: It looks like" not in caplog.text  # torch's own error is never shown
    np.testing.assert_allclose(branchy.scores, plain.scores, rtol=1e-7,
                               atol=1e-10 * np.abs(plain.scores).max())


def test_a_masked_hugging_face_classifier_is_attributed_without_a_wrapper_of_its_outputs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=8, num_labels=2)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.bert = transformers.BertForSequenceClassification(cfg).double().eval()

        def forward(self, ids):  # padding (id 0) masked out, the model's own output returned
            return self.bert(input_ids=ids, attention_mask=(ids != 0).long())

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (12, 6), generator=gen)
    ids[::3, 4:] = 0
    labels = (ids[:, 0] > 10).long()
    task = Task(Masked(), "classification")
    for method in (IntegratedInfluence(task, (ids, labels), progress=False,
                                       path=PathSettings(steps=2)),
                   iif.TRAK(task, (ids, labels), progress=False)):
        result = method.attribute((ids[:2], labels[:2]))
        assert result.scores.shape == (2, 12) and np.isfinite(result.scores).all()
        assert result.info["gradient_route"] == "hooks"
        assert np.abs(result.scores).max() > 0


# ---- samples with several inputs -------------------------------------------------------------
class Texts(torch.utils.data.Dataset):
    """Tokenised texts padded to one length, as a tokenizer's dictionaries."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def _bert_and_texts():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=8, num_labels=2)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (12, 6), generator=gen)
    ids[::3, 4:] = 0  # padding
    mask = (ids != 0).long()
    return bert, ids, mask, (ids[:, 0] > 10).long()


def test_a_hugging_face_classifier_takes_dictionary_batches_with_their_attention_mask():
    from iif.results.runkey import run_key

    bert, ids, mask, labels = _bert_and_texts()
    task = Task(bert, "classification")
    train = torch.utils.data.DataLoader(Texts(ids, mask, labels), batch_size=5)
    test = torch.utils.data.DataLoader(Texts(ids[:3], mask[:3], labels[:3]), batch_size=2)
    methods = [IntegratedInfluence(task, train, progress=False, path=PathSettings(steps=2)),
               InfluenceFunction(task, train, progress=False),
               iif.TRAK(task, train, progress=False)]
    for method in methods:
        result = method.attribute(test)
        assert result.scores.shape == (3, 12) and np.isfinite(result.scores).all()
        assert np.abs(result.scores).max() > 0
    # the engine's per-sample gradients are those of the model called with both keywords
    method = methods[1]
    got = method.engine.per_sample_grads(method.state, method.train.x, method.train.targets)
    params = [p for p in bert.parameters() if p.requires_grad]
    for i in range(len(labels)):
        logits = bert(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        loss = -torch.log_softmax(logits, -1)[0, labels[i]]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        want = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for p, g in zip(params, grads, strict=True)])
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-12)
    assert method.engine.gradient_route() == "hooks"
    # one training sample's mask changes its gradients, the scores and the run key
    unmasked = mask.clone()
    unmasked[0] = 1
    other = InfluenceFunction(task, torch.utils.data.DataLoader(
        Texts(ids, unmasked, labels), batch_size=5), progress=False)
    before, after = method.attribute(test).scores, other.attribute(test).scores
    assert np.abs(before[:, 0] - after[:, 0]).min() > 1e-8
    keys = [run_key(m, m.validate_test(test)) for m in (method, other)]
    assert keys[0].differences(keys[1].parts) == ["training data"]


class Halves(nn.Module):
    """:class:`Plain` on the concatenation of two inputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(torch.cat([a, b], dim=-1))


class Pieces(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, keywords: bool):
        self.x, self.y, self.keywords = x, y, keywords

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        a, b = self.x[i, :1], self.x[i, 1:]
        return {"a": a, "b": b, "label": self.y[i]} if self.keywords else (a, b, self.y[i])


# and the Kronecker fast path, whose B copies' features are stacked under vmap
SEVERAL = {**METHODS, "iif-kronecker": lambda task, train: IntegratedInfluence(
    task, train, progress=False, path=PathSettings(steps=2),
    projection=ProjectionSettings(dim=12, structure="kronecker"))}


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("name", list(SEVERAL))
def test_two_inputs_give_the_scores_of_one_model_on_their_concatenation(name, form):
    import copy

    (x, y), (xt, yt) = _data(), _data(4, seed=1)
    keywords = form == "dict"
    whole = SEVERAL[name](Task(Plain(), "classification"), (x, y)).attribute((xt, yt))
    loader = torch.utils.data.DataLoader(Pieces(x, y, keywords), batch_size=5)
    task = Task(Halves(copy.deepcopy(Plain())), "classification")
    halves = SEVERAL[name](task, loader).attribute(
        torch.utils.data.DataLoader(Pieces(xt, yt, keywords), batch_size=3))
    assert halves.info["gradient_route"] == "vmap"
    assert np.abs(whole.scores).max() > 0
    np.testing.assert_allclose(halves.scores, whole.scores, rtol=1e-9,
                               atol=1e-12 * np.abs(whole.scores).max())


class Masked(nn.Module):
    """Embedded tokens summed under a mask; ``packed`` takes ids and mask as one tensor."""

    def __init__(self, packed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.packed = nn.Embedding(9, 3).double(), \
            nn.Linear(3, 2).double(), packed

    def forward(self, input_ids, attention_mask=None):
        if self.packed:
            input_ids, attention_mask = input_ids[:, 0], input_ids[:, 1]
        return self.head((self.emb(input_ids) * attention_mask[..., None]).sum(1))


@pytest.mark.parametrize("name", ["trak-kronecker", "iif-kronecker", "if"])
def test_keyword_inputs_reach_the_parameters_outside_the_projected_layers(name):
    make = {"trak-kronecker": lambda task, train: iif.TRAK(
                task, train, progress=False,
                projection=ProjectionSettings(dim=8, structure="kronecker")),
            "iif-kronecker": SEVERAL["iif-kronecker"], "if": METHODS["if"]}[name]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 9, (10, 4), generator=gen)
    mask = (torch.rand(10, 4, generator=gen) > 0.3).long()
    labels = torch.arange(10) % 2
    packed = make(Task(Masked(packed=True), "classification"),
                  (torch.stack([ids, mask], 1), labels)).attribute(
                      (torch.stack([ids[:3], mask[:3]], 1), labels[:3]))
    texts = torch.utils.data.DataLoader(Texts(ids, mask, labels), batch_size=4)
    keywords = make(Task(Masked(), "classification"), texts).attribute(
        torch.utils.data.DataLoader(Texts(ids[:3], mask[:3], labels[:3]), batch_size=2))
    assert np.abs(packed.scores).max() > 0
    np.testing.assert_allclose(keywords.scores, packed.scores, rtol=1e-9,
                               atol=1e-12 * np.abs(packed.scores).max())


class PlainNorm(Plain):
    """:class:`Plain` with a LayerNorm between its layers: parameters outside the Linears."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6).double()
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
            self.norm.bias.copy_(torch.linspace(-0.2, 0.3, 6))

    def forward(self, x):
        return self.lin2(torch.tanh(self.norm(self.lin1(x))))


class BranchyNorm(PlainNorm):
    def forward(self, x):
        if bool((x.abs() > 1e6).any()):  # never taken on these data
            x = x.clamp(-1e6, 1e6)
        return super().forward(x)


def test_kronecker_features_with_parameters_outside_the_layers_on_the_hooks_route():
    """The kronecker fast path keeps its layers on the hooks route and takes the other
    parameters' (LayerNorm's) Jacobians from hooks too: the features equal those of the same
    model on the vmap route."""
    from iif.engine.features import projected_jacobians
    from iif.engine.functional import FunctionalModel
    from iif.engine.grads import sample_loss_fn
    from iif.engine.projection import make_projector

    x, y = _data()
    feats = {}
    for model in (PlainNorm(), BranchyNorm()):
        task = Task(model, "classification")
        data = task.validate((x, y))
        fmodel = FunctionalModel(model)
        state = fmodel.state()
        projector = make_projector(fmodel.num_params, ProjectionSettings(
            dim=24, structure="kronecker", seed=1), "cpu", torch.float64, fmodel)
        assert projector.rest is not None  # the LayerNorm's weight and bias
        feats[type(model).__name__] = torch.cat([f for _, f in projected_jacobians(
            fmodel, state, data.x, sample_loss_fn(task), data.targets, projector=projector,
            chunk_size=5)])
        assert fmodel.route == ("hooks" if isinstance(model, BranchyNorm) else "vmap")
    torch.testing.assert_close(feats["BranchyNorm"], feats["PlainNorm"], rtol=1e-10,
                               atol=1e-12)
