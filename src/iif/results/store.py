"""A result store: an attribution run written chunk by chunk into a folder, resumable.

Layout of the folder::

    manifest.json                 method, settings, the run key, chunk boundaries
    chunks/rows-LLLLLLL-HHHHHHH.npy   scores of test samples LLL..HHH-1 (float64, no pickle)
    chunks/rows-LLLLLLL-HHHHHHH.json  its run key, shape, dtype, SHA-256, completeness and
                                  info, and a checksum of the record itself
    scores.npy, attribution.json  the assembled result (``iif.Attribution.load``); its
                                  ``info["flags"]`` names untrustworthy test samples by
                                  global index (``iif.results.diagnostics``)
    .iif-lock                     present while a process writes the folder

The **run key** (:mod:`iif.results.runkey`) digests everything that determines the scores: method,
settings, model weights and structure, training and test data, checkpoint contents and the
software versions. A chunk counts as finished only when its record carries the run's key, its
``.npy`` has the recorded shape, dtype and SHA-256 and the record's own checksum matches; any
other chunk is computed again. A folder whose manifest holds another key is refused, naming the
parts that differ, and so is a folder of finished chunks of another run without a manifest, or
one holding a result saved by ``Attribution.save``: ``force=True`` (``iif attribute --force``)
removes the files the store writes (the manifest, the chunk files ``rows-*.npy``/``rows-*.json``,
``scores.npy`` and ``attribution.json``) and starts over; any other file in ``chunks/`` is left
in place (and logged), a link is removed as a link, never followed, and a ``chunks/`` that is
a link is refused. A manifest that is empty or cut short is named as damaged, not as another
run's.

**One writer at a time**: the folder is locked (:class:`iif.results.chunks.FolderLock`) while a run
writes it; a second writer is refused with the pid of the first, and the temporary files of a
writer that died are removed by the next. The chunks themselves are an
:class:`iif.results.chunks.ChunkFolder`, the layer the LDS ground-truth cache uses too.

Every file is written to a temporary name and renamed into place, so a crash leaves finished
chunks intact; a full disk is one line naming the file (:func:`iif.results.chunks.write_file`).
Re-running the same command skips finished chunks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from iif.errors import InputError
from iif.io import jsonable
from iif.results.attribution import META_FILE, SCORES_FILE, Attribution
from iif.results.chunks import (
    ChunkFolder,
    FolderLock,
    disk_full,
    disk_full_message,
    make_folder,
    read_json,
    remove_file,
    remove_temporary_files,
    write_file,
)
from iif.results.diagnostics import globalized, index_offset, trust_flags
from iif.results.runkey import RunKey, run_key
from iif.validation import Limits, check_value

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNKS = "chunks"
FORMAT = 2
FORCE_HINT = "use a fresh folder, or --force (force=True) to replace its results"
# the files a store writes in chunks/ (ResultStore._name), and their temporary names
CHUNK_FILE = re.compile(r"\.?rows-\d{7,}-\d{7,}\.(npy|json)(\.\w+\.tmp)?")


# ---- the store -------------------------------------------------------------------------------
class ResultStore:
    """The folder of one attribution run.

    Args:
        folder: created if missing.
        method, settings: what produced the scores (``method.settings()``).
        key: the run key (:func:`iif.results.runkey.run_key`).
        n_test, n_train: the shape of the full score matrix.
        bounds: chunk boundaries ``[0, b_1, ..., n_test]``.
        force: clear results of another run (or of ``Attribution.save``) instead of refusing.
        lock: hold the folder's lock (:class:`iif.results.chunks.FolderLock`) until :meth:`close`;
            the ranks of a torchrun job other than rank 0 work under rank 0's lock.
    """

    def __init__(self, folder: str | os.PathLike, *, method: str, settings: dict[str, Any],
                 key: RunKey, n_test: int, n_train: int, bounds: list[int],
                 force: bool = False, lock: bool = True):
        self.folder = Path(folder)
        if bounds[0] != 0 or bounds[-1] != n_test or any(
                b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise InputError(f"chunk bounds must rise from 0 to {n_test}, got {bounds}")
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder} is a file, not a folder")
        self.key = key
        self.manifest = {
            "format": FORMAT,
            "method": method,
            "key": key.digest,
            "parts": dict(key.parts),
            "n_test": int(n_test),
            "n_train": int(n_train),
            "bounds": [int(b) for b in bounds],
            "settings": jsonable(settings),
        }
        make_folder(self.folder)
        self._lock = FolderLock(self.folder) if lock else None
        try:
            chunks = self.folder / CHUNKS
            if chunks.exists() and not chunks.is_dir():
                raise InputError(f"{chunks} is a file, not the folder of chunks; remove it")
            if lock:
                remove_temporary_files(self.folder)
                remove_temporary_files(chunks)
            self._claim(force)
            self._chunks = ChunkFolder(chunks, key.digest, lock=False)
            # chunks this object wrote or checked: pending() and assemble() need not hash
            # every finished chunk again while the folder is held
            self._sound: set[str] = set()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (also on garbage collection and process exit)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- manifest ------------------------------------------------------------------------
    def _claim(self, force: bool) -> None:
        path = self.folder / MANIFEST
        problem = self._conflict(path)
        if problem and not force:
            raise InputError(f"{self.folder} {problem}; {FORCE_HINT}")
        if problem:
            log.warning("%s %s; replacing its results (force)", self.folder, problem)
            self._clear()
        elif path.exists():
            return  # the same run: resume
        text = json.dumps(self.manifest, indent=2, allow_nan=False).encode()
        write_file(path, lambda f: f.write(text), len(text))

    def _conflict(self, path: Path) -> str | None:
        """What in the folder belongs to another run (None: nothing, or this run's own)."""
        return self._manifest_conflict(path) if path.exists() else self._foreign_files()

    def _manifest_conflict(self, path: Path) -> str | None:
        """What in the manifest ``path`` differs from this run (None: nothing)."""
        old = read_json(path, "manifest")
        if isinstance(old, str):
            return old
        if not isinstance(old.get("format"), int):  # every version of iif writes one
            return (f"has a damaged manifest {MANIFEST} (no format field, which every "
                    f"manifest has)")
        if old["format"] != FORMAT:
            return (f"was written by another version of iif (manifest format "
                    f"{old['format']!r}, this one reads {FORMAT})")
        differs = self.key.differences(old.get("parts"))
        if differs:
            return "holds results of another run: " + self._describe(differs, old)
        for name, what in (("method", "method"), ("n_test", "number of test samples"),
                           ("n_train", "number of training samples"),
                           ("bounds", "chunking (--chunk)")):
            if old.get(name) != self.manifest[name]:
                return (f"holds results made with another {what}: "
                        f"{old.get(name)!r}, now {self.manifest[name]!r}")
        return None

    def _foreign_files(self) -> str | None:
        """What, in a folder without a manifest, belongs to another run (None: nothing)."""
        # no manifest: chunks of another run, or a saved Attribution, are not ours to replace
        foreign = 0
        for meta in sorted((self.folder / CHUNKS).glob("rows-*.json")):
            record = read_json(meta, "chunk record")
            if isinstance(record, str) or record.get("key") != self.key.digest:
                foreign += 1
        if foreign:
            return (f"holds {foreign} chunk(s) of another run but no {MANIFEST} (they cannot "
                    f"be checked against this run)")
        if (self.folder / META_FILE).exists() or (self.folder / SCORES_FILE).exists():
            meta = read_json(self.folder / META_FILE, "result")
            ours = isinstance(meta, dict) and isinstance(meta.get("info"), dict) and \
                meta["info"].get("run_key") == self.key.digest
            if not ours:  # assembled by this run before its manifest was removed, or not
                return f"holds a saved attribution ({SCORES_FILE}, {META_FILE})"
        return None

    def _describe(self, differs: list[str], old: dict[str, Any]) -> str:
        return describe_differences(differs, old.get("settings"), self.manifest["settings"])

    def _clear(self) -> None:
        """Remove the files the store writes; any other file is the user's and stays."""
        chunks = self.folder / CHUNKS
        if chunks.is_symlink():  # its files may be anyone's: nothing is removed through it
            raise InputError(f"{chunks} is a symbolic link; --force removes chunks only from a "
                             f"folder of the store's own, never through a link: replace the "
                             f"link by a folder, or use a fresh folder")
        for name in (MANIFEST, SCORES_FILE, META_FILE):
            remove_file(self.folder / name)  # a link is removed, not what it points to
        if not chunks.is_dir():
            return
        left = []
        for path in sorted(chunks.iterdir()):
            if CHUNK_FILE.fullmatch(path.name):
                remove_file(path)
            else:
                left.append(path.name + ("/" if path.is_dir() and not path.is_symlink() else ""))
        if left:
            shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10
                                            else "")
            log.info("%s: left %d file(s) that iif did not write: %s", chunks, len(left), shown)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        b = self.manifest["bounds"]
        return list(zip(b[:-1], b[1:], strict=True))

    @staticmethod
    def _name(lo: int, hi: int) -> str:
        return f"rows-{lo:07d}-{hi:07d}"

    # ---- chunks --------------------------------------------------------------------------
    def done(self, lo: int, hi: int) -> bool:
        """Whether chunk [lo, hi) is on disk, intact and of this run (anything else is
        removed, so it is computed again)."""
        name = self._name(lo, hi)
        if name in self._sound:
            return True
        problem = self._chunks.problem(name, (hi - lo, self.manifest["n_train"]))
        if problem == "missing":
            return False
        if problem is None:
            problem = self._check_record(lo, hi, self._chunks.read(name)[1])
        elif problem.startswith("was made by another run"):
            record = read_json(self._chunks.paths(name)[1], "chunk record")
            differs = self.key.differences(record.get("parts") if isinstance(record, dict)
                                           else None)
            problem += f" ({', '.join(differs) or 'unknown key'} differ)"
        if problem:
            log.warning("chunk %s %s; computing it again", name, problem)
            self._chunks.discard(name)
            return False
        self._sound.add(name)
        return True

    @staticmethod
    def _check_record(lo: int, hi: int, record: dict[str, Any]) -> str | None:
        comp = record.get("completeness")
        if not isinstance(record.get("info"), dict) or not (comp is None or (
                isinstance(comp, dict) and all(isinstance(v, list) and len(v) == hi - lo
                                               for v in comp.values()))):
            return "has a malformed record (info or completeness)"
        return None

    def pending(self) -> list[tuple[int, int]]:
        return [(lo, hi) for lo, hi in self.chunks if not self.done(lo, hi)]

    def write(self, lo: int, hi: int, result: Attribution) -> None:
        shape = (hi - lo, self.manifest["n_train"])
        if result.scores.shape != shape:
            raise InputError(f"chunk [{lo}, {hi}) has scores of shape {result.scores.shape}, "
                             f"not {shape}")
        # the record names test samples by global index, as the chunk's warnings do
        info = result.info if "test_offset" in result.info else globalized(result.info, lo)
        completeness = None if result.completeness is None else {
            k: np.asarray(v, dtype=float) for k, v in result.completeness.items()}
        self._chunks.write(self._name(lo, hi), result.scores, parts=dict(self.key.parts),
                           completeness=completeness, info=info)

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, dict[str, Any]]:
        return self._chunks.read(self._name(lo, hi))

    # ---- the whole ------------------------------------------------------------------------
    def assemble(self) -> Attribution:
        """The full result from the finished chunks, also saved as ``scores.npy`` +
        ``attribution.json`` in the folder. Raises if a chunk is missing."""
        missing = self.pending()
        if missing:
            raise InputError(f"{len(missing)} chunk(s) of {self.folder} are not finished "
                             f"(first: test samples {missing[0][0]}..{missing[0][1] - 1})")
        m = self.manifest
        scores = np.empty((m["n_test"], m["n_train"]))
        completeness: dict[str, list[float]] | None = {}
        infos = []
        for lo, hi in self.chunks:
            part, record = self.read(lo, hi)
            scores[lo:hi] = part
            infos.append({"rows": [lo, hi], **record["info"]})
            comp = record["completeness"]
            if comp is None or completeness is None:
                completeness = None
                continue
            for k, v in comp.items():
                completeness.setdefault(k, []).extend(np.nan if x is None else x for x in v)
        whole = None if completeness is None else {k: np.asarray(v, dtype=float)
                                                   for k, v in completeness.items()}
        info = {"chunks": infos, "seconds": sum(i.get("seconds", 0.0) or 0.0 for i in infos),
                "run_key": self.key.digest}
        # per-test flags of the whole, by global test index like the chunks' records
        info["flags"] = trust_flags(whole, info)
        result = Attribution(scores, m["method"], m["settings"], whole, info)
        self._save(result)
        return result

    def _save(self, result: Attribution) -> None:
        """``result.save`` into the folder; a full disk is one line naming the file, and
        leaves no result file that looks complete."""
        scores = self.folder / SCORES_FILE
        before = _identity(scores)
        try:
            result.save(self.folder)
        except OSError as exc:
            if not disk_full(exc):
                raise
            # save() writes the scores first: a new scores.npy in place means the record failed
            failed = META_FILE if _identity(scores) not in (None, before) else SCORES_FILE
            for name in (SCORES_FILE, META_FILE):
                remove_file(self.folder / name)
            needed = result.scores.nbytes + 128 if failed == SCORES_FILE else None
            raise InputError(disk_full_message(self.folder / failed, exc, needed)) from None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def describe_differences(differs: list[str], old_settings: Any, new_settings: dict[str, Any]
                         ) -> str:
    """``different settings (a.b: old -> new), model weights``: the run-key parts that differ,
    the settings with their first changed values."""
    text = []
    for name in differs:
        if name == "settings":
            changes = _settings_changes(old_settings, new_settings)
            text.append(f"settings ({changes})" if changes else "settings")
        else:
            text.append(name)
    return "different " + ", ".join(text)


def _settings_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    """``a.b: old -> new`` for the first settings that differ."""
    flat_old, flat_new = _flatten(old if isinstance(old, dict) else {}), _flatten(new)
    keys = [k for k in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(k, "<unset>") != flat_new.get(k, "<unset>")]
    text = [f"{k}: {flat_old.get(k, '<unset>')!r} -> {flat_new.get(k, '<unset>')!r}"
            for k in keys[:limit]]
    if len(keys) > limit:
        text.append(f"and {len(keys) - limit} more")
    return "; ".join(text)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_store(folder: str | os.PathLike, method: Any, test: Any, chunk: int | None = None, *,
               force: bool = False, lock: bool = True, key: RunKey | None = None
               ) -> ResultStore:
    """The store of ``method`` on the validated test data ``test`` in ``folder``, in chunks of
    ``chunk`` test samples (default: the method's ``store_chunk``), locked unless
    ``lock=False``.
    ``key``: the run key when the caller has computed it (default: :func:`run_key`)."""
    n = len(test)
    if chunk is not None:
        chunk = check_value(chunk, int, "chunk", Limits(ge=1))
    size = chunk if chunk is not None else method.store_chunk(n)
    if method.scores_test_set_as_one() and size < n:
        raise InputError(f"{method.method} scores all test samples in one computation (a "
                         f"shared baseline): it cannot be split into chunks (use chunk >= the "
                         f"number of test samples)")
    bounds = list(range(0, n, size)) + [n]
    return ResultStore(folder, method=method.method, settings=method.settings(),
                       key=key or run_key(method, test), n_test=n, n_train=len(method.train),
                       bounds=bounds, force=force, lock=lock)


def attribute_to(
    folder: str | os.PathLike,
    method: Any,
    test_data: Any,
    *,
    chunk: int | None = None,
    ranks: tuple[int, int] = (0, 1),
    progress: bool | None = None,
    force: bool = False,
) -> Attribution | None:
    """``method.attribute(test_data)`` written chunk by chunk into ``folder`` (see the module
    docstring); finished chunks of an earlier run with the same run key are kept, a folder of
    another run is refused unless ``force``.

    ``ranks = (rank, world)``: this process computes chunks ``rank, rank + world, ...`` and
    returns None unless ``world == 1``; the caller assembles once every rank is done.
    Returns the assembled :class:`Attribution`, equal to one uninterrupted call.
    """
    test = method.validate_test(test_data)
    with open_store(folder, method, test, chunk, force=force) as store:
        fill(store, method, test, ranks=ranks, progress=progress)
        return store.assemble() if ranks[1] == 1 else None


def fill(store: ResultStore, method: Any, test: Any, *, ranks: tuple[int, int] = (0, 1),
         progress: bool | None = None) -> None:
    """Compute and write the unfinished chunks ``rank, rank + world, ...`` of ``store`` for
    the validated test data ``test``; warnings and records name test samples by global
    index."""
    from iif.progress import progress_bar

    rank, world = ranks
    mine = [c for i, c in enumerate(store.chunks) if i % world == rank]
    todo = [c for c in mine if not store.done(*c)]
    if len(todo) < len(mine):
        log.info("%s: %d of %d chunks already finished", store.folder, len(mine) - len(todo),
                 len(mine))
    for lo, hi in progress_bar(todo, total=len(todo), desc="chunks", enable=progress):
        part = test.subset(slice(lo, hi))
        with index_offset(lo):  # warnings name the chunk's test samples by global index
            result = method.attribute((part.x, part.labels))
        store.write(lo, hi, result)
