"""Pictures: every plot function returns a matplotlib Figure and writes a PNG only when given
a path; the figures carry the prediction, training indices and the completeness sentence."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from iif.views.report import COMPLETENESS_MEANING, plot_proponents_opponents, plot_rankings

pytestmark = pytest.mark.usefixtures("single_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def texts(fig: Figure) -> str:
    """Every piece of text drawn on ``fig`` (titles, labels, notes), one per line."""
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_text())


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.random((12, 16))
    labels = np.arange(12) % 3
    scores = np.linspace(-1.0, 1.0, 12)[rng.permutation(12)]
    return images, labels, scores


def test_proponents_opponents_returns_a_figure_and_saves_only_with_a_path(tmp_path, data,
                                                                          monkeypatch):
    images, labels, scores = data
    monkeypatch.chdir(tmp_path)
    fig = plot_proponents_opponents(images[0], 1, images, labels, scores, k=3, prediction=2)
    assert isinstance(fig, Figure)
    assert list(tmp_path.iterdir()) == []  # nothing written without a path
    text = texts(fig)
    assert "predicted 2" in text and "misclassified" in text
    for i in np.argsort(scores)[:3]:  # the proponents, by training index
        assert f"#{i}  label {labels[i]}" in text
    saved = plot_proponents_opponents(images[0], 1, images, labels, scores,
                                      tmp_path / "sub" / "a.png", k=3)
    assert isinstance(saved, Figure)
    assert (tmp_path / "sub" / "a.png").read_bytes()[:8] == PNG
    assert saved._repr_png_()[:8] == PNG  # a notebook displays the returned figure


def test_completeness_line_is_explained(data):
    images, labels, scores = data
    fig = plot_proponents_opponents(images[0], 1, images, labels, scores, k=2,
                                    completeness={"sum": -0.5, "delta": -1.0, "gap": 0.5})
    text = " ".join(texts(fig).split())  # the sentence is wrapped over lines
    assert "sum of scores -0.5" in text and "gap 0.5" in text
    assert " ".join(COMPLETENESS_MEANING.split()) in text
    plain = plot_proponents_opponents(images[0], 1, images, labels, scores, k=2)
    assert "Completeness check" not in texts(plain)


def test_rankings_returns_a_figure_with_indices_and_note(tmp_path, data):
    images, labels, scores = data
    rows = [("proponents", [{"index": 4, "label": 1, "score": -1.0},
                            {"index": 7, "label": 1, "score": -0.5}]),
            ("opponents", [{"index": 9, "label": 0, "score": 1.0}])]
    fig = plot_rankings(images[0], "Test sample 5 (label 1, predicted 2)", rows, images,
                        note="positive = raises the test loss", warning="be careful")
    assert isinstance(fig, Figure)
    text = texts(fig)
    assert "predicted 2" in text and "positive = raises the test loss" in text
    assert "#4  label 1" in text and "#9  label 0" in text and "be careful" in text
    assert not list(tmp_path.iterdir())
    # the old positional call (path fifth) still writes the file
    again = plot_rankings(images[0], "heading", rows, images, tmp_path / "r.png",
                          image_shape=(4, 4))
    assert isinstance(again, Figure) and (tmp_path / "r.png").read_bytes()[:8] == PNG


def test_no_pyplot_state_is_left_behind(data):
    import matplotlib.pyplot as plt

    images, labels, scores = data
    before = plt.get_fignums()
    plot_proponents_opponents(images[0], 1, images, labels, scores, k=2)
    plot_rankings(images[0], "h", [("r", [{"index": 0, "score": 1.0}])], images)
    assert plt.get_fignums() == before  # nothing to close


def test_image_shape_is_guessed_or_asked_for(data):
    images, labels, scores = data
    odd = np.random.default_rng(1).random((12, 10))  # 10 values: not a square
    with pytest.raises(ValueError, match="image_shape"):
        plot_proponents_opponents(odd[0], 1, odd, labels, scores, k=2)
    fig = plot_proponents_opponents(odd[0], 1, odd, labels, scores, k=2, image_shape=(2, 5))
    assert isinstance(fig, Figure)
