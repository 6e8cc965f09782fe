"""The library ``iif`` never imports the paper's harness ``iif_paper``; only the commands that
run it (``iif demo``, ``iif reproduce`` and the reproduce help listing the experiments) load it,
inside their functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "iif"
HARNESS = "iif_paper"
# cli.py functions allowed to import the harness, lazily, when the command runs
ALLOWED = {("cli.py", "_cmd_demo"), ("cli.py", "_cmd_reproduce"),
           ("cli.py", "_experiment_names")}

IMPORT_EVERYTHING = f"""
import importlib, pkgutil, sys
import iif
assert {HARNESS!r} not in sys.modules, "import iif"
names = [m.name for m in pkgutil.walk_packages(iif.__path__, "iif.")]
assert "iif.cli" in names and "iif.distributed" in names, names
for name in names:
    if name == "iif.__main__":
        continue  # runs the command line
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m == {HARNESS!r} or m.startswith({HARNESS!r} + "."))
    assert not loaded, f"importing {{name}} imported {{loaded}}"
print(len(names))
"""


def _imports_harness(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == HARNESS or a.name.startswith(HARNESS + ".") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        return node.level == 0 and (module == HARNESS or module.startswith(HARNESS + "."))
    return False


def test_importing_every_core_module_leaves_the_harness_unimported():
    # a fresh interpreter: other tests may have imported iif_paper into this one
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) > 20  # the walk found the package's modules


def test_the_core_imports_the_harness_only_inside_the_cli_commands():
    offending, allowed_seen = [], set()
    files = sorted(SRC.rglob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(SRC).as_posix()
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        inside = {}
        for function in functions:  # innermost function last wins (walk is breadth-first)
            for node in ast.walk(function):
                inside[id(node)] = function.name
        for node in ast.walk(tree):
            if _imports_harness(node):
                where = (rel, inside.get(id(node)))
                if where in ALLOWED:
                    allowed_seen.add(where)
                else:
                    offending.append(f"{rel}:{node.lineno} (in {where[1] or 'module level'})")
    assert not offending, "the library imports iif_paper: " + ", ".join(offending)
    # the commands still load the harness (a rename would otherwise pass silently)
    assert {("cli.py", "_cmd_demo"), ("cli.py", "_cmd_reproduce")} <= allowed_seen


def test_the_experiments_are_in_the_harness_not_the_library():
    for gone in ("experiments", "data", "demo.py"):
        assert not (SRC / gone).exists(), f"src/iif/{gone} belongs to src/iif_paper"
    harness = SRC.parent / HARNESS
    for there in ("experiments/base.py", "data/mnist.py", "demo.py", "lds_job.py"):
        assert (harness / there).is_file(), there
