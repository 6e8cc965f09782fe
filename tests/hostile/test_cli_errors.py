"""No raw tracebacks from user mistakes: every error through ``iif.runs.cli.main`` is one
``iif: error: ...`` line on stderr and exit code 1, naming the file (and, for the user's own
code, the line and the exception); ``--debug`` adds the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from iif import Attribution
from iif.runs.cli import main

HINT = "; run with --debug for the traceback"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """stderr of ``iif argv``, which must fail with exit code 1 and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def isolated_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.path restored after the test (module specs put the current folder on it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))


# ---- 1. --debug ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_before_the_error_line(where, tmp_path, capsys):
    task = _write(tmp_path, "mytask.py", """
        import os

        x = 1 / 0
        """)
    command = ["attribute", "--task", f"{task}:job", "--out", str(tmp_path / "out")]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert f'File "{task}", line 3, in <module>' in err
    assert err.splitlines()[-1] == (f"iif: error: importing {task} failed: ZeroDivisionError: "
                                    f"division by zero (line 3 of {task})")


def test_debug_also_traces_a_plain_input_error(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nothing"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "InputError" in err
    assert err.splitlines()[-1] == (f"iif: error: {tmp_path / 'nothing'}: no such folder; give "
                                    f"the --out folder of an iif attribute run")


def test_an_unexpected_error_inside_iif_is_one_line(monkeypatch, tmp_path, capsys):
    import functools

    import iif.views.show

    monkeypatch.setattr(iif.views.show, "show", functools.partial(len))  # TypeError from C code
    err = _fails(capsys, ["show", str(tmp_path)])
    assert err.startswith("iif: error: unexpected TypeError: len() takes no keyword arguments "
                          "(line ")
    assert err.endswith(f"cli.py, in _cmd_show); this may be a bug in iif{HINT}\n")
    assert err.count("\n") == 1


# ---- 2. the user's code raising --------------------------------------------------------------
def test_task_file_raising_on_import(tmp_path, capsys):
    task = _write(tmp_path, "mytask.py", """
        import os

        x = 1 / 0
        """)
    err = _fails(capsys, ["attribute", "--task", f"{task}:job", "--out", str(tmp_path / "o")])
    assert err == (f"iif: error: importing {task} failed: ZeroDivisionError: division by zero "
                   f"(line 3 of {task}){HINT}\n")


def test_task_module_raising_on_import(tmp_path, monkeypatch, capsys, isolated_path):
    task = _write(tmp_path, "raising_task_module.py", """
        def helper():
            return {}["missing"]

        helper()
        """)
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, ["attribute", "--task", "raising_task_module:job", "--out", "o"])
    assert err == (f"iif: error: importing raising_task_module failed: KeyError: 'missing' "
                   f"(line 2 of {task}, in helper){HINT}\n")


def test_a_missing_import_inside_the_task_module_is_not_a_missing_module(
        tmp_path, monkeypatch, capsys, isolated_path):
    task = _write(tmp_path, "importing_task_module.py", """
        import no_such_package_for_iif_tests
        """)
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, ["attribute", "--task", "importing_task_module:job", "--out", "o"])
    assert err == (f"iif: error: importing importing_task_module failed: ModuleNotFoundError: "
                   f"No module named 'no_such_package_for_iif_tests' (line 1 of {task})"
                   f"{HINT}\n")


def test_syntax_error_in_task_file(tmp_path, capsys):
    task = _write(tmp_path, "broken.py", """
        import os
        def job(:
            pass
        """)
    err = _fails(capsys, ["attribute", "--task", f"{task}:job", "--out", str(tmp_path / "o")])
    assert err.startswith(f"iif: error: importing {task} failed: SyntaxError: ")
    assert err.endswith(f" (line 2 of {task}){HINT}\n") and err.count("\n") == 1


def test_task_function_raising(tmp_path, capsys):
    task = _write(tmp_path, "mytask.py", """
        import numpy as np

        def job():
            return np.zeros(3).reshape(2, 2)
        """)
    err = _fails(capsys, ["attribute", "--task", f"{task}:job", "--out", str(tmp_path / "o")])
    assert err == (f"iif: error: calling {task}:job failed: ValueError: cannot reshape array of "
                   f"size 3 into shape (2,2) (line 4 of {task}, in job){HINT}\n")


def test_task_function_raising_for_show_pictures(tmp_path, capsys):
    folder = tmp_path / "run"
    Attribution(np.zeros((2, 3)), "trak").save(folder)
    task = _write(tmp_path, "mytask.py", """
        def job():
            raise RuntimeError("no data today")
        """)
    err = _fails(capsys, ["show", str(folder), "--task", f"{task}:job"])
    assert err == (f"iif: error: calling {task}:job failed: RuntimeError: no data today "
                   f"(line 2 of {task}, in job){HINT}\n")


FORWARD = """
    import tiny_job
    from torch import nn

    CALLS = 0


    class Flaky(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            global CALLS
            CALLS += 1
            if CALLS > 5:  # passes the checks at the boundary, fails during attribution
                raise RuntimeError("CUDA out of memory (pretend)")
            return self.inner(x)


    def job():
        task, train, test = tiny_job.problem()
        task.model = Flaky(task.model)
        return task, train, test
    """


def test_forward_pass_raising_during_attribution(tmp_path, capsys):
    task = _write(tmp_path, "flaky.py", FORWARD)
    err = _fails(capsys, ["attribute", "--task", f"{task}:job", "--out", str(tmp_path / "o"),
                          "--method", "trak", "--proj-dim", "8", "--no-progress"])
    assert err == (f"iif: error: the model's forward pass failed: RuntimeError: CUDA out of "
                   f"memory (pretend) (line 16 of {task}, in forward){HINT}\n")


def test_forward_pass_raising_in_explain(tmp_path, capsys):
    task = _write(tmp_path, "flaky.py", FORWARD)
    err = _fails(capsys, ["explain", "--task", f"{task}:job", "--test-index", "0", "--out",
                          str(tmp_path / "o"), "--proj-dim", "8", "--no-progress"])
    assert err == (f"iif: error: the model's forward pass failed: RuntimeError: CUDA out of "
                   f"memory (pretend) (line 16 of {task}, in forward){HINT}\n")


# ---- 3. the console script imports modules from the current folder ---------------------------
def test_console_script_finds_a_module_in_the_current_folder(tmp_path):
    script = Path(sys.executable).with_name("iif")
    if not script.exists():
        pytest.skip("the iif console script is not installed next to this Python")
    task = _write(tmp_path, "cwd_task.py", """
        def job():
            return 1 / 0
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(script), "attribute", "--task", "cwd_task:job", "--out", "o"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    # the module was found and imported: its function ran
    assert run.stderr == (f"iif: error: calling cwd_task:job failed: ZeroDivisionError: "
                          f"division by zero (line 2 of {task}, in job){HINT}\n")


def test_a_missing_module_is_named(tmp_path, monkeypatch, capsys, isolated_path):
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, ["attribute", "--task", "no_such_task_module:job", "--out", "o"])
    assert err == ("iif: error: cannot import 'no_such_task_module' (No module named "
                   "'no_such_task_module'); run from its folder or add it to PYTHONPATH\n")


# ---- 4. malformed result folders -------------------------------------------------------------
GIVE = "give the --out folder of an iif attribute run"
REDO = "remove the folder and run iif attribute again"
RESAVE = "remove the folder and write the result again (iif attribute or Attribution.save)"
REASSEMBLE = ("remove scores.npy and attribution.json and run the same iif attribute command "
              "again (it reassembles them from the finished chunks)")
MANIFEST = {"format": 1, "method": "trak", "n_test": 2, "n_train": 3, "bounds": [0, 1, 2],
            "settings": {}}


def _result(run: Path) -> None:
    Attribution(np.zeros((2, 3)), "trak", {"projection": {"dim": 8}}).save(run)


def _manifest(run: Path, value: object) -> None:
    run.mkdir(exist_ok=True)
    (run / "manifest.json").write_text(json.dumps(value))


def _chunk(run: Path, record: object) -> None:
    _manifest(run, MANIFEST)
    (run / "chunks").mkdir()
    np.save(run / "chunks" / "rows-0000000-0000001.npy", np.zeros((1, 3)))
    (run / "chunks" / "rows-0000000-0000001.json").write_text(json.dumps(record))


def _meta(run: Path, value: object, manifest: bool = False) -> None:
    _result(run)
    if manifest:
        _manifest(run, MANIFEST)
    (run / "attribution.json").write_text(json.dumps(value))


def _scores(run: Path, write: Callable[[Path], object]) -> None:
    _result(run)
    write(run / "scores.npy")


FOLDERS: dict[str, tuple[Callable[[Path], object], str, str]] = {
    # name: (make the folder "run", the file named, what is wrong; remedy)
    "missing": (lambda run: None, "", f"no such folder; {GIVE}"),
    "a file": (lambda run: run.write_text("x"), "", f"a file, not a folder; {GIVE}"),
    "empty": (lambda run: run.mkdir(), "", f"an empty folder; {GIVE}"),
    "no manifest": (lambda run: (run.mkdir(), (run / "notes.txt").write_text("x")), "",
                    f"no manifest.json, scores.npy or attribution.json; {GIVE}"),
    "scores only": (lambda run: (_result(run), (run / "attribution.json").unlink()), "",
                    f"scores.npy without attribution.json; {RESAVE}"),
    "manifest not JSON": (lambda run: (run.mkdir(), (run / "manifest.json").write_text("{")),
                          "manifest.json", "not valid JSON (Expecting property name enclosed "
                          f"in double quotes: line 1 column 2 (char 1)); {REDO}"),
    "manifest a list": (lambda run: _manifest(run, [1, 2]), "manifest.json",
                        f"expected a JSON object, found a list; {REDO}"),
    "manifest a string": (lambda run: _manifest(run, "iif"), "manifest.json",
                          f"expected a JSON object, found a string; {REDO}"),
    "manifest missing keys": (lambda run: _manifest(run, {"method": "iif"}), "manifest.json",
                              f"missing key(s) n_test, n_train, bounds; {REDO}"),
    "manifest bad bounds": (lambda run: _manifest(run, {**MANIFEST, "bounds": "0-2"}),
                            "manifest.json",
                            f"'bounds' is not a list of chunk boundaries; {REDO}"),
    "chunk record a list": (lambda run: _chunk(run, [1]), "chunks/rows-0000000-0000001.json",
                            "not a chunk record (a JSON object with its sha256); remove it and "
                            "its .npy and run the same iif attribute command again (the chunk "
                            "is computed again)"),
    "attribution a list": (lambda run: _meta(run, []), "attribution.json",
                           f"expected a JSON object, found a list; {RESAVE}"),
    "attribution a string": (lambda run: _meta(run, "trak", manifest=True), "attribution.json",
                             f"expected a JSON object, found a string; {REASSEMBLE}"),
    "attribution without method": (lambda run: _meta(run, {"shape": [2, 3]}),
                                   "attribution.json",
                                   f"no method name (key 'method'); {RESAVE}"),
    "attribution wrong shape": (lambda run: _meta(run, {"method": "trak", "shape": [3, 3]}),
                                "attribution.json", "says the scores have shape [3, 3], but "
                                f"scores.npy holds [2, 3]; {RESAVE}"),
    "attribution settings a list": (lambda run: _meta(run, {"method": "trak", "settings": []}),
                                    "attribution.json",
                                    f"'settings' is a list, not a JSON object; {RESAVE}"),
    "attribution bad completeness": (
        lambda run: _meta(run, {"method": "iif", "completeness": {"gap": [0.1]}}),
        "attribution.json",
        f"completeness 'gap' is not a list of 2 numbers (one per test sample); {RESAVE}"),
    "attribution bad info": (
        lambda run: _meta(run, {"method": "iif", "info": {"fallback_tests": "ab"}}),
        "attribution.json",
        "malformed 'info' (ValueError: invalid literal for int() with base 10: 'a'); remove "
        "scores.npy and attribution.json and run the same iif attribute command again"),
    "scores not npy": (lambda run: _scores(run, lambda p: p.write_text("hello")), "scores.npy",
                       f"not a NumPy array file; {RESAVE}"),
    "scores truncated": (lambda run: _scores(run, lambda p: p.write_bytes(p.read_bytes()[:60])),
                         "scores.npy", f"a damaged NumPy file (...); {RESAVE}"),
    "scores 1-d": (lambda run: _scores(run, lambda p: np.save(p, np.zeros(6))), "scores.npy",
                   "holds an array of shape [6], not a (test x training samples) matrix; "
                   f"{RESAVE}"),
    "scores of strings": (lambda run: _scores(run, lambda p: np.save(p, np.array([["a"]]))),
                          "scores.npy", f"holds <U1 values, not numbers; {REASSEMBLE}"),
    "scores a folder": (lambda run: _scores(run, lambda p: (p.unlink(), p.mkdir())),
                        "scores.npy", f"cannot be read (Is a directory); {RESAVE}"),
}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_show_on_a_malformed_folder(name, tmp_path, capsys):
    make, file, problem = FOLDERS[name]
    run = tmp_path / "run"
    make(run)
    if name == "scores of strings":  # the remedy depends on whether a manifest is there
        _manifest(run, MANIFEST)
    err = _fails(capsys, ["show", str(run)])
    expected = f"iif: error: {run / file if file else run}: {problem}\n"
    head, dots, tail = expected.partition("(...)")  # numpy's own words vary by version
    if dots:
        assert err.startswith(head + "(") and err.endswith(")" + tail) and err.count("\n") == 1
    else:
        assert err == expected


def test_show_still_reads_a_well_formed_folder(tmp_path, capsys):
    run = tmp_path / "run"
    _result(run)
    assert main(["show", str(run)]) == 0
    assert "trak, 2 test x 3 training samples" in capsys.readouterr().out
    _chunk(tmp_path / "partial", {"sha256": "0" * 64})
    assert main(["show", str(tmp_path / "partial")]) == 0
    assert "1 of 2 chunks finished" in capsys.readouterr().out


# ---- 5. --out and --settings checked before anything runs ------------------------------------
@pytest.fixture
def marking_task(tmp_path: Path) -> tuple[str, Path]:
    """A task function that leaves a marker file when called."""
    marker = tmp_path / "called"
    task = _write(tmp_path, "marking.py", f"""
        from pathlib import Path

        def job():
            Path({str(marker)!r}).touch()
            raise RuntimeError("the task function ran")
        """)
    return f"{task}:job", marker


@pytest.mark.parametrize("command", ["attribute", "explain"])
def test_out_that_is_a_file(command, marking_task, tmp_path, capsys, monkeypatch):
    spec, marker = marking_task
    monkeypatch.chdir(tmp_path)
    Path("afile.txt").write_text("x")
    extra = ["--test-index", "0"] if command == "explain" else []
    err = _fails(capsys, [command, "--task", spec, "--out", "afile.txt", *extra])
    assert err == ("iif: error: --out afile.txt is a file, not a folder; give a new or existing "
                   "folder\n")
    assert not marker.exists()  # checked before the task function (which may train) runs
    err = _fails(capsys, [command, "--task", spec, "--out", "afile.txt/sub", *extra])
    assert err == (f"iif: error: --out afile.txt/sub: {tmp_path / 'afile.txt'} is a file, not a "
                   f"folder, so the folder cannot be created there\n")
    assert not marker.exists()


@pytest.mark.parametrize("command", [["demo", "--quick"], ["reproduce", "table1"]])
def test_out_that_is_a_file_for_demo_and_reproduce(command, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    out = str(tmp_path / "afile.txt")
    err = _fails(capsys, [*command, "--out", out])
    assert err == (f"iif: error: --out {out} is a file, not a folder; give a new or existing "
                   f"folder\n")


def test_missing_settings_file(marking_task, tmp_path, capsys):
    spec, marker = marking_task
    err = _fails(capsys, ["attribute", "--task", spec, "--out", str(tmp_path / "o"),
                          "--settings", str(tmp_path / "none.toml")])
    assert err == f"iif: error: --settings {tmp_path / 'none.toml'}: no such file\n"
    assert not marker.exists()


def test_fitted_through_a_file_is_refused_before_the_task_runs(marking_task, tmp_path, capsys,
                                                                monkeypatch):
    spec, marker = marking_task
    monkeypatch.chdir(tmp_path)
    Path("afile.txt").write_text("x")
    err = _fails(capsys, ["attribute", "--task", spec, "--out", "out", "--method", "if",
                          "--fitted", "afile.txt/state"])
    assert err == (f"iif: error: --fitted afile.txt/state: {tmp_path / 'afile.txt'} is a file, "
                   f"not a folder, so the folder cannot be created there\n")
    assert not marker.exists()


@pytest.mark.parametrize(("rank", "size", "said"), [
    ("3", "2", "RANK=3 with WORLD_SIZE=2: RANK must be in 0..WORLD_SIZE-1"),
    ("-1", "2", "RANK=-1 with WORLD_SIZE=2: RANK must be in 0..WORLD_SIZE-1"),
    ("0", "0", "WORLD_SIZE=0: it must be at least 1"),
])
def test_impossible_ranks_are_refused_before_the_task_runs(rank, size, said, marking_task,
                                                            tmp_path, capsys, monkeypatch):
    spec, marker = marking_task
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    err = _fails(capsys, ["attribute", "--task", spec, "--out", str(tmp_path / "out"),
                          "--peer-timeout", "30"])
    assert err.startswith(f"iif: error: {said}") and "torchrun" in err and err.count("\n") == 1
    assert not marker.exists()
