"""When an answer cannot be trusted: per-test-sample flags from a result's completeness and
info, and the one-line summaries the command line prints and the methods log.

Five kinds of flag, each a sorted list of test indices:

``baseline_not_moved``
    ``|delta| < move_threshold``, where ``delta = L_test(theta*) - L_test(theta')`` is the
    loss change the baseline made (for a contrast, the change of the margin). The threshold is
    absolute, :data:`MOVE_THRESHOLD` = 1e-3 in the loss's units (nats for cross-entropy, squared
    target units for regression): a baseline that moved the test loss by less than 1e-3 nats
    has not moved, and the scores then attribute a loss change of (almost) nothing: noise.
    It is deliberately not relative to the test loss: a confidently correct test sample has a
    loss near 0 (say 1e-6), and a baseline that raised it to 1e-5 moved it tenfold yet
    explains nothing. For regression targets on a very different scale, pass
    ``move_threshold``.
``fallback``
    unlearning diverged in its first epoch and theta' = theta* was used
    (``info["fallback_tests"]``); delta is then 0, so ``baseline_not_moved`` is set as well.
``truncated``
    unlearning diverged later and theta' is its last sound epoch
    (``info["truncated_tests"]``): a weaker baseline than the settings ask for.
``sign_mismatch``
    the scores add up to a change of the opposite sign to ``delta`` (both nonzero): the
    attribution says the training set moves the test loss one way and the baseline showed the
    other, so the zero attribution would be closer to the change than the scores are.
``large_gap``
    judged only when a ``gap_threshold`` is given (none by default): the completeness gap is
    above it. For Integrated Influence the gap is judged against ``delta_path = L_test(theta*)
    - L_test(theta_0)``, theta_0 the model at the far end of the target path, where that was
    measured, else against ``delta``. A NaN gap (a change of 0) counts as large.

Why the size of the gap is not judged by default. The scores are linear responses through a
damped curvature: their sum has the sign of the change they explain but not its size (the
default empirical Fisher with a damping of 0.3 times its mean eigenvalue shrinks it; the
one-epoch path models move the test loss by a median 1.6e-4 nats on digits, the unlearned
baseline by 3.9). Measured on the tuning half of the digits benchmark (200 test samples, IIF at
its defaults; docs/quality.md, "Completeness"), a gap above 0.5 against ``delta`` flagged 95 %
of the samples, whose LDS (0.495) was close to the others' (0.586), and a gap above 0.5
against ``delta_path`` flagged 99.5 %: neither says which answers are wrong. Both gaps stay in
every result's completeness and in the views; ``trust_flags(..., gap_threshold=0.5)`` judges
them for settings whose scores are meant to add up (a Gauss-Newton curvature with a small
damping and dense targets).

Indices are rows of the result's scores plus ``offset``; a result of the result store
(``iif.results.store``) holds every test sample, so there they are global test indices, and so are
those of its per-chunk info (``info["chunks"]``, written by :func:`globalized`); warnings
logged while a chunk is computed (:func:`log_flags`, :func:`name_tests`) name its samples by
global index through :func:`index_offset`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

GAP_THRESHOLD = 0.5
"""The completeness gap a caller may judge (``trust_flags(..., gap_threshold=GAP_THRESHOLD)``):
above it the scores miss the loss change they explain by more than half of it. Not judged by
default (module docstring)."""

MOVE_THRESHOLD = 1e-3
"""A baseline that changed the test loss by less than this (absolute, in the loss's units:
nats for cross-entropy) has not moved (``baseline_not_moved``)."""

KINDS = ("baseline_not_moved", "fallback", "truncated", "sign_mismatch", "large_gap")

# The kinds that make the scores unreliable (``truncated`` only weakens the baseline).
_SEVERE = ("baseline_not_moved", "fallback", "sign_mismatch", "large_gap")

_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("iif_test_offset", default=0)


def trust_flags(
    completeness: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None = None,
    offset: int = 0,
    gap_threshold: float | None = None,
    move_threshold: float = MOVE_THRESHOLD,
) -> dict[str, list[int]]:
    """Per-test-sample flags ``{kind: [test index, ...]}`` for every kind of :data:`KINDS`
    (empty lists where nothing is flagged), indices ``offset + row``.

    ``completeness`` (``{"sum", "delta", "gap"}`` arrays, with ``delta_path`` and
    ``gap_path`` for IIF, or None for methods without a baseline) gives
    ``baseline_not_moved``, ``sign_mismatch`` and, with a ``gap_threshold``, ``large_gap``
    (see the module docstring for the rules and thresholds). ``info`` gives ``fallback``
    and ``truncated`` from its ``fallback_tests`` and ``truncated_tests``, also those of
    ensemble ``members`` (whose recorded ``flags`` add their ``baseline_not_moved``; the
    sign and the gap are judged on the combined completeness only) and of result-store
    ``chunks`` (global indices where the chunk's info carries ``test_offset``, see
    :func:`globalized`; else rows offset by the chunk's first row, as stores written before
    that hold them). A ``flags`` entry of ``info`` itself is
    not read: it is what this function returns.
    """
    found: dict[str, set[int]] = {kind: set() for kind in KINDS}
    if info:
        _collect(info, 0, found, member=False)
    if completeness is not None:
        delta = _array(completeness.get("delta"))
        if delta is not None:
            found["baseline_not_moved"] |= {int(i) for i in np.flatnonzero(
                np.abs(delta) < move_threshold)}
        total = _array(completeness.get("sum"))
        if delta is not None and total is not None and total.shape == delta.shape:
            found["sign_mismatch"] |= {int(i) for i in np.flatnonzero(
                np.sign(total) * np.sign(delta) < 0)}
        gap = judged_gap(completeness)
        if gap is not None and gap_threshold is not None:
            found["large_gap"] |= {int(i) for i in np.flatnonzero(~(gap <= gap_threshold))}
    return {kind: sorted(int(i) + int(offset) for i in found[kind]) for kind in KINDS}


def judged_gap(completeness: Mapping[str, Any] | None) -> np.ndarray | None:
    """The completeness gap the ``large_gap`` flag judges, per row: ``gap_path`` where
    ``delta_path`` was measured (finite), else ``gap`` (module docstring); None without
    either."""
    if completeness is None:
        return None
    gap = _array(completeness.get("gap"))
    path_gap = _array(completeness.get("gap_path"))
    path_delta = _array(completeness.get("delta_path"))
    if path_gap is None or path_delta is None:
        return gap
    measured = np.isfinite(path_delta)
    if gap is None:
        return np.where(measured, path_gap, np.nan)
    return np.where(measured, path_gap, gap)


def flagged(flags: Mapping[str, Any] | None) -> list[int]:
    """Every test index with at least one flag, sorted."""
    return sorted({int(i) for kind in KINDS for i in (flags or {}).get(kind, [])})


def kinds_of(flags: Mapping[str, Any] | None, index: int) -> list[str]:
    """The kinds flagged for test ``index``, in the order of :data:`KINDS`."""
    return [kind for kind in KINDS if int(index) in set((flags or {}).get(kind, []))]


def summarize(
    flags: Mapping[str, Any] | None,
    completeness: Mapping[str, Any] | None = None,
    offset: int = 0,
    *,
    limit: int = 10,
    noun: str = "test",
    gap_threshold: float = GAP_THRESHOLD,
    move_threshold: float = MOVE_THRESHOLD,
) -> str | None:
    """One line naming the flagged test samples (up to ``limit`` per kind), or None when
    nothing is flagged, e.g. ``test 17 (delta +3e-07): the baseline did not move the test loss
    (|delta| < 0.001); these scores are not a reliable explanation``.

    ``completeness``, indexed like ``flags`` minus ``offset`` (the rows of the same result),
    adds each sample's delta or gap. A sample is named under its most telling kind only: a
    fallback explains why delta is 0, and a baseline that did not move explains the gap.
    The thresholds only word the line: give those ``flags`` were made with.
    """
    kinds = _shown_kinds(flags)
    if not any(kinds.values()):
        return None
    parts = []
    for kind, indices in kinds.items():
        if not indices:
            continue
        items = [_item(kind, completeness, i, offset) for i in indices[:limit]]
        more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
        label = noun if len(indices) == 1 else _plural(noun)
        parts.append(f"{label} {', '.join(items)}{more}: "
                     f"{_phrase(kind, gap_threshold, move_threshold)}")
    severe = any(kinds[k] for k in _SEVERE)
    tail = ("these scores are not a reliable explanation" if severe else
            "check their completeness before relying on these scores")
    return "; ".join(parts) + "; " + tail


def describe(
    flags: Mapping[str, Any] | None,
    index: int,
    completeness: Mapping[str, Any] | None = None,
    row: int | None = None,
) -> str | None:
    """A short note on test ``index`` (for a picture or a per-sample line), or None when it is
    not flagged. ``completeness`` with ``row`` (default ``index``): its entry for the sample."""
    kinds = _shown_kinds({kind: [index] for kind in kinds_of(flags, index)})
    shown = [kind for kind, idx in kinds.items() if idx]
    if not shown:
        return None
    row = index if row is None else row
    text = "; ".join(_phrase(kind, value=_value(kind, completeness, row)) for kind in shown)
    if any(kind in _SEVERE for kind in shown):
        return "not a reliable explanation: " + text
    return "caution: " + text


def log_flags(logger: logging.Logger, flags: Mapping[str, Any],
              completeness: Mapping[str, Any] | None = None, *, prefix: str = "",
              noun: str = "test") -> str | None:
    """Log :func:`summarize` of ``flags`` (rows of the result) as one warning, with indices
    shifted by :func:`current_offset`; returns the message (None: nothing flagged)."""
    offset = current_offset()
    shifted = {kind: [int(i) + offset for i in flags.get(kind, [])] for kind in KINDS}
    text = summarize(shifted, completeness, offset, noun=noun)
    if text is not None:
        logger.warning("%s%s", prefix, text)
    return text


def globalized(info: Mapping[str, Any], offset: int) -> dict[str, Any]:
    """A copy of a result's ``info`` whose test indices (``fallback_tests``,
    ``truncated_tests``, every kind of ``flags``, also in ensemble ``members``) are global:
    ``offset + row``, for a result whose rows are the test samples from ``offset`` on (a
    chunk of the result store). ``test_offset: offset`` records that they are."""
    out = _shifted(info, int(offset))
    out["test_offset"] = int(offset)
    return out


def name_tests(rows: Any, *, limit: int = 10) -> str:
    """``test 4`` or ``tests 4, 5, 6``: test ``rows`` (of the data being attributed) by
    global index, shifted by :func:`current_offset`; at most ``limit`` named."""
    offset = current_offset()
    indices = [offset + int(r) for r in np.ravel(np.asarray(rows, dtype=int))]
    if len(indices) == 1:
        return f"test {indices[0]}"
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return "tests " + ", ".join(str(i) for i in indices[:limit]) + more


@contextlib.contextmanager
def index_offset(offset: int) -> Iterator[None]:
    """Within this block, warnings logged by :func:`log_flags` name test samples as
    ``offset + row``: their global index when the rows are a slice of the test data starting
    at ``offset`` (a chunk of the result store, one sample explained)."""
    token = _OFFSET.set(int(offset))
    try:
        yield
    finally:
        _OFFSET.reset(token)


def current_offset() -> int:
    """The offset set by the innermost :func:`index_offset` (0 outside any)."""
    return _OFFSET.get()


# ---- helpers ---------------------------------------------------------------------------------
def _phrase(kind: str, gap_threshold: float = GAP_THRESHOLD,
            move_threshold: float = MOVE_THRESHOLD, value: str | None = None) -> str:
    """What ``kind`` means, with one sample's delta or gap ``value`` when given."""
    if kind == "baseline_not_moved":
        shown = "" if value is None else f"delta {value}, "
        return f"the baseline did not move the test loss ({shown}|delta| < {move_threshold:g})"
    if kind == "large_gap":
        shown = "" if value is None else f" {value}"
        return (f"the scores do not add up to the loss change (completeness gap{shown} > "
                f"{gap_threshold:g})")
    if kind == "sign_mismatch":
        shown = "" if value is None else f" ({value})"
        return (f"the scores add up to a loss change of the opposite sign to the one the "
                f"baseline made{shown}")
    if kind == "fallback":
        return "unlearning diverged at once and the baseline fell back to theta*"
    return "unlearning diverged and the baseline is its last sound epoch"


def _collect(info: Mapping[str, Any], base: int, found: dict[str, set[int]],
             member: bool) -> None:
    for kind, key in (("fallback", "fallback_tests"), ("truncated", "truncated_tests")):
        found[kind] |= {base + int(i) for i in info.get(key) or []}
    recorded = info.get("flags")
    if member and isinstance(recorded, Mapping):
        for kind in ("baseline_not_moved", "fallback", "truncated"):
            found[kind] |= {base + int(i) for i in recorded.get(kind) or []}
    for sub in info.get("members") or []:
        if isinstance(sub, Mapping):
            _collect(sub, base, found, member=True)
    for chunk in info.get("chunks") or []:
        if isinstance(chunk, Mapping):
            # global already (globalized), or rows of the chunk in a store written before
            rows = [0] if "test_offset" in chunk else chunk.get("rows") or [0]
            _collect(chunk, base + int(rows[0]), found, member=False)


_INDEX_LISTS = ("fallback_tests", "truncated_tests")


def _shifted(info: Mapping[str, Any], offset: int) -> dict[str, Any]:
    """``info`` with its test index lists (and its members') shifted by ``offset``."""
    out = dict(info)
    for key in _INDEX_LISTS:
        if isinstance(info.get(key), list):
            out[key] = [offset + int(i) for i in info[key]]
    flags = info.get("flags")
    if isinstance(flags, Mapping):
        out["flags"] = {kind: [offset + int(i) for i in indices] if isinstance(indices, list)
                        else indices for kind, indices in flags.items()}
    if isinstance(info.get("members"), list):
        out["members"] = [_shifted(m, offset) if isinstance(m, Mapping) else m
                          for m in info["members"]]
    return out


def _array(values: Any) -> np.ndarray | None:
    if values is None:
        return None
    return np.array([np.nan if v is None else v for v in np.ravel(np.asarray(values,
                                                                             dtype=object))],
                    dtype=float)


def _shown_kinds(flags: Mapping[str, Any] | None) -> dict[str, list[int]]:
    """Each flagged index under its most telling kinds: not-moved without the fallbacks (which
    say why), large gaps without the baselines that did not move (0 explains nothing)."""
    flags = flags or {}
    sets = {kind: {int(i) for i in flags.get(kind, []) or []} for kind in KINDS}
    shown = {
        "fallback": sets["fallback"],
        "truncated": sets["truncated"] - sets["fallback"],
        "baseline_not_moved": sets["baseline_not_moved"] - sets["fallback"],
        "sign_mismatch": sets["sign_mismatch"] - sets["baseline_not_moved"]
        - sets["fallback"],
        "large_gap": sets["large_gap"] - sets["baseline_not_moved"] - sets["fallback"]
        - sets["sign_mismatch"],
    }
    return {kind: sorted(shown[kind]) for kind in KINDS}


def _value(kind: str, completeness: Mapping[str, Any] | None, row: int) -> str | None:
    """The delta (``baseline_not_moved``) or gap (``large_gap``) of ``row`` as text."""
    if kind == "sign_mismatch":
        return _signs(completeness, row)
    key = {"baseline_not_moved": "delta", "large_gap": "gap"}.get(kind)
    if completeness is None or key is None:
        return None
    values = judged_gap(completeness) if key == "gap" else _array(completeness.get(key))
    if values is None or not 0 <= row < values.size:
        return None
    v = float(values[row])
    if key == "delta" and not abs(v) < MOVE_THRESHOLD:
        return None  # e.g. an ensemble's mean delta, when one member's baseline did not move
    if not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:+.2g}" if key == "delta" else f"{v:.2g}"


def _signs(completeness: Mapping[str, Any] | None, row: int) -> str | None:
    """``sum +0.3, delta -1.2`` of ``row``, when known."""
    if completeness is None:
        return None
    total, delta = _array(completeness.get("sum")), _array(completeness.get("delta"))
    if total is None or delta is None or not 0 <= row < min(total.size, delta.size):
        return None
    return f"sum {total[row]:+.2g}, delta {delta[row]:+.2g}"


def _item(kind: str, completeness: Mapping[str, Any] | None, index: int, offset: int) -> str:
    """``17 (delta +3e-07)``: a test index with its value, when known."""
    value = _value(kind, completeness, index - offset)
    if value is None:
        return str(index)
    if kind == "sign_mismatch":
        return f"{index} ({value})"
    return f"{index} ({'delta' if kind == 'baseline_not_moved' else 'gap'} {value})"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
