"""Samples with several inputs in the views: no picture of them (a note says so), the text
still lists indices, scores, labels and the model's predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import iif.views.explain as explain_module
import iif.views.show as show_module
from iif import IntegratedInfluence, PathSettings
from iif.results.attribution import Attribution
from iif.task.job import load_job
from iif.views.html_report import report_folder

pytestmark = pytest.mark.usefixtures("single_thread")

JOB = '''
import torch
from torch import nn

from iif import Task


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(9, 3).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, input_ids, attention_mask):
        return self.head((self.emb(input_ids) * attention_mask[..., None]).sum(1))


def job():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (10, 4), generator=gen)
    mask = (torch.rand(10, 4, generator=gen) > 0.3).long()
    y = torch.arange(10) % 2
    return {"task": Task(Tokens(), "classification"),
            "train": ({"input_ids": ids, "attention_mask": mask}, y),
            "test": ({"input_ids": ids[:4], "attention_mask": mask[:4]}, y[:4])}
'''


@pytest.fixture
def spec(tmp_path) -> str:
    path = tmp_path / "tokens_job.py"
    path.write_text(JOB)
    return f"{path}:job"


def _predicted(spec: str) -> list[int]:
    job = load_job(spec)
    (x, _) = job.test
    with torch.no_grad():
        return job.task.model(**x).argmax(1).tolist()


def test_show_lists_the_samples_and_draws_none(tmp_path, spec):
    folder = tmp_path / "result"
    scores = np.random.default_rng(0).normal(size=(4, 10))
    Attribution(scores, "trak").save(folder)
    text = show_module.show(folder, task=spec, test_indices=[1], k=2)
    predicted = _predicted(spec)
    assert len(set(predicted)) == 2
    for i, p in enumerate(predicted):
        assert f"test {i}: label {i % 2}, predicted {p};" in text
    assert "samples with several inputs are not drawn" in text
    j = int(np.argsort(scores[1])[0])
    assert f"#{j} (label {j % 2})" in text
    assert not list(folder.glob("*.png"))
    page = report_folder(folder, task=spec).read_text(encoding="utf-8")
    assert f"predicted {predicted[2]}" in page and "data:image/png" not in page


def test_explain_writes_its_record_and_no_picture(tmp_path, spec):
    job = load_job(spec)
    method = IntegratedInfluence(job.task, job.train, progress=False, path=PathSettings(steps=2))
    text, record = explain_module.explain(method, job.test, 2, tmp_path, k=2)
    assert "(samples with several inputs are not drawn)" in text
    assert record["predicted"] == _predicted(spec)[2]
    assert (tmp_path / "explain_2.json").exists() and not (tmp_path / "explain_2.png").exists()
