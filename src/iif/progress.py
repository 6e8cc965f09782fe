"""Progress of long loops: a tqdm bar on a terminal, periodic lines anywhere else.

The ``progress`` argument taken throughout the package (methods, training, the result store,
retraining) means:

``None`` (the default: auto, unless :func:`progress_default` or ``$IIF_PROGRESS`` set another)
    a tqdm bar with its total where one can be drawn (stderr is a terminal, or a Jupyter
    notebook); anywhere else (batch jobs, CI logs, output redirected to a file) one line at
    most every :func:`interval` seconds, e.g. ``chunks 3/8 (38%, ETA 4m 10s)``, and one when
    a loop that ran for an interval or more ends (``chunks 8/8 (100%) done in 11m 02s``); a
    shorter loop reports nothing. Where the lines go follows the logging set up:

    - none (no handler on the ``iif`` loggers or the root; ``logging.lastResort`` shows
      warnings only): written to stderr as ``iif.progress: chunks 3/8 ...``, so that a script
      run with its output redirected does not look hung. A level above INFO set on the
      logger ``iif`` or ``iif.progress`` silences them.
    - some: an INFO record of the logger ``iif.progress``, shown wherever that logging shows
      INFO records of ``iif`` (the ``iif`` command line does), and nowhere if it shows only
      warnings.
``True``
    always report: as None, and the lines are written to stderr when the logging set up
    would not show them.
``False``
    nothing.

Nested loops (chunks > test samples > path steps > features) do not flood a log: they share
one budget of a line per interval, a line names every loop open at that moment, outermost
first (``chunks 1/4 (25%, ETA 6m 00s) > IIF path steps 2/3 (67%, ETA 20s)``), and only the
outermost loop logs its end. The interval is :data:`INTERVAL` seconds unless the environment
variable ``IIF_PROGRESS_INTERVAL`` gives another (0: a line at every step).

Switches for ``None``: ``with progress_default(False):`` makes it mean False (or True) within
a block, for the loops of code that does not pass ``progress`` on, e.g. the training in a
task function the command line calls under ``--no-progress``; outside such a block the
environment variable ``IIF_PROGRESS`` (``0``/``false``/``no``/``off``, or
``1``/``true``/``yes``/``on``) does the same for a whole run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("iif.progress")

INTERVAL = 10.0
"""Seconds between two progress lines of a run that is not on a terminal."""

INTERVAL_ENV = "IIF_PROGRESS_INTERVAL"
"""The environment variable that overrides :data:`INTERVAL` (seconds, >= 0)."""

SWITCH_ENV = "IIF_PROGRESS"
"""The environment variable that turns progress off (``0``) or on (``1``) where ``progress``
is None (auto) and no :func:`progress_default` block says otherwise."""

_SWITCH = {"0": False, "false": False, "no": False, "off": False,
           "1": True, "true": True, "yes": True, "on": True, "": None, "auto": None}

_clock: Callable[[], float] = time.monotonic  # replaced by a fake clock in the tests
_warned: set[str] = set()  # the warnings about settings already given
_local = threading.local()  # the loops open in this thread, and when the last line was logged
_DEFAULT: contextvars.ContextVar[bool | None] = contextvars.ContextVar("iif_progress",
                                                                      default=None)


@contextlib.contextmanager
def progress_default(enable: bool | None) -> Iterator[None]:
    """Within this block, ``progress=None`` means ``enable`` (None: auto, as outside)."""
    token = _DEFAULT.set(enable)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def interval() -> float:
    """Seconds between progress lines: ``$IIF_PROGRESS_INTERVAL`` if it holds a number >= 0,
    else :data:`INTERVAL`."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        _warn_once(f"{INTERVAL_ENV}={text!r} is not a number of seconds >= 0; using "
                   f"{INTERVAL:g}")
        return INTERVAL
    return value


def _warn_once(message: str) -> None:
    """A warning about a setting, once per run, not at every loop."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _switch() -> bool | None:
    """What ``progress=None`` means here: the innermost :func:`progress_default` block's
    value, else ``$IIF_PROGRESS``'s (None: auto)."""
    enable = _DEFAULT.get()
    if enable is not None:
        return enable
    text = os.environ.get(SWITCH_ENV, "").strip().lower()
    if text in _SWITCH:
        return _SWITCH[text]
    _warn_once(f"{SWITCH_ENV}={os.environ[SWITCH_ENV]!r} is neither 0 (no progress) nor 1 "
               f"(always); reporting progress as by default")
    return None


def interactive() -> bool:
    """Whether a bar can be drawn: stderr is a terminal, or this runs in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        pass
    ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = ipython() if callable(ipython) else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _shown() -> bool:
    """Whether an INFO record of ``iif.progress`` reaches a handler."""
    return log.isEnabledFor(logging.INFO) and log.hasHandlers()


def _unconfigured() -> bool:
    """Whether no logging is set up that could show ``iif.progress`` (no handler up to the
    root; ``logging.lastResort`` shows warnings only), nor a level above INFO set on the
    ``iif`` loggers to quiet it."""
    if log.hasHandlers():
        return False
    for logger in (log, logging.getLogger("iif")):
        if logger.level != logging.NOTSET:
            return logger.level <= logging.INFO
    return True


def _stderr_line(line: str) -> None:
    if sys.stderr is not None:  # None under pythonw: print would write to stdout instead
        print(f"{log.name}: {line}", file=sys.stderr, flush=True)


class Progress:
    """The progress of one loop of ``total`` units (see the module docstring for ``enable``,
    the ``progress`` argument): ``update(n)`` after each step, ``close()`` at the end, or use
    it as a context manager (an exception closes it without the final line)."""

    def __init__(self, total: int | None, desc: str = "", enable: bool | None = None,
                 unit: str = "it"):
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.count = desc, unit, 0
        self._bar: Any = None
        self._logging = False
        if enable is None:
            enable = _switch()
        if enable is False:
            return
        if interactive():
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False)
        elif enable or _shown() or _unconfigured():
            self._logging, self._force = True, bool(enable)
            self._interval = interval()
            self._start = _clock()
            open_loops = _open()
            if not open_loops:
                _local.last = self._start  # the first line comes an interval after the start
            open_loops.append(self)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._logging:
            now = _clock()
            if now - getattr(_local, "last", now) >= self._interval:
                _local.last = now
                self._emit(" > ".join(p._status(now) for p in _open()))

    def close(self, finished: bool = True) -> None:
        """End the loop; the outermost loop logs its end when ``finished`` after running for
        an interval or more."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._logging:
            self._logging = False
            open_loops = _open()
            outermost = bool(open_loops) and open_loops[0] is self
            if self in open_loops:
                open_loops.remove(self)
            now = _clock()
            if finished and outermost and now - self._start >= self._interval:
                self._emit(self._done(now))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(finished=exc_type is None)

    # ---- the lines ---------------------------------------------------------------------------
    def _counted(self) -> str:
        unit = "" if self.unit == "it" else f" {self.unit}"
        return f"{self.desc} {self.count}" + ("" if self.total is None else f"/{self.total}") + unit

    def _status(self, now: float) -> str:
        """``desc 3/8 (38%, ETA 4m 10s)``."""
        if not self.total:
            return f"{self._counted()} ({_duration(now - self._start)} elapsed)"
        pct = 100.0 * self.count / self.total
        eta = "?" if self.count == 0 else _duration(
            (now - self._start) / self.count * max(self.total - self.count, 0))
        return f"{self._counted()} ({pct:.0f}%, ETA {eta})"

    def _done(self, now: float) -> str:
        pct = f" ({100.0 * self.count / self.total:.0f}%)" if self.total else ""
        return f"{self._counted()}{pct} done in {_duration(now - self._start)}"

    def _emit(self, line: str) -> None:
        if _shown():
            log.info("%s", line)
        elif self._force or any(p._force for p in _open()) or _unconfigured():
            _stderr_line(line)


def progress_bar(
    iterable: Iterable[T],
    total: int | None,
    desc: str = "",
    enable: bool | None = None,
    *,
    unit: str = "it",
    size: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """``iterable`` with its progress reported (a bar, or log lines: see the module docstring
    for ``enable``, the ``progress`` argument). ``total``: the number of steps, required so
    that every bar and line shows how far the loop is; ``size(item)``: how many units an item
    counts for (default 1), e.g. the samples of a chunk."""
    return _iterate(iterable, lambda: Progress(total, desc, enable, unit), size)


def _iterate(iterable: Iterable[T], start: Callable[[], Progress],
             size: Callable[[T], int] | None) -> Iterator[T]:
    bar = start()  # at the first step: a loop never started leaves nothing open
    finished = False
    try:
        for item in iterable:
            yield item
            bar.update(1 if size is None else size(item))
        finished = True
    finally:
        bar.close(finished)


def _open() -> list[Progress]:
    if not hasattr(_local, "open"):
        _local.open = []
    return _local.open


def _duration(seconds: float) -> str:
    """``12s``, ``4m 10s``, ``2h 05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
