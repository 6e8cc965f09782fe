"""The Python examples of the README and docs/tasks.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from iif.runs.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TASKS = README.parent / "docs" / "tasks.md"


@pytest.mark.slow
def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.scores.shape == (3, len(namespace["x"]))
    assert result.completeness["gap"].shape == (3,)
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_readme_examples_marked_to_run_do(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if b.startswith("# runs as written")]
    assert blocks, "no README example is marked to run"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_tasks_page_examples_marked_to_run_do(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", TASKS.read_text(), flags=re.S)
              if b.startswith("# runs as written")]
    assert blocks, "no docs/tasks.md example is marked to run"
    for block in blocks:
        exec(compile(block, str(TASKS), "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_readme_task_template_runs_with_the_command_line(tmp_path, monkeypatch, capsys):
    """The README's `mytask.py` is a working task function: `iif attribute` scores it and
    `iif show` reads the result back (in this process, under a module name of its own)."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                 if b.startswith("# mytask.py"))
    (tmp_path / "readme_mytask.py").write_text(block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--no-progress", "attribute", "--task", "readme_mytask:build", "--out",
                 "runs/a", "--proj-dim", "64"]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "model.pt").is_file()  # train_cached kept the trained weights
    scores = np.load(tmp_path / "runs" / "a" / "scores.npy")
    assert scores.shape == (4, 1597) and np.isfinite(scores).all()
    capsys.readouterr()
    assert main(["show", "runs/a"]) == 0
    assert "test 0" in capsys.readouterr().out
