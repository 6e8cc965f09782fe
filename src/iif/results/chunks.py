"""Chunked, checksummed, resumable arrays in a folder: the persistence layer under the result
store (:mod:`iif.results.store`) and the LDS ground-truth cache (:mod:`iif.evaluation.retrain`).

A :class:`ChunkFolder` holds named chunks, each an array ``NAME.npy`` (no pickle) with a
record ``NAME.json``: the key of the run that made it, its shape, dtype and SHA-256, any extra
fields of the caller, and a checksum of the record itself. A chunk counts only when all of
these match what the caller expects; anything else (another run's chunk, a truncated or
edited file, a forged record) is removed and computed again. Files are written to a
temporary name and renamed into place, so a crash leaves finished chunks intact.

:class:`FolderLock` keeps one writer at a time: ``fcntl.flock`` on ``.iif-lock``, which holds
the writer's pid. The kernel releases the lock of a process that dies, so a stale lock never
blocks; the next writer removes the temporary files (``.*.tmp``) the dead one left.

A full disk while writing is one line naming the file, the space needed and the space free
(:func:`write_file`); a JSON file that is empty or cut short (an interrupted copy, a full disk)
is named as damaged (:func:`read_json`); a file or a broken link in the way of a folder to
create is named (:func:`make_folder`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from iif.errors import InputError
from iif.io import atomic_write, jsonable, npy_problem, read_file, read_json_file
from iif.results.runkey import file_digest, text_digest

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: an exclusive lock file instead
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK = ".iif-lock"
# what a failed write leaves, and how to go on: atomic writes keep the finished files
RESUME = ("free some space or use a folder on another disk, then run the same command again "
          "(finished chunks are kept)")
DAMAGED = "as an interrupted copy or a full disk can leave it"
_FULL = {errno.ENOSPC: "the disk is full",
         getattr(errno, "EDQUOT", -1): "the disk quota is used up"}


# ---- the lock --------------------------------------------------------------------------------
class FolderLock:
    """An advisory, exclusive lock on ``folder`` for as long as this object is held.

    A folder locked by a live process raises :class:`InputError` naming that pid; a lock file
    left by a dead process is taken over (its pid is logged).
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None
        while self._fd is None:
            fd = _open_lock_file(self.path)
            try:
                _lock_fd(fd)
            except BlockingIOError:
                holder = _read_pid(fd)
                if holder is None:  # locked an instant ago: its pid is being written
                    time.sleep(0.1)
                    holder = _read_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise InputError(f"{folder} is being written by {who} (lock {self.path}); "
                                 f"wait for it to finish or use another folder") from None
            # the holder before us may have removed the file after we opened it: lock the
            # file that is at the path now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _read_pid(fd)
            if stale and stale != os.getpid():
                log.info("%s: taking over the lock of process %s, which is no longer running",
                         folder, stale)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: see the samestat check
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _open_lock_file(path: Path) -> int:
    """The lock file at ``path``, opened for reading and writing (created if missing), never
    through a link: a symbolic link planted at ``path`` would make the pid land in the file it
    points to, so it is refused, as is anything but a regular file (a FIFO would block)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    remedy = f"remove {path} (the library writes only a regular file there) and run again"
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise InputError(f"{path} is a symbolic link; the lock is never written through a "
                             f"link: {remedy}") from None
        if path.exists() and not path.is_file():
            raise InputError(f"{path} is not a regular file: {remedy}") from None
        raise InputError(f"{path}: the lock file cannot be opened ({exc.strerror}); check the "
                         f"folder's permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path} is not a regular file: {remedy}")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def _lock_fd(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    pid = _read_pid(fd)  # pragma: no cover - without flock, a live pid in the file holds it
    if pid and pid != os.getpid() and _alive(pid):  # pragma: no cover
        raise BlockingIOError


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the chunks ------------------------------------------------------------------------------
class ChunkFolder:
    """Named array chunks of the run ``key`` in ``folder`` (created if missing).

    ``lock=True`` holds :class:`FolderLock` until :meth:`close` and removes dead writers'
    temporary files; processes that write under another's lock (torchrun ranks) pass False.
    """

    def __init__(self, folder: str | os.PathLike, key: str, *, lock: bool = True):
        self.folder = Path(folder)
        self.key = key
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder} is a file, not a folder")
        make_folder(self.folder)
        self._lock = FolderLock(self.folder) if lock else None
        if lock:
            self.remove_temporary_files()

    def close(self) -> None:
        """Release the folder's lock (also on garbage collection and process exit)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def paths(self, name: str) -> tuple[Path, Path]:
        """The array and record files of chunk ``name``."""
        return self.folder / f"{name}.npy", self.folder / f"{name}.json"

    def names(self) -> list[str]:
        """Names of the chunks with a record on disk (checked or not)."""
        return sorted(p.stem for p in self.folder.glob("*.json") if not p.name.startswith("."))

    def write(self, name: str, array: np.ndarray, dtype: str = "float64", **fields: Any
              ) -> None:
        """Write chunk ``name`` (as ``dtype``: float64 or bool) and its record with
        ``fields``, atomically."""
        array = np.ascontiguousarray(array, dtype=_dtype(dtype))
        npy, meta = self.paths(name)
        write_file(npy, lambda f: np.save(f, array, allow_pickle=False), array.nbytes + 128)
        record = jsonable({"key": self.key, "shape": list(array.shape), "dtype": dtype,
                           "sha256": file_digest(npy), **fields})
        record["record_sha256"] = record_checksum(record)
        text = json.dumps(record, allow_nan=False).encode()
        try:
            write_file(meta, lambda f: f.write(text), len(text))
        except BaseException:
            remove_file(npy)  # an array without its record is never used: do not keep it
            raise

    def problem(self, name: str, shape: tuple[int, ...], dtype: str = "float64") -> str | None:
        """What is wrong with chunk ``name`` for this run, ``shape`` and ``dtype`` (None: it
        is sound). A missing chunk is ``"missing"``."""
        npy, meta = self.paths(name)
        if not (npy.exists() and meta.exists()):
            return "missing"
        record = read_json(meta, "chunk record")
        if isinstance(record, str):
            return record
        if record.get("key") != self.key:
            return "was made by another run"
        try:
            intact = record.get("record_sha256") == record_checksum(record)
        except ValueError:  # NaN or inf, which JSON readers accept and records never hold
            intact = False
        if not intact:
            return "has a damaged record (checksum mismatch)"
        if record.get("shape") != list(shape) or record.get("dtype") != dtype:
            return f"has the wrong shape or dtype ({record.get('shape')}, not {list(shape)})"
        array = _load_chunk(npy, record.get("sha256"))
        if isinstance(array, str):
            return array
        if array.shape != tuple(shape) or array.dtype != _dtype(dtype):
            return f"holds an array of shape {list(array.shape)} ({array.dtype}), not " \
                   f"{list(shape)}"
        return None

    def discard(self, name: str) -> None:
        for path in self.paths(name):
            remove_file(path)

    def read(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The array (memory-mapped) and record of a chunk checked by :meth:`problem`."""
        npy, meta = self.paths(name)
        record = read_json_file(meta, "a chunk record")
        return np.load(npy, mmap_mode="r", allow_pickle=False), record

    def remove_temporary_files(self) -> None:
        """Temporary files of writers that died before renaming them (we hold the lock)."""
        remove_temporary_files(self.folder)


def _load_chunk(npy: Path, sha256: object) -> np.ndarray | str:
    """The array of ``npy`` (memory-mapped) if its SHA-256 is ``sha256``, or what is wrong with
    it. Something other than a regular file there (a FIFO, a device such as /dev/zero) raises
    :class:`InputError` before it is hashed or read."""
    try:
        if sha256 != file_digest(npy, "a chunk"):
            return "is damaged (checksum mismatch)"
        header = npy_problem(npy, "a chunk")
        if header:
            return f"is {header}"
        return np.load(npy, mmap_mode="r", allow_pickle=False)
    except InputError:
        if npy.is_dir():  # removed by discard, which names the folder to remove
            return "cannot be read (a folder)"
        raise
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"


def _dtype(name: str) -> np.dtype:
    if name not in ("float64", "bool"):
        raise ValueError(f"chunks hold float64 or bool arrays, not {name}")
    return np.dtype(name)


def remove_temporary_files(folder: Path) -> None:
    """Remove the temporary files (``.*.tmp``) of writers that died in ``folder``; call it
    holding the folder's lock."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            log.info("removing %s, left by a writer that stopped", tmp)
            tmp.unlink(missing_ok=True)


def record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of a record without its own checksum field."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return text_digest(json.dumps(body, sort_keys=True, allow_nan=False))


def read_json(path: Path, what: str) -> dict[str, Any] | str:
    """The JSON object in ``path``, or a sentence saying what is wrong with it (an empty file
    or one cut short is named as damaged); something other than a regular file there (a FIFO,
    a device) raises :class:`InputError`."""
    try:
        data = read_file(path, f"a {what}")
    except InputError:
        if path.is_dir():  # the caller's remove_file names the folder to remove
            return f"has an unreadable {what} {path.name} (a folder)"
        raise
    except OSError as exc:
        return f"has an unreadable {what} {path.name} ({exc.strerror or exc})"
    if not data:
        return f"has an empty {what} {path.name} (0 bytes, {DAMAGED})"
    if not data.strip(b"\0"):  # what some file systems leave of a file cut off by a crash
        return f"has a damaged {what} {path.name} (only zero bytes, {DAMAGED})"
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        return f"has an unreadable {what} {path.name} (JSON nested too deeply)"
    except UnicodeDecodeError:
        return f"has a damaged {what} {path.name} (not UTF-8 text)"
    except json.JSONDecodeError as exc:
        # the text ended before the JSON did (inside a string, or between values)
        cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())
        detail = f"cut short after {len(data)} bytes, {DAMAGED}" if cut else \
            f"not valid JSON: {exc}"
        return f"has a damaged {what} {path.name} ({detail})"
    if not isinstance(value, dict):
        return f"has a malformed {what} {path.name} (a JSON {type(value).__name__}, not an " \
               f"object)"
    return value


def remove_file(path: Path) -> None:
    """Remove a file of the folder; a folder in its place is the user's to remove."""
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path} is a folder where iif keeps a file; remove it")
    path.unlink(missing_ok=True)


def make_folder(path: Path) -> None:
    """Create the folder ``path`` and its parents; a file or a broken link in the way, or a
    folder that cannot be created, raises :class:`InputError` naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(_mkdir_problem(path, exc)) from None


def _mkdir_problem(path: Path, exc: OSError) -> str:
    remedy = "so the folder cannot be created there; remove it or choose another folder"
    for part in (path, *path.parents):
        if part.is_symlink() and not part.exists():
            return f"{path}: {part} is a broken symbolic link, not a folder, {remedy}"
        if part.exists():
            if not part.is_dir():
                return f"{path}: {part} is a file, not a folder, {remedy}"
            break
    return (f"{path}: the folder cannot be created ({exc.strerror or exc}); check the "
            f"permissions of the folder above it or choose another folder")


def write_file(path: Path, write: Callable[[IO[bytes]], Any], needed: int | None,
               remedy: str = RESUME) -> None:
    """:func:`iif.io.atomic_write`, with a full disk (or quota) reported in one line naming
    ``path``, the ``needed`` bytes and the space free: :class:`InputError`. Nothing is left
    half-written: the temporary file is removed and ``path`` keeps its old content."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        if not disk_full(exc):
            raise
        raise InputError(disk_full_message(path, exc, needed, remedy)) from None


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full_message(path: Path, exc: OSError, needed: int | None,
                      remedy: str = RESUME) -> str:
    """``PATH: the disk is full (N needed, M free); REMEDY`` for the failed write ``exc``."""
    try:
        free = _size(shutil.disk_usage(path.parent).free) + " free"
    except OSError:
        free = "free space unknown"
    space = free if needed is None else f"{_size(needed)} needed, {free}"
    return f"{path}: {_FULL[exc.errno]} ({space}); {remedy}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 10 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
