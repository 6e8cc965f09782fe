"""The command line: ``iif reproduce`` (every experiment's smoke scale), ``iif attribute``,
``iif show`` and ``iif explain``."""

from __future__ import annotations

import json
import math

import pytest
import tiny_job

from iif.runs.cli import main
from iif_paper.experiments import EXPERIMENTS

REQUIRED = {"name", "scale", "settings", "results", "paper"}
DOCUMENTED = {"stderr", "variants", "variant_stderr", "seconds", "notes", "files"}


def _check_table(table: dict, allow_null: bool) -> None:
    assert isinstance(table, dict) and table
    for method, row in table.items():
        assert isinstance(method, str) and isinstance(row, dict) and row
        for column, value in row.items():
            assert isinstance(column, str)
            if value is None and allow_null:
                continue
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (method,
                                                                                     column)
            assert math.isfinite(value), (method, column)


@pytest.mark.parametrize("name", ["table1", "table4", "fig1"])
def test_reproduce_smoke_writes_json_and_report(name, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", name, "--scale", "smoke", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / f"{name}.json").read_text())
    assert REQUIRED <= set(doc) and set(doc) <= REQUIRED | DOCUMENTED
    assert doc["name"] == name and doc["scale"] == "smoke"
    assert isinstance(doc["settings"], dict) and doc["settings"]
    _check_table(doc["results"], allow_null=False)
    _check_table(doc["paper"], allow_null=True)
    assert set(doc["paper"]) >= set(doc["results"])
    for method, row in doc["results"].items():
        assert set(doc["paper"][method]) == set(row)
    if "stderr" in doc:
        assert set(doc["stderr"]) == set(doc["results"])
    report = (out / f"{name}.md").read_text()
    assert report.startswith("# ") and "Differences from the paper" in report
    for method in doc["results"]:
        assert f"| {method} |" in report
    assert str(out / f"{name}.json") in printed and "IIF" in printed
    if name == "fig1":
        png = out / "fig1.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert "fig1.png" in doc["files"]


def test_paper_numbers_are_the_published_ones(tmp_path):
    assert main(["reproduce", "table1", "--out", str(tmp_path), "--no-progress"]) == 0
    paper = json.loads((tmp_path / "table1.json").read_text())["paper"]
    assert list(paper["IIF"].values()) == [0.859, 0.744, 0.768]
    assert list(paper["IF"].values()) == [0.856, 0.634, 0.423]
    assert list(paper["TracIn"].values()) == [0.815, 0.607, 0.405]
    assert all(v is None for v in paper["datamodel"].values())


def test_reproduce_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    code = main(["reproduce", "nonsense", "--out", str(tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert "nonsense" in err
    for name in EXPERIMENTS:
        assert name in err
    assert not (tmp_path / "x").exists()


def test_reproduce_usage_errors(tmp_path):
    assert main(["reproduce", "table1"]) == 2  # --out missing
    assert main(["reproduce", "table1", "--out", str(tmp_path), "--scale", "huge"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["reproduce", "fig1", "--out", str(tmp_path / "file")]) == 1


def test_attribute_writes_a_resumable_store_equal_to_the_api(tmp_path, capsys):
    import numpy as np
    import tiny_job

    from iif import Attribution

    settings = tmp_path / "s.toml"
    settings.write_text(tiny_job.SETTINGS)
    out = tmp_path / "run"
    args = ["attribute", "--task", "tiny_job:job", "--out", str(out), "--settings",
            str(settings), "--chunk", "4", "--no-progress"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    task, train, test = tiny_job.problem()
    expected = tiny_job.method(task, train).attribute(test)
    got = Attribution.load(out)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-10, atol=1e-14)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["path"]["steps"] == 3 and manifest["bounds"] == [0, 4, 6]
    # the same command again: nothing left to compute, same result
    assert main(args) == 0
    np.testing.assert_array_equal(Attribution.load(out).scores, got.scores)
    # other settings into the same folder: refused with a clear message
    assert main(args + ["--proj-dim", "16"]) == 1
    assert ("different settings (projection.dim: 32 -> 16; projection_dim: 32 -> 16)"
            in capsys.readouterr().err)


def test_show_prints_and_draws(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["attribute", "--task", "tiny_job:job", "--out", str(out), "--method", "trak",
                 "--proj-dim", "16", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--test-index", "0", "2", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "trak, 6 test x 200 training samples" in text
    assert text.count("proponents:") == 2 and "png" not in text
    assert main(["show", str(out), "--task", "tiny_job:job", "--test-index", "1",
                 "--image-shape", "2", "2"]) == 0
    assert (out / "show_1.png").stat().st_size > 1000
    assert main(["show", str(out), "--test-index", "9"]) == 1
    assert "outside 0..5" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 1


def test_attribute_with_fitted_state_saves_then_reuses_it(tmp_path, capsys):
    import numpy as np

    from iif import Attribution

    fitted = tmp_path / "fitted"
    common = ["attribute", "--task", "tiny_job:job", "--method", "trak", "--proj-dim", "16",
              "--fitted", str(fitted), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    saved = {p.name: p.stat().st_mtime_ns for p in fitted.iterdir()}
    assert {"fitted.json", "fitted.safetensors"} <= set(saved)
    assert main(common + ["--out", str(tmp_path / "b")]) == 0  # loads, writes nothing new
    assert {p.name: p.stat().st_mtime_ns for p in fitted.iterdir()} == saved
    np.testing.assert_array_equal(Attribution.load(tmp_path / "a").scores,
                                  Attribution.load(tmp_path / "b").scores)
    capsys.readouterr()
    # the state of other settings is refused by name
    other = [("32" if a == "16" else a) for a in common]
    assert main(other + ["--out", str(tmp_path / "c")]) == 1
    assert "projection" in capsys.readouterr().err


def test_attribute_rejects_bad_jobs(tmp_path, capsys):
    assert main(["attribute", "--task", "tiny_job", "--out", str(tmp_path)]) == 1
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["attribute", "--task", "tiny_job:job", "--out", str(tmp_path),
                 "--method", "tracin"]) == 1
    assert "checkpoints" in capsys.readouterr().err


def test_explain_with_and_without_contrast(tmp_path, capsys):
    out = tmp_path / "explain"
    common = ["explain", "--task", "tiny_job:job", "--out", str(out), "--top", "3",
              "--image-shape", "2", "2", "--no-progress"]
    assert main(common + ["--test-index", "1"]) == 0
    text = capsys.readouterr().out
    assert "proponents:" in text and "opponents:" in text
    assert main(common + ["--test-index", "2", "--contrast", "runner-up"]) == 0
    text = capsys.readouterr().out
    record = json.loads((out / "explain_2.json").read_text())
    a, b = record["contrast"]["A"][0], record["contrast"]["B"][0]
    assert f"why class {a} and not {b}" in text and f"towards {a}:" in text
    assert (out / "explain_2.png").stat().st_size > 1000
    assert record["completeness"]["delta"] > 0  # theta* has the larger margin for A
    assert main(common + ["--test-index", "2", "--contrast", str(a)]) == 1
    assert "equals the predicted class" in capsys.readouterr().err
    assert main(common + ["--test-index", "2", "--contrast", "x"]) == 1
    assert main(common + ["--test-index", "99"]) == 1


# ---- a command line that fails fast ----------------------------------------------------------
def test_help_and_version_import_no_torch():
    """`iif --help` answers without importing torch (the import alone takes seconds on a
    busy machine); the experiments are listed without importing them."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from iif.runs.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert main(['--help']) == 0 and main(['reproduce', '--help']) == 0\n"
            "assert 'table1, table4' in out.getvalue()\n"
            "names = ('torch', 'iif_paper.experiments.table1')\n"
            "print(sorted(m for m in names if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_experiments_are_listed_without_importing_them():
    assert list(EXPERIMENTS) == ["table1", "table4", "fig1", "table2", "table3", "fig2",
                                 "contrast", "lm"]
    assert EXPERIMENTS["fig1"].NAME == "fig1"
    with pytest.raises(KeyError):
        EXPERIMENTS["nope"]


MARKED = """
from pathlib import Path
import tiny_job

def job():
    Path(__file__).with_name("ran").touch()  # the task function ran (it may train a model)
    return tiny_job.job()
"""


@pytest.mark.parametrize("flags, message", [
    (["--settings", "bad.toml"], "unknown setting 'test_bach'; known:"),
    (["--method", "iif", "--solver", "cg"],
     "--solver applies to influence functions (--method if), not to 'iif'"),
    (["--method", "if", "--solver", "exact", "--proj-dim", "8"],
     "solver 'exact' does not project"),
    (["--method", "trak", "--settings", "bad_section.toml"],
     "method 'trak' takes no settings section 'path'"),
    (["--method", "if", "--settings", "bad_value.toml"],
     "trace_probes must be an integer >= 1, got 0"),
])
def test_settings_are_checked_before_the_task_function_runs(flags, message, tmp_path, capsys,
                                                            monkeypatch):
    (tmp_path / "marked.py").write_text(MARKED)
    (tmp_path / "bad.toml").write_text("test_bach = 4\n")
    (tmp_path / "bad_section.toml").write_text("[path]\nsteps = 2\n")
    (tmp_path / "bad_value.toml").write_text("trace_probes = 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["attribute", "--task", "marked:job", "--out", "out", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    if "does not project" not in message:  # a solver/projection clash needs the model
        assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "out").exists()


def test_a_projection_dim_picks_the_projected_solver_for_if(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attribute", "--task", "tiny_job:job", "--out", str(out), "--no-progress",
                 "--method", "if", "--proj-dim", "16"]) == 0
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["solver"] == "projected" and settings["projection_dim"] == 16


def test_progress_flags():
    from iif.runs.cli import build_parser

    parser = build_parser()
    base = ["attribute", "--task", "t:f", "--out", "o"]
    assert parser.parse_args(["--progress", *base]).progress is True
    assert parser.parse_args([*base, "--no-progress"]).progress is False
    assert not hasattr(parser.parse_args(base), "progress")  # auto: decided by the library


def test_attribute_says_a_warning_once(tmp_path, capsys):
    """One chunk: the method's warning is the whole summary, so the command does not repeat
    it; a resumed run computed nothing, so the command says it."""
    out = tmp_path / "run"
    settings = tmp_path / "s.toml"  # baselines that do not move: every test is flagged
    settings.write_text(tiny_job.SETTINGS + "\n[baseline]\nepochs = 0\n")
    args = ["attribute", "--task", "tiny_job:job", "--out", str(out), "--proj-dim", "16",
            "--settings", str(settings), "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert said.count("not a reliable explanation") == 1, said
    assert main(args) == 0  # resumed: nothing computed, nothing logged
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("not a reliable explanation") == 1
    assert "warning: tests 0 (delta 0)" in captured.out
