"""Progress: tqdm bars with totals on a terminal, periodic log lines with count, total,
percent and ETA anywhere else, nothing with progress=False."""

from __future__ import annotations

import ast
import contextlib
import logging
from pathlib import Path

import pytest
import tiny_job

import iif.progress as progress
from iif import IntegratedInfluence, PathSettings, ProjectionSettings
from iif.progress import INTERVAL, Progress, interval, progress_bar, progress_default
from iif.results.store import attribute_to

SRC = Path(__file__).resolve().parents[1] / "src" / "iif"


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def lines(caplog, monkeypatch):
    """The progress lines logged, on a stderr that is not a terminal, also after the command
    line stopped the ``iif`` loggers propagating."""
    monkeypatch.setattr(logging.getLogger("iif"), "propagate", True)
    monkeypatch.setattr(progress.sys, "stderr", _Stream(tty=False))
    caplog.set_level(logging.INFO, logger="iif.progress")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "iif.progress"]

    return logged


@pytest.fixture
def clock(monkeypatch):
    """A fake clock: ``clock[0]`` seconds."""
    now = [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    return now


def test_not_a_terminal_logs_count_total_percent_and_eta_every_interval(lines, clock,
                                                                        monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "25")
    monkeypatch.setattr(progress, "tqdm", _no_tqdm)
    for _ in progress_bar(range(10), total=10, desc="work"):
        clock[0] += 10.0
    assert lines() == [
        "work 3/10 (30%, ETA 1m 10s)",  # the first line an interval after the start
        "work 6/10 (60%, ETA 40s)",
        "work 9/10 (90%, ETA 10s)",
        "work 10/10 (100%) done in 1m 40s",  # and one at the end
    ]


def test_default_interval_and_its_environment_variable(monkeypatch, caplog):
    monkeypatch.delenv("IIF_PROGRESS_INTERVAL", raising=False)
    assert interval() == INTERVAL == 10.0
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    assert interval() == 0.0
    monkeypatch.setattr(progress, "_warned", set())
    for bad in ("soon", "-1", "nan", "soon"):
        monkeypatch.setenv("IIF_PROGRESS_INTERVAL", bad)
        assert interval() == INTERVAL
    warned = [r.getMessage() for r in caplog.records if "IIF_PROGRESS_INTERVAL" in r.getMessage()]
    assert len(warned) == 3  # once for each value, not at every loop


def test_nested_loops_share_one_line_and_only_the_outermost_logs_its_end(lines, clock,
                                                                         monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    for _ in progress_bar(["a", "b"], total=2, desc="chunks"):
        for _ in progress_bar([[1, 2], [3]], total=3, desc="inner", unit="samples", size=len):
            clock[0] += 1.0
    got = lines()
    assert got[0] == "chunks 0/2 (0%, ETA ?) > inner 2/3 samples (67%, ETA 0s)"
    assert got[1] == "chunks 0/2 (0%, ETA ?) > inner 3/3 samples (100%, ETA 0s)"
    assert got[2] == "chunks 1/2 (50%, ETA 2s)"
    assert [line for line in got if "done" in line] == ["chunks 2/2 (100%) done in 4s"]


def test_an_interval_limits_nested_loops_together(lines, clock, monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "30")
    for _ in progress_bar(range(4), total=4, desc="outer"):
        for _ in progress_bar(range(100), total=100, desc="inner"):
            clock[0] += 1.0  # 400 s in all: a line every 30 s, not one per inner loop
    got = lines()
    assert len(got) == 400 // 30 + 1
    assert got[-1] == "outer 4/4 (100%) done in 6m 40s"


def test_progress_false_reports_nothing(lines, monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(progress, "tqdm", _no_tqdm)
    for tty in (False, True):
        monkeypatch.setattr(progress.sys, "stderr", _Stream(tty=tty))
        assert list(progress_bar(range(5), total=5, desc="quiet", enable=False)) == \
            list(range(5))
    assert lines() == []


def test_a_terminal_gets_a_tqdm_bar_with_its_total_and_no_log_lines(lines, monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(progress.sys, "stderr", _Stream(tty=True))
    bars = []

    class FakeTqdm:
        def __init__(self, **kwargs):
            self.kwargs, self.n, self.closed = kwargs, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(progress, "tqdm", FakeTqdm)
    for enable in (None, True):
        assert list(progress_bar(iter([[1, 2], [3]]), total=3, desc="features", enable=enable,
                                 unit="samples", size=len)) == [[1, 2], [3]]
    assert [b.kwargs["total"] for b in bars] == [3, 3]
    assert all(b.kwargs["desc"] == "features" and b.n == 3 and b.closed for b in bars)
    assert lines() == []


def test_auto_is_silent_where_logging_shows_nothing_and_true_writes_to_stderr(
        monkeypatch, capsys, clock):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(progress, "_shown", lambda: False)  # logging set up, showing no INFO
    monkeypatch.setattr(progress, "_unconfigured", lambda: False)
    monkeypatch.setattr(progress, "interactive", lambda: False)
    list(progress_bar(range(2), total=2, desc="auto"))
    assert capsys.readouterr().err == ""
    list(progress_bar(range(2), total=2, desc="asked", enable=True))
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "iif.progress: asked 2/2 (100%) done in 0s"
    assert "iif.progress: asked 1/2 (50%, ETA 0s)" in err


def test_short_loops_failures_and_the_context_manager(lines, clock, monkeypatch):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "100")
    assert list(progress_bar(range(3), total=3, desc="quick")) == [0, 1, 2]
    assert lines() == []  # shorter than an interval: not worth a line
    with Progress(4, "by hand") as bar:
        bar.update(3)
        clock[0] += 100.0
        bar.update(1)
    with pytest.raises(RuntimeError), Progress(4, "failing") as bar:
        clock[0] += 200.0
        raise RuntimeError
    with pytest.raises(RuntimeError):
        for _ in progress_bar(range(4), total=4, desc="failing loop"):
            clock[0] += 200.0
            raise RuntimeError
    # no end line for a failure
    assert lines() == ["by hand 4/4 (100%, ETA 0s)", "by hand 4/4 (100%) done in 1m 40s"]
    assert progress._open() == []  # nothing left open


def test_progress_default_governs_none_within_a_block(lines, monkeypatch, capsys):
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(progress, "tqdm", _no_tqdm)
    with progress_default(False):  # e.g. the command line's --no-progress
        list(progress_bar(range(3), total=3, desc="task training"))
        list(progress_bar(range(3), total=3, desc="asked", enable=True))
    assert lines() == ["asked 1/3 (33%, ETA 0s)", "asked 2/3 (67%, ETA 0s)",
                       "asked 3/3 (100%, ETA 0s)", "asked 3/3 (100%) done in 0s"]
    monkeypatch.setattr(progress, "_shown", lambda: False)
    with progress_default(True):  # --progress: shown even where logging shows nothing
        list(progress_bar(range(1), total=1, desc="forced"))
    assert "iif.progress: forced 1/1 (100%) done in 0s" in capsys.readouterr().err


def test_every_progress_bar_in_the_package_has_a_total():
    calls = 0  # the library and the paper's harness beside it
    for path in sorted([*SRC.rglob("*.py"), *SRC.with_name("iif_paper").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "progress_bar", "Progress", "tqdm")):
                continue
            if path.name == "progress.py" and getattr(node.func, "id", None) == "tqdm":
                continue
            calls += 1
            index = 1 if node.func.id == "progress_bar" else 0
            total = next((k.value for k in node.keywords if k.arg == "total"),
                         node.args[index] if len(node.args) > index else None)
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
            assert total is not None, f"{where}: no total"
            assert not (isinstance(total, ast.Constant) and total.value is None), \
                f"{where}: total=None"
    assert calls >= 10


@pytest.fixture(scope="module")
def problem():
    return tiny_job.problem()


def test_a_store_run_logs_its_loops_with_totals(problem, tmp_path, lines, monkeypatch):
    task, train, test = problem
    monkeypatch.setenv("IIF_PROGRESS_INTERVAL", "0")
    method = IntegratedInfluence(task, train, path=PathSettings(steps=2), progress=None,
                                 projection=ProjectionSettings(dim=16), test_batch=1)
    attribute_to(tmp_path, method, test, chunk=3)
    got = lines()
    segments = [s for line in got for s in line.split(" > ")]
    for desc, total in (("chunks", 2), ("IIF test samples", 3), ("IIF path steps", 2),
                        ("features k=2", "200 samples")):
        assert any(s.startswith(f"{desc} ") and f"/{total}" in s for s in segments), desc
    assert all("ETA" in s or "done in" in s for s in segments)
    assert got[-1].startswith("chunks 2/2 (100%) done in ")
    assert sum("done in" in line for line in got) == 1
    # progress=False: nothing
    method.progress = False
    attribute_to(tmp_path / "quiet", method, test, chunk=3, progress=False)
    assert lines() == got


@contextlib.contextmanager
def _no_logging_configured():
    """As in a script that set up no logging: no handler on the ``iif`` loggers or the root
    (pytest's own, added for each test, are put back after), no level set on ``iif``."""
    loggers = [logging.getLogger(name) for name in ("iif.progress", "iif")] + [logging.root]
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers.clear()  # in place: pytest takes its handlers out of this same list
        lg.propagate = True
    for lg in loggers[:2]:
        lg.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.fixture
def script(monkeypatch, clock, capsys):
    """Run a loop as a script whose stderr goes to a file: ``script(steps, seconds per step,
    handler=, root_level=, iif_level=, **progress_bar keywords)`` -> the lines it wrote to
    stderr; ``handler`` is added to the root logger, as ``logging.basicConfig`` would."""
    monkeypatch.delenv("IIF_PROGRESS_INTERVAL", raising=False)
    monkeypatch.delenv("IIF_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "tqdm", _no_tqdm)
    monkeypatch.setattr(progress, "_warned", set())
    capsys.readouterr()

    def run(steps: int, seconds: float, handler: logging.Handler | None = None,
            root_level: int = logging.WARNING, iif_level: int = logging.NOTSET,
            **kwargs) -> list[str]:
        with _no_logging_configured():
            if handler is not None:
                logging.root.addHandler(handler)
            logging.root.setLevel(root_level)
            logging.getLogger("iif").setLevel(iif_level)
            for _ in progress_bar(range(steps), total=steps, desc="IIF path steps", **kwargs):
                clock[0] += seconds
        return capsys.readouterr().err.splitlines()

    return run


def test_a_script_without_logging_reports_count_percent_and_eta_on_stderr(script):
    assert not progress.interactive()  # stderr captured: not a terminal
    err = script(20, 4.0)  # 80 s, a line every INTERVAL (10 s), never one per step
    assert err == [
        "iif.progress: IIF path steps 3/20 (15%, ETA 1m 08s)",
        "iif.progress: IIF path steps 6/20 (30%, ETA 56s)",
        "iif.progress: IIF path steps 9/20 (45%, ETA 44s)",
        "iif.progress: IIF path steps 12/20 (60%, ETA 32s)",
        "iif.progress: IIF path steps 15/20 (75%, ETA 20s)",
        "iif.progress: IIF path steps 18/20 (90%, ETA 8s)",
        "iif.progress: IIF path steps 20/20 (100%) done in 1m 20s",
    ]
    assert script(3, 1.0) == []  # shorter than an interval: not worth a line


def test_a_script_silences_progress_with_false_or_its_environment_variable(script,
                                                                           monkeypatch):
    assert script(20, 4.0, enable=False) == []
    with progress_default(False):  # what the command line's --no-progress sets
        assert script(20, 4.0) == []
    for off in ("0", "false", "off", "NO"):
        monkeypatch.setenv("IIF_PROGRESS", off)
        assert script(20, 4.0) == []
    monkeypatch.setenv("IIF_PROGRESS", "1")
    assert len(script(20, 4.0)) == 7
    monkeypatch.setenv("IIF_PROGRESS", "maybe")  # not a switch: said so once, and auto
    err = script(20, 4.0)
    assert "IIF_PROGRESS='maybe'" in err[0] and len(err) == 8
    assert len(script(20, 4.0)) == 7


def test_a_script_silences_progress_with_a_level_on_the_iif_logger(script):
    assert script(20, 4.0, iif_level=logging.WARNING) == []
    assert len(script(20, 4.0, iif_level=logging.INFO)) == 7


def test_with_logging_configured_the_lines_are_info_records_not_stderr(script):
    records = _Records()
    assert script(20, 4.0, handler=records, root_level=logging.INFO) == []
    assert records.lines[0] == "INFO iif.progress: IIF path steps 3/20 (15%, ETA 1m 08s)"
    assert records.lines[-1] == "INFO iif.progress: IIF path steps 20/20 (100%) done in 1m 20s"
    assert len(records.lines) == 7
    # logging set up to show warnings only (logging.basicConfig's default): nothing, as asked
    quiet = _Records()
    assert script(20, 4.0, handler=quiet) == []
    assert quiet.lines == []


def _no_tqdm(**kwargs):
    raise AssertionError("no bar off a terminal")
