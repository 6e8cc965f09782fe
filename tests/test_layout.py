"""The house shows its parts: every module of ``iif`` sits in one part, a part imports only
from the parts below it, no two modules import each other in a circle, and the library never
imports the paper's harness ``iif_paper`` (only the commands that run it, ``iif demo``,
``iif reproduce`` and the reproduce help listing the experiments, load it inside their
functions).

Imports are read from the source (``ast``), wherever they stand: at module level, inside a
function or under ``TYPE_CHECKING``; a lazy import is still an arrow between two rooms.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "iif"
HARNESS = "iif_paper"
# cli.py functions allowed to import the harness, lazily, when the command runs
ALLOWED = {("runs/cli.py", "_cmd_demo"), ("runs/cli.py", "_cmd_reproduce"),
           ("runs/cli.py", "_experiment_names")}

# the parts, bottom to top; each may import from itself and the parts listed with it
GROUND = {"errors", "io", "progress", "validation", "version"}
MAY_IMPORT = {
    "ground": {"ground"},
    "task": {"ground", "task"},
    "engine": {"ground", "task", "engine"},
    "results": {"ground", "task", "engine", "results"},
    "methods": {"ground", "task", "engine", "results", "methods"},
    "evaluation": {"ground", "task", "engine", "results", "evaluation"},
    "views": {"ground", "task", "engine", "results", "methods", "views"},
    "runs": {"ground", "task", "engine", "results", "methods", "evaluation", "views", "runs"},
    # the package itself (its lazy public names) and ``python -m iif``
    "facade": {"ground", "task", "engine", "results", "methods", "evaluation", "views", "runs"},
}

IMPORT_EVERYTHING = f"""
import importlib, pkgutil, sys
import iif
assert {HARNESS!r} not in sys.modules, "import iif"
assert "torch" not in sys.modules, "import iif imported torch"
names = [m.name for m in pkgutil.walk_packages(iif.__path__, "iif.")]
assert "iif.runs.cli" in names and "iif.runs.distributed" in names, names
for name in names:
    if name == "iif.__main__":
        continue  # runs the command line
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m == {HARNESS!r} or m.startswith({HARNESS!r} + "."))
    assert not loaded, f"importing {{name}} imported {{loaded}}"
print(len(names))
"""


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    """The part a module of ``iif`` belongs to; None for one that belongs to none."""
    rest = module.split(".")[1:]
    if not rest or rest == ["__main__"]:
        return "facade"
    if len(rest) == 1 and rest[0] in GROUND:
        return "ground"
    if len(rest) >= 1 and rest[0] in MAY_IMPORT and rest[0] not in ("ground", "facade"):
        return rest[0] if (len(rest) > 1 or (SRC / rest[0]).is_dir()) else None
    return None


def imports_of(path: Path, src: Path, modules: set[str]) -> list[tuple[str, int]]:
    """The ``iif`` modules ``path`` imports anywhere in it, with the line: ``from iif.a import
    b`` is the module ``iif.a.b`` when that is a module, else ``iif.a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, src)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]  # ``import iif.a.b`` names iif.a.b
            if target in modules and target != me:
                found.append((target, node.lineno))
    return found


def graph(src: Path) -> dict[str, list[tuple[str, int]]]:
    files = sorted(src.rglob("*.py"))
    modules = {module_name(p, src) for p in files}
    return {module_name(p, src): imports_of(p, src, modules) for p in files}


def layout_problems(src: Path) -> list[str]:
    """Every module outside a part, every arrow a part may not draw, and every circle."""
    edges = graph(src)
    problems = [f"{m} belongs to no part (move it into a part's folder)"
                for m in sorted(edges) if part_of(m) is None]
    for m, targets in sorted(edges.items()):
        mine = part_of(m)
        for target, line in targets:
            theirs = part_of(target)
            if mine is None or theirs is None:
                continue
            if theirs == "facade" and mine != "facade":
                problems.append(f"{m}:{line} imports the package facade iif; import the "
                                f"module that defines the name")
            elif theirs not in MAY_IMPORT[mine]:
                problems.append(f"{m}:{line} ({mine}) imports {target} ({theirs})")
    problems += [f"import circle: {' -> '.join(c + [c[0]])}" for c in circles(edges)]
    return problems


def circles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), a package's
    ``__init__`` importing its own modules included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_part_and_imports_only_the_parts_below_it():
    problems = layout_problems(SRC)
    assert not problems, "\n".join(problems)


def test_every_part_is_a_folder_whose_docstring_says_what_it_does():
    for part in MAY_IMPORT:
        if part in ("ground", "facade"):
            continue
        init = SRC / part / "__init__.py"
        assert init.is_file(), f"src/iif/{part}/ is a part and needs an __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"src/iif/{part}/__init__.py says what the part does"


def _write(root: Path, files: dict[str, str]) -> Path:
    src = root / "iif"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_the_rules_catch_a_part_reaching_up_a_circle_and_a_stray_module(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "stray.py": "",  # at the top but not on the ground floor
        "task/__init__.py": "",
        "task/task.py": "from iif.task import data\n",
        "task/data.py": "def f():\n    from iif.task.task import Task\n",  # a lazy circle
        "engine/__init__.py": "",
        "engine/engine.py": "from iif.methods.integrated import baseline\n",  # reaches up
        "methods/__init__.py": "",
        "methods/integrated/__init__.py": "",
        "methods/integrated/baseline.py": "import iif\nfrom iif.engine.engine import x\n",
    })
    problems = "\n".join(layout_problems(src))
    assert "iif.stray belongs to no part" in problems
    assert ("iif.engine.engine:1 (engine) imports iif.methods.integrated.baseline (methods)"
            in problems)
    assert "import circle: iif.task.data -> iif.task.task -> iif.task.data" in problems
    assert "iif.methods.integrated.baseline:1 imports the package facade iif" in problems
    assert "errors" not in problems


@pytest.mark.parametrize("part", ["task", "engine", "results"])
def test_a_lower_part_imports_no_method(part):
    modules = set(graph(SRC))  # once: it parses the whole package
    for path in sorted((SRC / part).rglob("*.py")):
        for target, line in imports_of(path, SRC, modules):
            assert not target.startswith("iif.methods"), f"{path}:{line} imports {target}"


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
    assert {("runs/cli.py", "_cmd_demo"), ("runs/cli.py", "_cmd_reproduce")} <= allowed_seen


def test_the_experiments_are_in_the_harness_not_the_library():
    for gone in ("experiments", "data", "demo.py"):
        assert not (SRC / gone).exists(), f"src/iif/{gone} belongs to src/iif_paper"
    harness = SRC.parent / HARNESS
    for there in ("experiments/base.py", "data/mnist.py", "demo.py", "lds_job.py"):
        assert (harness / there).is_file(), there
