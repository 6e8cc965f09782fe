"""The result every method returns, and its plain on-disk form (npy without pickle + JSON).

Sign convention: ``scores[s, i] > 0`` means including training sample i *raises* the loss of
test sample s (i is an opponent); ``< 0`` means it lowers it (a proponent).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from iif.errors import InputError
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
        """The result saved in the folder ``path``; an :class:`~iif.errors.InputError` naming
        the file and what is wrong with it when a file is missing, damaged or malformed."""
        folder = Path(path)
        scores = _load_scores(folder / SCORES_FILE)
        meta_path = folder / META_FILE
        meta = _load_json(meta_path)
        if not isinstance(meta, dict):
            _malformed(meta_path, f"expected a JSON object, found {_kind(meta)}")
        if not isinstance(meta.get("method"), str):
            _malformed(meta_path, "no method name (key 'method')")
        shape = meta.get("shape")
        if shape is not None and shape != list(scores.shape):
            _malformed(meta_path, f"says the scores have shape {shape}, but {SCORES_FILE} "
                                  f"holds {list(scores.shape)}")
        for key in ("settings", "info"):
            if not isinstance(meta.get(key, {}), dict):
                _malformed(meta_path, f"'{key}' is {_kind(meta[key])}, not a JSON object")
        comp = meta.get("completeness")
        if comp is not None:
            if not isinstance(comp, dict):
                _malformed(meta_path, f"'completeness' is {_kind(comp)}, not a JSON object")
            for k, a in comp.items():
                if not (isinstance(a, list) and len(a) == scores.shape[0] and all(
                        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                        for v in a)):
                    _malformed(meta_path, f"completeness '{k}' is not a list of "
                                          f"{scores.shape[0]} numbers (one per test sample)")
            comp = {k: np.array([np.nan if v is None else v for v in a], dtype=float)
                    for k, a in comp.items()}
        return cls(scores, meta["method"], meta.get("settings", {}), comp, meta.get("info", {}))


# ---- reading the files, every failure named ----------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"


def _remedy(path: Path) -> str:
    """What to do about a damaged ``scores.npy`` or ``attribution.json`` in its folder."""
    if (path.parent / "manifest.json").is_file():  # a result store (iif.store): reassemble
        return (f"remove {SCORES_FILE} and {META_FILE} and run the same iif attribute command "
                f"again (it reassembles them from the finished chunks)")
    return "remove the folder and write the result again (iif attribute or Attribution.save)"


def _malformed(path: Path, what: str) -> NoReturn:
    raise InputError(f"{path}: {what}; {_remedy(path)}")


def _kind(value: Any) -> str:
    """``a list``, ``a string``... : what a JSON value is, in words."""
    names = {list: "a list", str: "a string", dict: "an object", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _load_scores(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        _malformed(path, "missing")
    except OSError as exc:
        _malformed(path, f"cannot be read ({exc.strerror or exc})")
    if magic != _NPY_MAGIC:
        _malformed(path, "not a NumPy array file")
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        _malformed(path, f"a damaged NumPy file ({exc})")
    if scores.ndim != 2:
        _malformed(path, f"holds an array of shape {list(scores.shape)}, not a (test x "
                         f"training samples) matrix")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        _malformed(path, f"holds {scores.dtype} values, not numbers")
    return scores


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _malformed(path, "missing")
    except OSError as exc:
        _malformed(path, f"cannot be read ({exc.strerror or exc})")
    except ValueError as exc:  # not JSON, or not UTF-8 text
        _malformed(path, f"not valid JSON ({exc})")
