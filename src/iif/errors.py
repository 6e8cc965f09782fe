"""Errors raised by iif. All bad-input errors are ``ValueError`` subclasses.

:class:`UserCodeError` wraps an exception raised by the user's own code (a task module, a task
function, a model's forward) in one line naming the exception and the line of the user's code
it came from; :func:`error_message` words any exception that reaches the command line.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from pathlib import Path

# how long the text of a user's exception may grow in a one-line message
_MAX_TEXT = 300


class InputError(ValueError):
    """Data, model or settings rejected at the boundary; the message names the problem."""


class CurvatureError(ValueError):
    """The curvature could not be made positive definite within the allowed damping retries."""


class UserCodeError(InputError):
    """The user's code raised ``exc`` while iif was ``what`` (e.g. ``"importing mytask.py"``).

    The message names the exception and the innermost frame of the user's code (see
    :func:`user_frame`; ``file`` is the user's file when it is known), e.g. ``importing
    mytask.py failed: ZeroDivisionError: division by zero (line 3 of /p/mytask.py)``. The
    original exception is kept as ``exc`` and as ``__cause__`` (its traceback with it).
    """

    def __init__(self, what: str, exc: BaseException,
                 file: str | os.PathLike[str] | None = None) -> None:
        self.exc = exc
        self.frame = user_frame(exc, file)
        super().__init__(f"{what} failed: {exception_text(exc)}{where(self.frame)}")
        self.__cause__ = exc


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` on one line (whitespace collapsed, long text cut)."""
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    message = " ".join(message.split())
    if len(message) > _MAX_TEXT:
        message = message[:_MAX_TEXT - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def where(frame: traceback.FrameSummary | None) -> str:
    """`` (line 3 of /p/mytask.py, in build)`` for ``frame``; empty for None."""
    if frame is None:
        return ""
    inside = "" if frame.name in ("<module>", "") else f", in {frame.name}"
    return f" (line {frame.lineno} of {frame.filename}{inside})"


def user_frame(exc: BaseException, file: str | os.PathLike[str] | None = None
               ) -> traceback.FrameSummary | None:
    """The innermost frame of ``exc``'s traceback in the user's code: outside iif, torch, the
    standard library and installed packages; failing that, the innermost one in ``file``.
    A ``SyntaxError`` gives the line it points at. None when no frame qualifies."""
    if isinstance(exc, SyntaxError) and exc.filename and not exc.filename.startswith("<"):
        return traceback.FrameSummary(exc.filename, exc.lineno or 0, "<module>",
                                      lookup_line=False)
    frames = traceback.extract_tb(exc.__traceback__)
    outside = [f for f in frames if not _is_library(f.filename)]
    if outside:
        return outside[-1]
    if file is not None:
        target = os.path.realpath(file)
        inside = [f for f in frames if os.path.realpath(f.filename) == target]
        if inside:
            return inside[-1]
    return None


def error_message(exc: BaseException) -> str:
    """One line for an exception that reached the command line.

    An :class:`InputError` says what it says. Otherwise the exception is named with the line of
    the user's code it came from (:func:`user_frame`), as a failure of the model's forward pass
    when it was raised while a ``torch.nn.Module`` was called; a ``ValueError`` or ``OSError``
    from iif itself keeps its own message, and anything else is reported as unexpected.
    """
    if isinstance(exc, InputError):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    frame = user_frame(exc)
    if any(_is_module_call(f) for f in frames):
        return f"the model's forward pass failed: {exception_text(exc)}{where(frame)}"
    if frame is not None:
        return f"{exception_text(exc)}{where(frame)}"
    if isinstance(exc, (ValueError, OSError)):
        return str(exc) or exception_text(exc)
    last = frames[-1] if frames else None
    return f"unexpected {exception_text(exc)}{where(last)}; this may be a bug in iif"


# ---- helpers ---------------------------------------------------------------------------------
_ROOTS: tuple[str, ...] | None = None


def _library_roots() -> tuple[str, ...]:
    """Folders of code that is not the user's: the iif package, the standard library and the
    installed packages (torch among them)."""
    global _ROOTS
    if _ROOTS is None:
        paths = sysconfig.get_paths()
        roots = {os.path.realpath(Path(__file__).parent)}
        roots |= {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib", "purelib",
                                                           "platlib") if paths.get(key)}
        try:
            import torch

            roots.add(os.path.realpath(Path(torch.__file__).parent))
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        _ROOTS = tuple(sorted(roots))
    return _ROOTS


def _is_library(filename: str) -> bool:
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return True
    path = os.path.realpath(filename)
    parts = Path(path).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path == root or path.startswith(root + os.sep) for root in _library_roots())


def _is_module_call(frame: traceback.FrameSummary) -> bool:
    """Whether ``frame`` is torch calling a module's forward (``module(x)``)."""
    return (frame.name in ("_call_impl", "_wrapped_call_impl")
            and Path(frame.filename).parts[-4:] == ("torch", "nn", "modules", "module.py"))

