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
