"""``iif show`` with ``--task``: the picture carries the model's prediction for the test sample
and the training indices of the samples shown."""

from __future__ import annotations

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
