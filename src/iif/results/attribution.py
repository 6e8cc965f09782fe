"""The result every method returns, and its plain on-disk form (npy without pickle + JSON).

Sign convention: ``scores[s, i] > 0`` means including training sample i *raises* the loss of
test sample s (i is an opponent); ``< 0`` means it lowers it (a proponent). ``result.helpful``
is the same result with the sign flipped (positive = helpful, the convention of Captum, TRAK,
Kronfluence and dattri; see ``docs/from-other-libraries.md``); proponents and opponents are the
same samples in both.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np

from iif.errors import InputError
from iif.io import atomic_write, jsonable, npy_problem, read_json_file, regular_file

SCORES_FILE = "scores.npy"
META_FILE = "attribution.json"
ORIENTATIONS = ("loss", "helpful")
TABLE_COLUMNS = ("test", "train", "score", "rank")
_SIGN = {"loss": "positive = including the training sample raises the test loss",
         "helpful": "positive = including the training sample lowers the test loss (helpful)"}


class Ranked(NamedTuple):
    """One training sample of a ranking: its index and its score (in the result's
    orientation). Unpacks as ``index, score``."""

    index: int
    score: float


@dataclass
class Attribution:
    """Scores (n_test, n_train) with the settings and diagnostics that produced them.

    completeness: per test sample ``sum`` (sum_i I(i)), ``delta`` (L_test(theta*) -
    L_test(theta')) and ``gap`` (|sum - delta| / |delta|; NaN when delta = 0), or None for
    methods without a baseline. It always describes the loss view (the sum of the
    ``orientation="loss"`` scores), also on a ``helpful`` view.

    orientation: ``"loss"`` (every method's result: positive = raises the test loss) or
    ``"helpful"`` (the sign flipped, from :attr:`helpful`). Proponents (the training samples
    that lower the test loss) and opponents are the same samples in either orientation.
    """

    scores: np.ndarray
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    completeness: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    orientation: str = "loss"

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be (n_test, n_train), got shape {self.scores.shape}")
        if self.orientation not in ORIENTATIONS:
            raise InputError(f"orientation must be 'loss' or 'helpful', got "
                             f"{self.orientation!r}")

    @property
    def n_test(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def proponents(self, test_index: int, k: int = 8, *, with_scores: bool = False
                   ) -> np.ndarray | list[Ranked]:
        """The k training samples that most lower the loss of test sample ``test_index``
        (the most negative scores; on a :attr:`helpful` view the most positive), strongest
        first: their indices, or with ``with_scores=True`` a list of ``Ranked(index, score)``
        pairs (plain ``int`` and ``float``)."""
        order = np.argsort(self._loss_row(test_index), kind="stable")[:k]
        return self._ranked(test_index, order) if with_scores else order

    def opponents(self, test_index: int, k: int = 8, *, with_scores: bool = False
                  ) -> np.ndarray | list[Ranked]:
        """The k training samples that most raise the loss of test sample ``test_index``
        (the most positive scores; on a :attr:`helpful` view the most negative), strongest
        first: indices, or ``Ranked(index, score)`` pairs with ``with_scores=True``."""
        order = np.argsort(-self._loss_row(test_index), kind="stable")[:k]
        return self._ranked(test_index, order) if with_scores else order

    def _loss_row(self, test_index: int) -> np.ndarray:
        row = self.scores[test_index]
        return row if self.orientation == "loss" else -row

    def _ranked(self, test_index: int, order: np.ndarray) -> list[Ranked]:
        row = self.scores[test_index]
        return [Ranked(int(i), float(row[i])) for i in order]

    # ---- orientation ---------------------------------------------------------------------
    @property
    def helpful(self) -> Attribution:
        """This result with the sign flipped, ``scores * -1``: positive = including the
        training sample *lowers* the test loss (helps), the convention of Captum, TRAK,
        Kronfluence and dattri. Proponents and opponents stay the same samples; completeness
        stays in the loss view; ``oriented("loss")`` goes back."""
        return self.oriented("helpful")

    def oriented(self, orientation: str) -> Attribution:
        """This result in ``orientation`` ``"loss"`` (positive = raises the test loss, every
        method's own) or ``"helpful"`` (positive = lowers it): itself when it already is,
        else a copy with the scores negated."""
        if orientation not in ORIENTATIONS:
            raise InputError(f"orientation must be 'loss' or 'helpful', got {orientation!r}")
        if orientation == self.orientation:
            return self
        if "contrast" in self.info:
            raise InputError("a contrast result is already oriented by its question (positive "
                             "= pushes towards the predicted class A); it has no loss sign to "
                             "flip")
        return replace(self, scores=-self.scores, settings=dict(self.settings),
                       info=dict(self.info), orientation=orientation)

    # ---- tables --------------------------------------------------------------------------
    def to_pandas(self, *, k: int | None = None, test_indices: Sequence[int] | None = None):
        """The scores as a long ``pandas.DataFrame`` with columns ``test``, ``train``,
        ``score``, ``rank``: one row per (test sample, training sample) pair, or with ``k``
        only each test sample's k proponents and k opponents. ``rank`` is the position in the
        proponent order: 1 = the training sample that most lowers the test loss, n_train =
        the one that most raises it (the same in either orientation). ``test`` is the row of
        the score matrix, or ``test_indices[row]`` when given (e.g. the test-set indices of
        the samples attributed). Rows are sorted by test, then rank.

        Needs pandas (not a dependency of iif); :meth:`write_table` writes the same table as
        CSV without it.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("Attribution.to_pandas needs pandas, which iif does not install: "
                              "pip install pandas; or write the same table as CSV without it "
                              "with Attribution.write_table(path)") from exc
        test, train, score, rank = self._long(k, test_indices)
        return pd.DataFrame({"test": test, "train": train, "score": score, "rank": rank})

    def write_table(self, path: str | os.PathLike, *, k: int | None = None,
                    test_indices: Sequence[int] | None = None) -> Path:
        """Write the long table of :meth:`to_pandas` as CSV (header ``test,train,score,rank``;
        each score in Python's shortest form that reads back exactly), atomically; no pandas
        needed. Returns the path."""
        test, train, score, rank = self._long(k, test_indices)
        lines = [",".join(TABLE_COLUMNS)]
        lines += [f"{t},{i},{float(v)!r},{r}" for t, i, v, r in
                  zip(test.tolist(), train.tolist(), score.tolist(), rank.tolist(), strict=True)]
        text = "\n".join(lines) + "\n"
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda f: f.write(text.encode()))
        return target

    def _long(self, k: int | None, test_indices: Sequence[int] | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n_test, n_train = self.scores.shape
        if test_indices is None:
            ids = np.arange(n_test)
        else:
            ids = np.asarray(test_indices)
            if ids.shape != (n_test,) or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(f"test_indices must be {n_test} integers (one per row of the "
                                 f"scores), got {test_indices!r}")
        loss = self.scores if self.orientation == "loss" else -self.scores
        order = np.argsort(loss, axis=1, kind="stable")  # proponents first
        ranks = np.arange(1, n_train + 1)
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise InputError(f"k must be an integer >= 1 or None, got {k!r}")
            if 2 * int(k) < n_train:
                keep = np.r_[0:int(k), n_train - int(k):n_train]
                order, ranks = order[:, keep], ranks[keep]
        width = order.shape[1]
        rows = np.repeat(np.arange(n_test), width)
        train = order.ravel()
        return (ids[rows].astype(np.int64), train.astype(np.int64), self.scores[rows, train],
                np.tile(ranks, n_test).astype(np.int64))

    # ---- plain files ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``scores.npy`` and ``attribution.json`` into the folder ``path``, atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": self.method,
            "shape": list(self.scores.shape),
            "sign": _SIGN[self.orientation],
            "settings": self.settings,
            "completeness": None if self.completeness is None else {
                k: jsonable(np.asarray(a, dtype=float))
                for k, a in self.completeness.items()
            },
            "info": self.info,
        }
        if self.orientation != "loss":  # only a helpful view says so: loss is the default
            meta["orientation"] = self.orientation
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
        orientation = meta.get("orientation", "loss")
        if orientation not in ORIENTATIONS:
            _malformed(meta_path, f"'orientation' is {orientation!r}, not 'loss' or 'helpful'")
        return cls(scores, meta["method"], meta.get("settings", {}), comp, meta.get("info", {}),
                   orientation)


# ---- reading the files, every failure named ----------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"


def _remedy(path: Path) -> str:
    """What to do about a damaged ``scores.npy`` or ``attribution.json`` in its folder."""
    if (path.parent / "manifest.json").is_file():  # a result store (iif.results.store): reassemble
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


def _regular(path: Path, what: str) -> None:
    """:func:`iif.io.regular_file` (a FIFO or /dev/zero in its place: InputError, never
    read); a folder is worded like the other unreadable files."""
    if path.is_dir():
        _malformed(path, f"cannot be read ({os.strerror(errno.EISDIR)})")
    regular_file(path, what)


def _load_scores(path: Path) -> np.ndarray:
    try:
        _regular(path, "the scores file")
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        _malformed(path, "missing")
    except OSError as exc:
        _malformed(path, f"cannot be read ({exc.strerror or exc})")
    if magic != _NPY_MAGIC:
        _malformed(path, "not a NumPy array file")
    header = npy_problem(path, "the scores file")
    if header:
        _malformed(path, header)
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
        _regular(path, "the result's record")
        return read_json_file(path, "the result's record")
    except FileNotFoundError:
        _malformed(path, "missing")
    except InputError:
        raise
    except OSError as exc:
        _malformed(path, f"cannot be read ({exc.strerror or exc})")
    except ValueError as exc:  # not JSON, or not UTF-8 text
        _malformed(path, f"not valid JSON ({exc})")
