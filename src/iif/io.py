"""Plain, safe files: atomic writes, JSON-safe values (no pickle anywhere), and the checks
made before reading a file found in a folder (:func:`regular_file`, :func:`open_regular`,
:func:`read_file`, :func:`read_json_file`, :func:`npy_problem`): a FIFO, a device such as
``/dev/zero``, a folder or a socket in place of a file is refused in one line instead of
blocking or reading forever."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from iif.errors import InputError


def _json_float(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


def jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats to JSON-safe values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        return _json_float(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` through ``write(binary_file)`` to a temporary file in the same folder,
    then rename it into place: readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- reading files found in a folder ---------------------------------------------------------
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def _check_stat(path: str | os.PathLike, st: os.stat_result, what: str,
                max_bytes: int | None) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is not a regular file ({_kind(st.st_mode)}); {what} must be "
                         f"a plain file: remove it or use another folder")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputError(f"{path} holds {st.st_size} bytes, more than a {what} ever does "
                         f"({max_bytes}); remove it or use another folder")
    return st.st_size


def regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
    """The size of ``path``, which must be a regular file (a link to one is followed).

    Anything else (a FIFO, a device such as ``/dev/zero``, a folder, a socket), or a file
    larger than ``max_bytes``, raises :class:`InputError` naming the file, what it is and the
    remedy; ``what`` names the file's role (``"a chunk record"``). A missing file raises
    :class:`FileNotFoundError`, as reading it would.
    """
    return _check_stat(path, os.stat(path), what, max_bytes)


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str,
                 max_bytes: int | None = None) -> Iterator[tuple[IO[bytes], int]]:
    """The regular file ``path`` opened for reading, with its size: checked as by
    :func:`regular_file` before opening and again on the opened file (opened without
    blocking, so a FIFO swapped in between never blocks)."""
    regular_file(path, what, max_bytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        yield f, _check_stat(path, os.fstat(fd), what, max_bytes)


def read_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`)."""
    with open_regular(path, what, max_bytes) as (f, _):
        return f.read()


JSON_MAX_BYTES = 1 << 28
"""The largest JSON file read (256 MiB): the records, manifests and indexes iif writes hold
settings, digests and row bounds, kilobytes to a few megabytes even for millions of samples."""


def read_json_file(path: str | os.PathLike, what: str,
                   max_bytes: int | None = JSON_MAX_BYTES) -> Any:
    """The JSON value in the regular file ``path`` (see :func:`read_file`), at most
    ``max_bytes`` long (a larger file is refused before it is read).

    Raises :class:`InputError` for a file that is not regular; :class:`OSError` when it cannot
    be read; a plain :class:`ValueError` when it is not UTF-8 JSON, also when it is nested
    too deeply to parse (Python's ``RecursionError``). Callers that catch ``ValueError`` to
    word a damaged file let :class:`InputError` through first.
    """
    data = read_file(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def npy_problem(path: str | os.PathLike, what: str) -> str | None:
    """What is wrong with the header of the NumPy file ``path`` (None: it is sound): not a
    NumPy file, a damaged header, an object dtype (pickle), or a shape that needs more bytes
    than the file holds, each worded ``a damaged NumPy file (...)``. ``path`` must be a
    regular file (:class:`InputError` otherwise); only the header is read."""
    with open_regular(path, what) as (f, size):
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
            return f"a damaged NumPy file ({' '.join(str(exc).split())[:200]})"
        offset = f.tell()
    if dtype.hasobject:
        return "a NumPy file of Python objects (pickle), which iif never reads"
    needed = math.prod(shape) * dtype.itemsize
    if offset + needed > size:
        return (f"a damaged NumPy file (its header claims an array of shape {list(shape)} "
                f"({dtype}, {needed} bytes) but the file holds {size - offset} bytes of data)")
    return None
