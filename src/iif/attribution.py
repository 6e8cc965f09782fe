"""The result every method returns, and its plain on-disk form (npy without pickle + JSON).

Sign convention: ``scores[s, i] > 0`` means including training sample i *raises* the loss of
test sample s (i is an opponent); ``< 0`` means it lowers it (a proponent).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iif.io import atomic_write, jsonable

SCORES_FILE = "scores.npy"
META_FILE = "attribution.json"


@dataclass
class Attribution:
    """Scores (n_test, n_train) with the settings and diagnostics that produced them.

    completeness: per test sample ``sum`` (sum_i I(i)), ``delta`` (L_test(theta*) -
    L_test(theta')) and ``gap`` (|sum - delta| / |delta|; NaN when delta = 0), or None for
    methods without a baseline.
    """

    scores: np.ndarray
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    completeness: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be (n_test, n_train), got shape {self.scores.shape}")

    @property
    def n_test(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def proponents(self, test_index: int, k: int = 8) -> np.ndarray:
        """Indices of the k most negative scores (training samples that lower the loss)."""
        return np.argsort(self.scores[test_index], kind="stable")[:k]

    def opponents(self, test_index: int, k: int = 8) -> np.ndarray:
        """Indices of the k most positive scores (training samples that raise the loss)."""
        return np.argsort(-self.scores[test_index], kind="stable")[:k]

    # ---- plain files ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``scores.npy`` and ``attribution.json`` into the folder ``path``, atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": self.method,
            "shape": list(self.scores.shape),
            "sign": "positive = including the training sample raises the test loss",
            "settings": self.settings,
            "completeness": None if self.completeness is None else {
                k: jsonable(np.asarray(a, dtype=float))
                for k, a in self.completeness.items()
            },
            "info": self.info,
        }
        atomic_write(folder / SCORES_FILE, lambda f: np.save(f, self.scores, allow_pickle=False))
        text = json.dumps(jsonable(meta), indent=2, allow_nan=False)
        atomic_write(folder / META_FILE, lambda f: f.write(text.encode()))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> Attribution:
        folder = Path(path)
        scores = np.load(folder / SCORES_FILE, allow_pickle=False)
        meta = json.loads((folder / META_FILE).read_text())
        comp = meta.get("completeness")
        if comp is not None:
            comp = {k: np.array([np.nan if v is None else v for v in a], dtype=float)
                    for k, a in comp.items()}
        return cls(scores, meta["method"], meta.get("settings", {}), comp, meta.get("info", {}))
