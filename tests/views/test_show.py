"""``iif show`` with ``--task``: the picture carries the model's prediction for the test sample
and the training indices of the samples shown."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tiny_job
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

import iif.views.show as show_module
from iif.results.attribution import Attribution

pytestmark = pytest.mark.usefixtures("single_thread")


def test_show_picture_has_the_prediction_and_indices(tmp_path, monkeypatch):
    task, (x, y), (xt, yt) = tiny_job.problem()
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(tiny_job.N_TEST, len(y)))
    Attribution(scores, "trak").save(tmp_path)
    drawn = []
    plot = show_module.plot_proponents_opponents
    monkeypatch.setattr(show_module, "plot_proponents_opponents",
                        lambda *a, **kw: drawn.append(plot(*a, **kw)) or drawn[-1])
    text = show_module.show(tmp_path, task="tiny_job:job", test_indices=[2], k=3,
                            image_shape=(2, 2))
    with torch.no_grad():
        out = task.model(torch.as_tensor(xt[2:3]))
    predicted = int(out.argmax(1)[0])
    assert f"label {yt[2]}, predicted {predicted} (p=" in text
    assert (tmp_path / "show_2.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    assert isinstance(fig, Figure)
    words = "\n".join(t.get_text() for t in fig.findobj(Text))
    assert f"Test sample #2: label {yt[2]}, predicted {predicted}" in words
    for i in np.argsort(scores[2])[:3]:
        assert f"#{i}  label {y[i]}" in words


def _saved(folder, n_train: int, *, completeness: bool = True, info=None, seed: int = 0):
    """A saved result of ``tiny_job.N_TEST`` test samples with random scores and gaps."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(tiny_job.N_TEST, n_train))
    comp = None
    if completeness:
        delta = rng.uniform(0.5, 2.0, size=tiny_job.N_TEST)
        comp = {"sum": scores.sum(axis=1), "delta": delta,
                "gap": np.abs(scores.sum(axis=1) - delta) / delta}
    result = Attribution(scores, "iif", {}, comp, info or {})
    result.save(folder)
    return result


def _line_of(text: str, i: int) -> str:
    (line,) = [s for s in text.splitlines() if s.startswith(f"  test {i}: ")]
    return line


def test_show_lists_every_test_and_draws_the_first_three(tmp_path):
    task, (x, y), (xt, yt) = tiny_job.problem()
    result = _saved(tmp_path, len(y))
    with torch.no_grad():
        predicted = task.model(torch.as_tensor(xt)).argmax(1).tolist()
    plain = show_module.show(tmp_path)
    text = show_module.show(tmp_path, task="tiny_job:job", k=2, image_shape=(2, 2))
    for i in range(tiny_job.N_TEST):
        (pro, s_pro), = result.proponents(i, 1, with_scores=True)
        (opp, s_opp), = result.opponents(i, 1, with_scores=True)
        gap = f"gap {result.completeness['gap'][i]:.3g}"
        line = _line_of(plain, i)
        assert f"#{pro} {s_pro:+.3g}" in line and f"#{opp} {s_opp:+.3g}" in line
        assert gap in line
        line = _line_of(text, i)
        assert f"label {yt[i]}, predicted {predicted[i]}" in line
        assert f"#{pro} (label {y[pro]}) {s_pro:+.3g}" in line
        assert f"#{opp} (label {y[opp]}) {s_opp:+.3g}" in line and gap in line
    drawn = sorted(p.name for p in tmp_path.glob("show_*.png"))
    assert drawn == ["show_0.png", "show_1.png", "show_2.png"]


def test_a_fallback_test_has_no_baseline_not_a_nan_gap(tmp_path, monkeypatch):
    _, (_, y), _ = tiny_job.problem()
    result = _saved(tmp_path, len(y), info={"fallback_tests": [1]})
    result.completeness["delta"][1] = 0.0
    result.completeness["gap"][1] = np.nan
    result.save(tmp_path)
    drawn = []
    plot = show_module.plot_proponents_opponents
    monkeypatch.setattr(show_module, "plot_proponents_opponents",
                        lambda *a, **kw: drawn.append(plot(*a, **kw)) or drawn[-1])
    text = show_module.show(tmp_path, task="tiny_job:job", test_indices=[1], k=2,
                            image_shape=(2, 2))
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "no baseline (fallback)" in _line_of(text, 1)
    assert "gap no baseline (fallback)" in text.split("test sample 1:", 1)[1]
    (fig,) = drawn
    assert "no baseline (fallback)" in "\n".join(t.get_text() for t in fig.findobj(Text))


def test_show_of_a_contrast_result_explains_its_rows(tmp_path, monkeypatch):
    _, (_, y), _ = tiny_job.problem()
    a, b = [2] * tiny_job.N_TEST, [1] * tiny_job.N_TEST
    result = _saved(tmp_path, len(y), info={"contrast": {"A": a, "B": b}})
    drawn = []
    plot = show_module.plot_rankings
    monkeypatch.setattr(show_module, "plot_rankings",
                        lambda *a, **kw: drawn.append(plot(*a, **kw)) or drawn[-1])
    text = show_module.show(tmp_path, task="tiny_job:job", test_indices=[0], k=2,
                            image_shape=(2, 2))
    (towards_b, _), = result.proponents(0, 1, with_scores=True)
    (towards_a, _), = result.opponents(0, 1, with_scores=True)
    line = _line_of(text, 0)
    assert f"towards 2 #{towards_a}" in line and f"towards 1 #{towards_b}" in line
    caption = "training on them lowered the margin of 2 over 1"
    assert caption in text and "whatever their own label" in text
    assert "proponents" not in text.split("test sample 0:", 1)[1]
    (fig,) = drawn
    words = " ".join(" ".join(t.get_text() for t in fig.findobj(Text)).split())
    assert caption in words and "Proponents" not in words
