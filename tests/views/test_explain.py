"""``iif explain``: the picture carries the prediction, the training indices shown and what
the completeness line means; a regression prediction is the model's output."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_job
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

import iif.views.explain as explain_module
from iif import IntegratedInfluence, PathSettings, Recipe, Task

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    plot = explain_module.plot_rankings
    monkeypatch.setattr(explain_module, "plot_rankings",
                        lambda *a, **kw: figures.append(plot(*a, **kw)) or figures[-1])
    return figures


def _words(fig: Figure) -> str:
    return " ".join(" ".join(t.get_text() for t in fig.findobj(Text)).split())


def test_explain_picture_has_prediction_indices_and_completeness(tmp_path, drawn):
    task, train, test = tiny_job.problem()
    method = tiny_job.method(task, train)
    text, record = explain_module.explain(method, test, 1, tmp_path, k=3, image_shape=(2, 2))
    predicted = int(task.model(torch.as_tensor(test[0][1:2])).argmax(1)[0])
    assert record["predicted"] == predicted
    (fig,) = drawn
    words = _words(fig)
    assert f"predicted {predicted} (p = " in words
    for e in record["rows"]["proponents"] + record["rows"]["opponents"]:
        assert f"#{e['index']} label {e['label']}" in words
    assert "Completeness check: summed over all training samples" in words
    assert (tmp_path / "explain_1.png").read_bytes()[:4] == b"\x89PNG"
    assert f"predicted {predicted}" in text


def test_explain_regression_shows_the_output(tmp_path, drawn):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 1))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 1)).double()
    task = Task(model, "regression", Recipe(lr=0.05, epochs=2, batch_size=4))
    method = IntegratedInfluence(task, (x, y), path=PathSettings(steps=1), progress=False)
    _, record = explain_module.explain(method, (x[:3], y[:3]), 0, tmp_path, k=2,
                                       image_shape=(2, 2))
    with torch.no_grad():
        output = float(model(torch.as_tensor(x[:1]))[0, 0])
    assert record["predicted"] == pytest.approx(output)
    assert f"predicted {output:.4g}" in _words(drawn[0])


def _fallen_back(method, index: int, a: int, b: int):
    """``method.attribute`` answering a contrast whose baseline fell back (theta' = theta*)."""
    from iif.results.attribution import Attribution

    scores = np.random.default_rng(index).normal(size=(1, len(method.train)))
    comp = {"sum": scores.sum(axis=1), "delta": np.zeros(1), "gap": np.full(1, np.nan)}
    info = {"contrast": {"A": [a], "B": [b]}, "fallback_tests": [0]}
    return lambda *args, **kw: Attribution(scores, "iif", {}, comp, info)


def test_contrast_caption_and_fallback_gap(tmp_path, drawn, monkeypatch):
    task, train, test = tiny_job.problem()
    method = tiny_job.method(task, train)
    a = int(task.model(torch.as_tensor(test[0][1:2])).argmax(1)[0])
    b = (a + 1) % 3
    monkeypatch.setattr(method, "attribute", _fallen_back(method, 1, a, b))
    text, _ = explain_module.explain(method, test, 1, tmp_path, contrast=b, k=2,
                                     image_shape=(2, 2))
    caption = (f"samples that push towards {b}: training on them lowered the margin of {a} "
               f"over {b} (log p_{a} {{}} log p_{b}) of this test input, whatever their own "
               f"label")
    assert caption.format("-") in text
    assert "gap no baseline (fallback)" in text and "nan" not in text
    words = _words(drawn[0])
    assert caption.format("\u2212") in words
    assert "no baseline (fallback)" in words and "nan" not in words
