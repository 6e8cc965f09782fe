"""The Python examples of the README and docs/tasks.md run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
def test_readme_task_template_runs_with_the_command_line(tmp_path):
    """The README's `mytask.py` is a working task function: `iif attribute` scores it and
    `iif show` reads the result back."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                 if b.startswith("# mytask.py"))
    (tmp_path / "mytask.py").write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "iif"]
    attribute = subprocess.run(
        [*run, "--no-progress", "attribute", "--task", "mytask:build", "--out", "runs/a",
         "--proj-dim", "64", "--threads", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert attribute.returncode == 0, attribute.stderr[-2000:]
    assert (tmp_path / "model.pt").is_file()  # train_cached kept the trained weights
    scores = np.load(tmp_path / "runs" / "a" / "scores.npy")
    assert scores.shape == (4, 1597) and np.isfinite(scores).all()
    show = subprocess.run([*run, "show", "runs/a"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert show.returncode == 0, show.stderr[-2000:]
    assert "test 0" in show.stdout
