"""``iif report DIR --html`` and :func:`iif.views.html_report.write_html`: one entry per test sample
with its proponents and opponents, samples drawn as inline images or escaped text, and a page
a real browser renders."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from iif.results.attribution import Attribution
from iif.runs.cli import main
from iif.views.html_report import REPORT_FILE, render_html, write_html

pytestmark = pytest.mark.usefixtures("single_thread")

N_TEST, N_TRAIN, TOP = 4, 20, 3
ENTRY = '<section class="entry"'
DATA_URI = 'src="data:image/png;base64,'
TESTS = Path(__file__).resolve().parents[1]


def _result() -> Attribution:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(N_TEST, N_TRAIN))
    completeness = {"sum": scores.sum(axis=1), "delta": np.full(N_TEST, 2.0),
                    "gap": np.abs(scores.sum(axis=1) - 2.0) / 2.0}
    return Attribution(scores, "iif", {"path": {"steps": 3}, "seed": 0}, completeness,
                       {"run_key": "k" * 16})


def _entries(page: str) -> list[str]:
    return page.split(ENTRY)[1:]


def _images(n: int, side: int = 4) -> np.ndarray:
    """``n`` flat ``side`` x ``side`` images with a bright diagonal on a varied background."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 0.5, size=(n, side, side))
    x[:, np.arange(side), np.arange(side)] = 1.0
    return x.reshape(n, -1)


def test_page_has_an_entry_per_test_sample_with_its_rankings(tmp_path):
    result = _result()
    result.save(tmp_path / "res")
    path = write_html(tmp_path / "res", top=TOP)
    assert path == tmp_path / "res" / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "score &lt; 0 = proponent" in page and "score &gt; 0 = opponent" in page
    assert "k" * 16 in page and "path.steps" in page
    entries = _entries(page)
    assert len(entries) == N_TEST
    for i, entry in enumerate(entries):
        assert f"Test sample #{i}" in entry
        assert f"{result.completeness['sum'][i]:+.4g}" in entry
        pro, opp = entry.split('class="opponents"', 1)
        for j, score in result.proponents(i, TOP, with_scores=True):
            assert f'data-index="{j}" data-score="{score!r}"' in pro
            assert f"{score:+.3g}" in pro
        for j, score in result.opponents(i, TOP, with_scores=True):
            assert f'data-index="{j}" data-score="{score!r}"' in opp
    # without data the samples are named by index only: nothing drawn or printed
    assert "<img" not in page and "<pre" not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_text_samples_are_escaped(tmp_path):
    hostile = '<script>alert("x")</script>'
    train = [f"{hostile} {i}" for i in range(N_TRAIN)]
    test = [f"test <b>{i}</b> & more" for i in range(N_TEST)]
    path = write_html(_result(), tmp_path / "page.html", top=TOP, train_x=train, test_x=test,
                      train_labels=list(range(N_TRAIN)))
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "test &lt;b&gt;0&lt;/b&gt; &amp; more" in page
    assert len(_entries(page)) == N_TEST


def test_decode_prints_token_ids_as_text(tmp_path):
    def ids(text: str) -> torch.Tensor:
        return torch.tensor(list(text.ljust(10).encode()), dtype=torch.long)

    train = torch.stack([ids(f"<i>{i}</i>") for i in range(N_TRAIN)])
    test = torch.stack([ids(f"q{i}") for i in range(N_TEST)])
    page = render_html(_result(), top=TOP, data=_page_data(
        train_x=train, test_x=test, decode=lambda x: bytes(x.tolist()).decode().strip()))
    assert "&lt;i&gt;" in page and "<i>" not in page
    assert '<pre class="text">q0</pre>' in page
    assert "<img" not in page


def _page_data(**kw: object) -> object:
    from iif.views.html_report import PageData

    return PageData(**kw)


def test_images_are_inline_png_data_uris(tmp_path):
    path = write_html(_result(), tmp_path / "page.html", top=TOP, train_x=_images(N_TRAIN),
                      test_x=_images(N_TEST), test_labels=[0, 1, 2, 1], predictions=[0, 1, 1, 1])
    page = path.read_text(encoding="utf-8")
    assert page.count(DATA_URI) == N_TEST * (1 + 2 * TOP)
    first = page.split(DATA_URI, 1)[1].split('"', 1)[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    entries = _entries(page)
    assert "label 2 \u00b7 predicted 1 (misclassified)" in entries[2]
    assert "misclassified" not in entries[0]


def test_cli_report_writes_the_page(tmp_path, capsys):
    _result().save(tmp_path / "res")
    assert main(["report", str(tmp_path / "res"), "--html", "--top", str(TOP)]) == 0
    path = tmp_path / "res" / REPORT_FILE
    assert f"wrote {path}" in capsys.readouterr().out
    assert len(_entries(path.read_text(encoding="utf-8"))) == N_TEST
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(tmp_path / "res"), "--out", str(out)]) == 0
    assert len(_entries(out.read_text(encoding="utf-8"))) == N_TEST


def test_cli_report_shows_the_chosen_test_samples_in_order(tmp_path, capsys):
    _result().save(tmp_path / "res")
    out = tmp_path / "two.html"
    assert main(["report", str(tmp_path / "res"), "--out", str(out), "--test-index", "2",
                 "0"]) == 0
    page = out.read_text(encoding="utf-8")
    assert [e.split('data-test-index="', 1)[1].split('"', 1)[0]
            for e in page.split('class="entry"')[1:]] == ["2", "0"]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "res"), "--test-index", str(N_TEST)]) == 1
    assert f"outside 0..{N_TEST - 1}" in capsys.readouterr().err


def test_cli_report_with_a_task_shows_its_samples(tmp_path, capsys):
    import tiny_job

    _, (_, y), (_, yt) = tiny_job.problem()
    scores = np.random.default_rng(0).normal(size=(tiny_job.N_TEST, len(y)))
    Attribution(scores, "trak").save(tmp_path)
    assert main(["report", str(tmp_path), "--task", "tiny_job:job", "--image-shape", "2", "2",
                 "--top", "2"]) == 0
    page = (tmp_path / REPORT_FILE).read_text(encoding="utf-8")
    assert page.count(DATA_URI) == tiny_job.N_TEST * 5
    entries = _entries(page)
    assert f"label {yt[1]} \u00b7 predicted " in entries[1]
    j = int(np.argsort(scores[1])[0])
    assert f'#{j}</span> <span class="label">label {y[j]}</span>' in entries[1]
    # a decode() in the task's module prints the inputs as text, escaped
    module = tmp_path / "texttask.py"
    module.write_text("from tiny_job import job\n\n"
                      "def decode(x):\n    return '<em>' + str(round(float(x[0]), 1))\n")
    assert main(["report", str(tmp_path), "--task", f"{module}:job", "--out",
                 str(tmp_path / "text.html")]) == 0
    page = (tmp_path / "text.html").read_text(encoding="utf-8")
    assert "&lt;em&gt;" in page and "<em>" not in page and DATA_URI not in page


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_cli_refuses_a_folder_that_is_not_a_result(tmp_path, capsys, content):
    folder = tmp_path / "plain"
    folder.mkdir()
    if content:
        (folder / content).write_text("hello")
    assert main(["report", str(folder), "--html"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iif: error: ") and str(folder) in err[0]
    assert not (folder / REPORT_FILE).exists()


# ---- a real browser ----------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_browser_renders_the_page(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium on PATH or at /usr/bin/chromium: install it (apt-get install "
                    "chromium) to render the page in a headless browser")
    from matplotlib.image import imread

    path = write_html(_result(), tmp_path / "page.html", top=TOP, train_x=_images(N_TRAIN),
                      test_x=_images(N_TEST), train_labels=[i % 3 for i in range(N_TRAIN)])
    url = path.resolve().as_uri()
    png = tmp_path / "shot.png"
    shot = _run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={png}",
                         "--window-size=1200,2000", url)
    assert png.exists(), shot.stderr[-2000:]
    pixels = imread(png)[..., :3]
    assert pixels.std() > 0.05
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.02, f"only {non_white:.3%} of the screenshot is not white"
    dom = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r'<section class="entry"', dom.stdout)) == N_TEST
    assert dom.stdout.count("data:image/png;base64,") == N_TEST * (1 + 2 * TOP)


def test_a_fallback_test_shows_no_baseline_instead_of_nan(tmp_path):
    result = _result()
    result.completeness["delta"][1] = 0.0
    result.completeness["gap"][1] = np.nan
    result.info["fallback_tests"] = [1]
    page = render_html(result, top=TOP)
    entries = _entries(page)
    assert "no baseline (fallback)" in entries[1]
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)
    assert "no baseline" not in entries[0]


def test_a_contrast_page_says_what_its_rows_mean(tmp_path):
    result = _result()
    result.info["contrast"] = {"A": [2, 2, 0, 1], "B": [3, 1, 1, 0]}
    entries = _entries(render_html(result, top=TOP))
    for entry, a, b in zip(entries, result.info["contrast"]["A"], result.info["contrast"]["B"],
                           strict=True):
        assert (f"training on them lowered the margin of {a} over {b} (log p_{a} \u2212 "
                f"log p_{b}) of this test input, whatever their own label") in entry
