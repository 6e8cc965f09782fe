"""The engine's memory policy, one place for every "does it fit" decision.

A :class:`Budget` (held by :class:`iif.engine.engine.Engine`, which re-exports it) answers how many
model copies fit (:meth:`Budget.copies_that_fit`), whether a (rows x dim) feature matrix may be
held, must spill to ``feature_dir`` or is refused (:meth:`Budget.check_features`,
:func:`spill_folder`), and how far a fast-path chunk may grow (:func:`grown_chunk`). The feature
functions of ``iif.engine.features`` and ``iif.engine.factored`` sit below the engine and ask this
module rather than sizing memory themselves.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from iif.errors import InputError

DEFAULT_MAX_FEATURE_BYTES = 4 << 30

# rows per chunk on the Kronecker (and layer-factor) fast paths: their memory per sample is a
# few layer widths and R x P features instead of R x M gradient entries, so chunks grow by
# M / (that) up to this cap
MAX_FAST_CHUNK = 4096

# the most model copies stacked side by side (IIF's "auto" test batch)
MAX_COPIES = 32

# the share of max_feature_bytes that stacked copies may take: 1 / COPIES_SHARE
COPIES_SHARE = 4

# where features larger than max_bytes go instead of memory (see spill_features_to)
_SPILL_DIR: ContextVar[Path | None] = ContextVar("iif_feature_dir", default=None)


@contextlib.contextmanager
def spill_features_to(folder: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, feature matrices larger than ``max_bytes`` are memory-mapped from
    unnamed files in ``folder`` instead of refused (None: refuse, the default). The files are
    unlinked as soon as they are mapped, so nothing is left behind, even after a crash."""
    token = _SPILL_DIR.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _SPILL_DIR.reset(token)


def spill_folder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 max_bytes: int, what: str) -> Path | None:
    """Where a feature matrix of ``shape`` goes: None, held in memory (up to ``max_bytes``);
    beyond it the spill folder of :func:`spill_features_to` (CPU), else a clear error."""
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if need <= max_bytes:
        return None
    folder = _SPILL_DIR.get()
    if folder is None or torch.device(device).type != "cpu":
        raise InputError(
            f"{what} would take {need / 2**30:.1f} GiB ({' x '.join(map(str, shape))}); use a "
            f"projection (ProjectionSettings(dim=...)), raise max_feature_bytes, or give "
            f"feature_dir= to memory-map them from disk"
        )
    return folder


def grown_chunk(chunk_size: int, rows: int, num_params: int, per_sample: int) -> int:
    """Samples per fast-path chunk: as many as fit the memory of a dense chunk of
    ``chunk_size`` samples (``chunk_size * rows * M`` values) at ``per_sample`` values each,
    up to ``MAX_FAST_CHUNK`` (never fewer than ``chunk_size``)."""
    grown = chunk_size * rows * num_params // max(per_sample, 1)
    return max(chunk_size, min(MAX_FAST_CHUNK, grown))


@dataclass(frozen=True)
class Budget:
    """The memory policy: samples per per-sample-gradient chunk, the largest feature matrix
    held in memory, and the folder that larger ones are memory-mapped from (None: refuse)."""

    chunk_size: int = 128
    max_feature_bytes: int = DEFAULT_MAX_FEATURE_BYTES
    feature_dir: str | None = None

    @contextlib.contextmanager
    def spill(self) -> Iterator[None]:
        """Feature matrices beyond ``max_feature_bytes`` go to ``feature_dir`` in the block."""
        with spill_features_to(self.feature_dir):
            yield

    def holds(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of features may be held in memory at once."""
        return nbytes <= self.max_feature_bytes

    def copies_that_fit(self, per_copy_bytes: int, most: int = MAX_COPIES) -> int:
        """How many stacked model copies of ``per_copy_bytes`` each fit a quarter of
        ``max_feature_bytes``: at least 1 (one copy always runs), at most ``most``."""
        share = self.max_feature_bytes // COPIES_SHARE
        return max(1, min(most, share // max(per_copy_bytes, 1)))

    def check_features(self, rows: int, dim: int, what: str, element_size: int,
                       solve_bytes: int = 0) -> None:
        """Refuse a (rows x dim) matrix of ``element_size``-byte values (plus ``solve_bytes``
        of a solver's matrix that may not spill) beyond ``max_feature_bytes``; with a
        ``feature_dir`` the features themselves spill and only the solver's bytes count."""
        held = 0 if self.feature_dir is not None else rows
        need = held * dim * element_size + solve_bytes
        if need > self.max_feature_bytes:
            raise InputError(
                f"{what} would take {need / 2**30:.1f} GiB ({held} x {dim}); use a smaller "
                f"projection (ProjectionSettings(dim=...)) or raise max_feature_bytes"
            )
