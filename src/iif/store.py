"""A result store: an attribution run written chunk by chunk into a folder, resumable.

Layout of the folder::

    manifest.json                 method, settings, hashes of the inputs, chunk boundaries
    chunks/rows-LLLLLLL-HHHHHHH.npy   scores of test samples LLL..HHH-1 (float64, no pickle)
    chunks/rows-LLLLLLL-HHHHHHH.json  its SHA-256, completeness and info, written after it
    scores.npy, attribution.json  the assembled result (``iif.Attribution.load``); its
                                  ``info["flags"]`` names untrustworthy test samples by
                                  global index (``iif.diagnostics``)

Every file is written to a temporary name and renamed into place, so a crash leaves finished
chunks intact and at most one temporary file behind. A chunk counts as finished only when its
JSON exists and the SHA-256 of its ``.npy`` matches; a corrupt or truncated chunk is computed
again. Re-running the same command skips finished chunks; a folder made with other settings
or inputs is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iif.attribution import Attribution
from iif.diagnostics import index_offset, trust_flags
from iif.errors import InputError
from iif.io import atomic_write, jsonable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNKS = "chunks"
FORMAT = 1


def tensor_digest(tensors: Iterable[torch.Tensor | np.ndarray], digest=None) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``, in order."""
    digest = digest or hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else \
            np.ascontiguousarray(t)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    text = json.dumps(jsonable(settings), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ResultStore:
    """The folder of one attribution run.

    Args:
        folder: created if missing.
        method, settings: what produced the scores (``method.settings()``).
        inputs_hash: digest of the model and data (see :func:`tensor_digest`).
        n_test, n_train: the shape of the full score matrix.
        bounds: chunk boundaries ``[0, b_1, ..., n_test]``.
    """

    def __init__(self, folder: str | Path, *, method: str, settings: dict[str, Any],
                 inputs_hash: str, n_test: int, n_train: int, bounds: list[int]):
        self.folder = Path(folder)
        if bounds[0] != 0 or bounds[-1] != n_test or any(
                b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise InputError(f"chunk bounds must rise from 0 to {n_test}, got {bounds}")
        self.manifest = {
            "format": FORMAT,
            "method": method,
            "settings_hash": settings_digest(settings),
            "inputs_hash": inputs_hash,
            "n_test": int(n_test),
            "n_train": int(n_train),
            "bounds": [int(b) for b in bounds],
            "settings": jsonable(settings),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / CHUNKS).mkdir(exist_ok=True)
        self._claim()

    # ---- manifest ------------------------------------------------------------------------
    def _claim(self) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise InputError(f"{path} is unreadable ({exc}); remove it or use a fresh "
                                 f"folder") from None
            for key, what in (("method", "method"), ("settings_hash", "settings"),
                              ("inputs_hash", "model or data"), ("n_test", "test data"),
                              ("n_train", "training data"), ("bounds", "chunking")):
                if old.get(key) != self.manifest[key]:
                    raise InputError(
                        f"{self.folder} holds results made with a different {what}; use a "
                        f"fresh folder (or delete this one) instead of mixing them")
            return
        text = json.dumps(self.manifest, indent=2, allow_nan=False)
        atomic_write(path, lambda f: f.write(text.encode()))

    @property
    def chunks(self) -> list[tuple[int, int]]:
        b = self.manifest["bounds"]
        return list(zip(b[:-1], b[1:], strict=True))

    def _paths(self, lo: int, hi: int) -> tuple[Path, Path]:
        stem = self.folder / CHUNKS / f"rows-{lo:07d}-{hi:07d}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    # ---- chunks --------------------------------------------------------------------------
    def done(self, lo: int, hi: int) -> bool:
        """Whether chunk [lo, hi) is on disk and intact (a damaged one is removed)."""
        npy, meta = self._paths(lo, hi)
        if not (npy.exists() and meta.exists()):
            return False
        try:
            record = json.loads(meta.read_text())
            intact = record.get("sha256") == file_digest(npy)
        except (OSError, json.JSONDecodeError):
            intact = False
        if not intact:
            log.warning("chunk %s is damaged (checksum mismatch); computing it again", npy.name)
            for p in (npy, meta):
                p.unlink(missing_ok=True)
        return intact

    def pending(self) -> list[tuple[int, int]]:
        return [(lo, hi) for lo, hi in self.chunks if not self.done(lo, hi)]

    def write(self, lo: int, hi: int, result: Attribution) -> None:
        if result.scores.shape != (hi - lo, self.manifest["n_train"]):
            raise InputError(f"chunk [{lo}, {hi}) has scores of shape {result.scores.shape}")
        npy, meta = self._paths(lo, hi)
        atomic_write(npy, lambda f: np.save(f, result.scores, allow_pickle=False))
        record = {
            "sha256": file_digest(npy),
            "completeness": None if result.completeness is None else {
                k: np.asarray(v, dtype=float) for k, v in result.completeness.items()},
            "info": result.info,
        }
        text = json.dumps(jsonable(record), allow_nan=False)
        atomic_write(meta, lambda f: f.write(text.encode()))

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, dict[str, Any]]:
        npy, meta = self._paths(lo, hi)
        return np.load(npy, mmap_mode="r", allow_pickle=False), json.loads(meta.read_text())

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
        info = {"chunks": infos, "seconds": sum(i.get("seconds", 0.0) or 0.0 for i in infos)}
        # per-test flags by global test index (a chunk's own are relative to its first row)
        info["flags"] = trust_flags(whole, info)
        result = Attribution(scores, m["method"], m["settings"], whole, info)
        result.save(self.folder)
        return result


def default_chunk(method: Any, n_test: int) -> int:
    """Test samples per chunk: a batch of stacked test samples for per-test IIF, every test
    sample at once where they share one baseline, else a few hundred."""
    if getattr(method, "method", None) == "iif":
        if method.baseline.mode == "shared":
            return n_test
        return max(1, method._test_batch(n_test))
    return 256


def inputs_digest(method: Any, test: Any) -> str:
    """SHA-256 of every model the method attributes and of its training and test data."""
    tensors: list[torch.Tensor] = []
    for member in method.members():
        tensors += list(member.state.params.values()) + list(member.state.buffers.values())
    tensors += [method.train.x, method.train.targets, test.x, test.targets]
    return tensor_digest(tensors)


def open_store(folder: str | Path, method: Any, test: Any, chunk: int | None = None
               ) -> ResultStore:
    """The store of ``method`` on the validated test data ``test`` in ``folder``, in chunks of
    ``chunk`` test samples (default: :func:`default_chunk`)."""
    n = len(test)
    size = int(chunk) if chunk is not None else default_chunk(method, n)
    if size < 1:
        raise InputError(f"chunk must be >= 1, got {chunk!r}")
    if getattr(method, "method", None) == "iif" and method.baseline.mode == "shared" and size < n:
        raise InputError("a shared baseline unlearns all test samples together: it cannot be "
                         "split into chunks (use chunk >= the number of test samples)")
    bounds = list(range(0, n, size)) + [n]
    return ResultStore(folder, method=method.method, settings=method.settings(),
                       inputs_hash=inputs_digest(method, test), n_test=n,
                       n_train=len(method.train), bounds=bounds)


def attribute_to(
    folder: str | Path,
    method: Any,
    test_data: Any,
    *,
    chunk: int | None = None,
    ranks: tuple[int, int] = (0, 1),
    progress: bool | None = None,
) -> Attribution | None:
    """``method.attribute(test_data)`` written chunk by chunk into ``folder`` (see the module
    docstring); finished chunks of an earlier run with the same inputs are kept.

    ``ranks = (rank, world)``: this process computes chunks ``rank, rank + world, ...`` and
    returns None unless ``world == 1``; the caller assembles once every rank is done.
    Returns the assembled :class:`Attribution`, equal to one uninterrupted call.
    """
    test = method.task.validate(test_data, "test data")
    store = open_store(folder, method, test, chunk)
    fill(store, method, test, ranks=ranks, progress=progress)
    return store.assemble() if ranks[1] == 1 else None


def fill(store: ResultStore, method: Any, test: Any, *, ranks: tuple[int, int] = (0, 1),
         progress: bool | None = None) -> None:
    """Compute and write the unfinished chunks ``rank, rank + world, ...`` of ``store`` for
    the validated test data ``test``."""
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
            store.write(lo, hi, method.attribute((part.x, part.labels)))
