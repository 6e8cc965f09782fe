"""The demo end to end at a tiny size: files exist, parse, and agree with each other."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from iif.errors import InputError
from iif.results.attribution import Attribution
from iif.runs.cli import main
from iif_paper.demo import ATTRIBUTION_DIR, SUMMARY_FILE, choose_test_samples, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    text = io.StringIO()
    summary = run_demo(out, n_test=2, quick=True, progress=False, top_k=3, stream=text)
    return out, summary, text.getvalue()


def test_demo_writes_a_summary_that_parses(demo_run):
    out, summary, text = demo_run
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["settings"]["n_test"] == 2 and len(on_disk["test_samples"]) == 2
    scores = Attribution.load(out / ATTRIBUTION_DIR).scores
    assert scores.shape == (2, on_disk["settings"]["n_train"])
    for s, entry in enumerate(on_disk["test_samples"]):
        assert (out / entry["image"]).stat().st_size > 1000
        assert [e["index"] for e in entry["proponents"]] == list(np.argsort(scores[s])[:3])
        assert all(e["score"] < 0 for e in entry["proponents"])
        assert entry["completeness"]["sum"] == pytest.approx(scores[s].sum())
        assert f"test sample #{entry['index']}" in text
    assert "proponents" in text and "completeness" in text


def test_demo_names_pictures_by_test_index_and_explains_the_mistake(demo_run):
    out, summary, text = demo_run
    samples = summary["test_samples"]
    assert [e["image"] for e in samples] == [f"test_{e['index']}.png" for e in samples]
    assert samples[-1]["index"] > 1  # the mistake's index in the test split, not its slot
    wrong = [e for e in samples if e["prediction"] != e["label"]]
    assert wrong, "the quick demo is expected to explain a misclassified sample"
    for e in samples:
        assert ("contrast" in e) == (e in wrong)
    for e in wrong:
        c = e["contrast"]
        assert (c["A"], c["B"]) == (e["prediction"], e["label"])
        assert len(c["towards_prediction"]) == len(c["towards_label"]) == 3
        pushes_a = [t["score"] for t in c["towards_prediction"]]
        assert pushes_a == sorted(pushes_a, reverse=True) and pushes_a[0] > 0
        assert c["towards_label"][0]["score"] < 0
        # the path's end too: the demo's path models are trained (measure_end)
        assert set(c["completeness"]) == {"sum", "delta", "gap", "delta_path", "gap_path"}
        assert c["image"] == f"test_{e['index']}_contrast.png"
        assert (out / c["image"]).stat().st_size > 1000
        assert f"why {c['A']} and not {c['B']} (the label)?" in text
        # how a sample of label A can push towards B: the caption says what the row means
        assert (f"samples that push towards {c['B']}: training on them lowered the margin of "
                f"{c['A']} over {c['B']}") in text
    assert summary["files"]["contrast_images"] == [e["contrast"]["image"] for e in wrong]
    assert "contrast" in summary["timings"]


def test_cli_demo_exit_codes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--n-test", "1",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "d" / SUMMARY_FILE).read_text())["settings"]["quick"]
    assert main(["demo"]) == 2  # --out missing
    assert main(["demo", "--out", str(tmp_path / "e"), "--n-test", "0"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--quick"]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_demo_rejects_bad_sizes(tmp_path):
    for kwargs in ({"n_test": 0}, {"n_test": 201}, {"top_k": 0}, {"seed": 1.5}):
        with pytest.raises(InputError):
            run_demo(tmp_path, quick=True, **kwargs)


def test_choose_test_samples_ends_at_a_mistake_and_is_consecutive():
    labels = np.array([0, 1, 2, 3, 4, 5])
    assert choose_test_samples(labels, np.array([0, 1, 2, 0, 4, 5]), 3) == [1, 2, 3]
    assert choose_test_samples(labels, np.array([0, 1, 2, 3, 4, 0]), 2) == [4, 5]
    assert choose_test_samples(labels, labels, 3) == [0, 1, 2]
    assert choose_test_samples(labels, np.array([9, 1, 2, 3, 4, 5]), 3) == [0, 1, 2]
    assert choose_test_samples(labels, np.array([0, 1, 2, 0, 4, 5]), 1) == [0]
