"""The language-model experiment at smoke scale on the tiny fortune file of tests/data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iif.errors import InputError
from iif.runs.cli import main
from iif_paper.experiments import lm


def test_smoke_runs_end_to_end_and_writes_its_files(tmp_path):
    assert main(["reproduce", "lm", "--scale", "smoke", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    data = json.loads((tmp_path / "lm.json").read_text())
    assert data["name"] == "lm" and data["scale"] == "smoke"
    assert set(data["results"]) == set(lm.METHODS)
    for row in data["results"].values():
        assert 0.0 <= row["recall@10"] <= 1.0
        assert 0.0 <= row["completion recall@10"] <= 1.0
        assert -1.0 <= row["LDS"] <= 1.0
        assert row["seconds"] > 0
    docs = json.loads((tmp_path / "lm_documents.json").read_text())
    train, queries, planted = docs["train"], docs["queries"], np.array(docs["planted"])
    assert planted.shape == (len(queries), 3) and len(set(planted.ravel())) == planted.size
    for q, (copy, changed, swapped) in zip(queries, planted, strict=True):
        assert train[copy] == q  # the exact copy
        for near in (train[changed], train[swapped]):
            assert near != q and len(near.encode()) == len(q.encode())
            assert sorted(near.split()) == sorted(q.split()) or sum(
                a != b for a, b in zip(near, q, strict=True)) <= 3
    assert not set(queries) & (set(train) - {train[i] for i in planted[:, 0]})
    n_train, n_queries = len(train), len(queries)
    for name in lm.METHODS:
        assert np.load(tmp_path / f"lm_{name.lower()}_queries.npy").shape == (n_queries,
                                                                              n_train)
        assert np.load(tmp_path / f"lm_{name.lower()}_completions.npy").shape == (3, n_train)
    page = (tmp_path / "lm_iif" / "report.html").read_text()
    assert train[planted[0, 0]].split()[0] in page  # the documents are shown as text
    assert (tmp_path / "lm.md").read_text().count("proponents") >= 5


def test_planting_is_deterministic():
    train = [f"document number {i} of the corpus" for i in range(30)]
    queries = ["A watched pot never boils.", "Look before you leap."]
    a, b = lm.plant(train, queries, seed=3), lm.plant(train, queries, seed=3)
    assert a.train == b.train and np.array_equal(a.planted, b.planted)
    assert len(a.train) == len(train) + 6
    assert [d for d in a.train if d.startswith("document")] == train  # order kept
    c = lm.plant(train, queries, seed=4)
    assert c.train != a.train
    assert lm.near_duplicates(queries[0], 3) == lm.near_duplicates(queries[0], 3)


def test_a_missing_corpus_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv(lm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="apt-get install fortunes"):
        lm.run(tmp_path / "out", scale="full")
