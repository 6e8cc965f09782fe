"""Human-readable views of attributions: proponent/opponent pictures and terminal summaries.

Every picture function returns a matplotlib ``Figure`` and writes it as PNG only when given a
``path`` (it returns the same Figure then too). Figures are made with matplotlib's object API
on the Agg canvas, not with pyplot: nothing is registered in pyplot's global state, so a figure
is freed as soon as it is dropped (``plt.close`` is never needed, in scripts or in the command
line), and in a notebook the returned Figure displays itself as a PNG. Images are given as flat
vectors (or arrays) plus an ``image_shape`` such as ``(8, 8)`` for scikit-learn digits or
``(28, 28)`` for MNIST (default: guessed for square images).

Sign convention: a negative score marks a proponent (including the training sample lowers the
test loss), a positive score an opponent (it raises the test loss).
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from iif.errors import InputError
from iif.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROPONENTS_HEADING = "Proponents (lower the test loss)"
OPPONENTS_HEADING = "Opponents (raise the test loss)"
NO_BASELINE = "no baseline (fallback)"  # the gap of a test sample whose unlearning fell back
COMPLETENESS_MEANING = (
    "Completeness check: summed over all training samples, the scores approximate the change "
    "of this test loss from the baseline model \u03b8' (which unlearned the test sample), or "
    "from the path's end \u03b8\u2080, to the trained model \u03b8*; gap = |sum \u2212 "
    "change| / |change|. Their scale follows the curvature's damping, so a gap grades an "
    "answer; a sum of the opposite sign to the change is flagged.")


@functools.cache
def _figure_class() -> Any:
    """matplotlib's ``Figure`` with a PNG ``_repr_png_``, so that a returned figure displays
    itself in Jupyter even before pyplot (and its inline backend) has been imported."""
    from matplotlib.figure import Figure

    class PictureFigure(Figure):
        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", facecolor="white")
            return buf.getvalue()

    return PictureFigure


# ---- ranking ---------------------------------------------------------------------------------
def top_entries(
    scores_row: Any, train_labels: Any = None, k: int = 8
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The k most negative (proponents) and k most positive (opponents) scores of one row.

    Each entry is ``{"index", "label", "score"}`` (``label`` only when labels are given), in
    the same order as :meth:`iif.Attribution.proponents` / ``opponents``.
    """
    row = _scores(scores_row)
    k = _check_k(k, row.size)
    labels = None if train_labels is None else np.asarray(train_labels)
    if labels is not None and labels.shape[0] != row.size:
        raise InputError(f"{labels.shape[0]} training labels for {row.size} scores")
    pro = np.argsort(row, kind="stable")[:k]
    opp = np.argsort(-row, kind="stable")[:k]

    def entry(i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"index": int(i)}
        if labels is not None:
            out["label"] = _plain(labels[i])
        out["score"] = float(row[i])
        return out

    return [entry(i) for i in pro], [entry(i) for i in opp]


# ---- terminal --------------------------------------------------------------------------------
def format_completeness(completeness: Mapping[str, Any] | None, unicode: bool = False,
                        margin: bool = False) -> str:
    """One line: sum of scores against the loss change it should match, and the gap.

    ``unicode`` writes theta and the minus sign as symbols (for pictures); the default is
    plain ASCII, safe on any terminal. ``completeness`` holds ``sum``, ``delta`` and ``gap``,
    and ``fell_back: True`` for a test sample whose baseline fell back (:func:`gap_text`).
    ``margin``: the scores of a contrast, whose delta is the change of the margin.
    """
    if not completeness:
        return "completeness: not available for this method"
    total = _num(completeness.get("sum"))
    delta = _num(completeness.get("delta"))
    gap = gap_text(completeness.get("gap"), delta, bool(completeness.get("fell_back")))
    theta, minus = ("\u03b8", "\u2212") if unicode else ("theta", "-")
    what = "margin" if margin else "L_test"
    line = (f"completeness: sum of scores {total:+.4g}, "
            f"{what}({theta}*) {minus} {what}({theta}') = {delta:+.4g}, gap {gap}")
    path = _num(completeness.get("delta_path"))
    if math.isfinite(path):  # the path's far end theta_0 (IIF), when it was trained
        line += (f"; path end {what}({theta}*) {minus} {what}({theta}_0) = {path:+.4g}, gap "
                 f"{gap_text(completeness.get('gap_path'), path)}")
    return line


def gap_text(gap: Any, delta: Any = None, fell_back: bool = False, digits: int = 3) -> str:
    """One completeness gap as text: the number, :data:`NO_BASELINE` for a test sample whose
    baseline fell back to theta* (its gap is NaN: there is no loss change to explain), else
    ``n/a``."""
    value = _num(gap)
    if math.isfinite(value):
        return f"{value:.{digits}g}"
    if fell_back:
        return NO_BASELINE
    return "n/a (delta = 0)" if _num(delta) == 0 else "n/a"


def contrast_caption(a: Any, b: Any, unicode: bool = False) -> str:
    """What the two rows of "why ``a`` and not ``b``?" mean. The scores attribute the margin
    ``log p_a - log p_b`` as a loss (its change from the baseline trained towards ``b`` to
    theta*), so a negative score means fitting the training sample lowered that margin: the
    sample pushes towards ``b`` whatever its own label, and a positive one pushes towards
    ``a``."""
    minus = "\u2212" if unicode else "-"
    a, b = _plain(a), _plain(b)
    return (f"samples that push towards {b}: training on them lowered the margin of {a} over "
            f"{b} (log p_{a} {minus} log p_{b}) of this test input, whatever their own label; "
            f"towards {a}: training on them raised it")


def format_test_summary(entry: Mapping[str, Any], title: str | None = None) -> str:
    """Terminal text for one explained test sample.

    ``entry`` holds ``proponents`` and ``opponents`` (lists from :func:`top_entries`) and
    optionally ``index``, ``label``, ``prediction``, ``confidence``, ``completeness`` and
    ``fell_back``, the per-test-sample record the demo writes to ``summary.json``.
    """
    lines = [title or _default_heading(entry)]
    pro = list(entry.get("proponents", []))
    opp = list(entry.get("opponents", []))
    has_labels = any("label" in e for e in pro + opp)
    fields = [("train", 6), ("label", 6), ("score", 11)] if has_labels else [
        ("train", 6), ("score", 11)]
    block = sum(w for _, w in fields)

    def cells(e: Mapping[str, Any] | None) -> str:
        if e is None:
            return " " * block
        values = {"train": e["index"], "label": e.get("label", ""),
                  "score": f"{e['score']:+.3e}"}
        return "".join(f"{values[name]!s:>{w}}" for name, w in fields)

    gap = "    "
    lines.append(f"  {'':4}{gap}{'proponents (lower the loss)':<{block}}{gap}"
                 f"opponents (raise the loss)")
    head = "".join(f"{name:>{w}}" for name, w in fields)
    lines.append(f"  {'rank':>4}{gap}{head}{gap}{head}")
    for r in range(max(len(pro), len(opp))):
        left = pro[r] if r < len(pro) else None
        right = opp[r] if r < len(opp) else None
        lines.append(f"  {r + 1:>4}{gap}{cells(left)}{gap}{cells(right)}".rstrip())
    completeness = entry.get("completeness")
    if completeness and entry.get("fell_back"):
        completeness = {**completeness, "fell_back": True}
    lines.append("  " + format_completeness(completeness))
    if entry.get("fell_back"):
        lines.append("  note: unlearning diverged; the baseline fell back to f(x; theta*)")
    return "\n".join(lines)


def _default_heading(entry: Mapping[str, Any]) -> str:
    parts = ["test sample"]
    if "index" in entry:
        parts.append(f"#{entry['index']}")
    text = " ".join(parts)
    details = []
    if "label" in entry:
        details.append(f"label {entry['label']}")
    if "prediction" in entry:
        pred = f"predicted {entry['prediction']}"
        if "confidence" in entry:
            pred += f" (p={float(entry['confidence']):.2f})"
        details.append(pred)
    return text + (": " + ", ".join(details) if details else "")


# ---- pictures --------------------------------------------------------------------------------
def plot_proponents_opponents(  # noqa: PLR0913 (documented notebook API: keywords kept flat)
    test_image: Any,
    test_label: Any,
    train_images: Any,
    train_labels: Any,
    scores_row: Any,
    path: str | os.PathLike | None = None,
    *,
    k: int = 8,
    image_shape: Sequence[int] | None = None,
    title: str | None = None,
    prediction: Any = None,
    completeness: Mapping[str, Any] | None = None,
    warning: str | None = None,
    cmap: str = "gray_r",
    dpi: int = 120,
) -> Figure:
    """The test image on the left, its top-k proponents in the upper row and its top-k
    opponents in the lower row, each with training index, label and score beneath: returns
    the matplotlib ``Figure``, written as PNG to ``path`` when one is given.

    For example, in a notebook::

        plot_proponents_opponents(x_test[0], y_test[0], x_train, y_train, result.scores[0],
                                  prediction=3, k=6)

    Args:
        test_image: one image, flat (prod(image_shape),) or already shaped.
        test_label: its true label (shown in the heading).
        train_images: (n_train, prod(image_shape)) or (n_train, *image_shape).
        train_labels: (n_train,) labels.
        scores_row: (n_train,) scores of this test sample (``Attribution.scores[s]``).
        path: write the figure there as PNG (parent folders are created); None (default):
            only return it.
        k: images per row.
        image_shape: (H, W) for grey-scale, or (H, W, 3) / (3, H, W) for colour; None
            (default): the image's own shape, or a square for a flat square image.
        title: heading; default "Test label L, predicted P" from the arguments.
        prediction: the model's prediction for the test sample (optional).
        completeness: ``{"sum", "delta", "gap"}`` of this test sample (optional, shown with
            one sentence saying what it means); ``"fell_back": True`` when its baseline fell
            back to theta* (the gap is then shown as "no baseline (fallback)").
        warning: why this answer cannot be trusted (``iif.results.diagnostics.describe``), drawn as
        a
            red note under the heading; None for none.
        cmap: colour map for grey-scale images (``gray_r``: dark ink on white).
    """
    row = _scores(scores_row)
    train = np.asarray(train_images)
    if train.shape[0] != row.size:
        raise InputError(f"{train.shape[0]} training images for {row.size} scores")
    labels = np.asarray(train_labels)
    if labels.shape[0] != row.size:
        raise InputError(f"{labels.shape[0]} training labels for {row.size} scores")
    k = _check_k(k, row.size)
    pro, opp = top_entries(row, labels, k)
    image_shape = _shape_of(test_image, image_shape)
    test = _as_image(test_image, image_shape, "test image")
    shown = {e["index"]: _as_image(train[e["index"]], image_shape, "training image")
             for e in pro + opp}
    vmin, vmax = _range([test, *shown.values()])
    show = {"cmap": cmap if test.ndim == 2 else None, "vmin": vmin, "vmax": vmax,
            "interpolation": "nearest"}

    layout = _panel_layout(k, completeness, warning)
    fig = _figure_class()(figsize=(layout.width, layout.height), dpi=dpi)
    grid = fig.add_gridspec(
        2, k + 2, width_ratios=[2.0, 0.2] + [1.0] * k,
        left=0.02, right=0.99, top=1 - (layout.header_h + 0.1) / layout.height,
        bottom=layout.foot_h / layout.height, wspace=0.12, hspace=0.75,
    )
    _draw_test_panel(fig.add_subplot(grid[:, 0]), test, show, test_label, prediction)
    for r, (entries, heading) in enumerate(
        [(pro, PROPONENTS_HEADING), (opp, OPPONENTS_HEADING)]
    ):
        _draw_train_row(fig, grid, r, k, entries, heading, shown, show)
    heading = title if title is not None else _plot_heading(test_label, prediction)
    _draw_header(fig, layout, heading)
    if path is not None:
        save_png(fig, path)
    return fig


@dataclass(frozen=True)
class _PanelLayout:
    """Sizes (inches) of a proponents/opponents figure and the texts under its heading."""

    width: float
    height: float
    header_h: float
    foot_h: float
    sub: str  # what the scores (and the completeness) mean
    note: str  # the wrapped warning, "" for none
    note_h: float


def _panel_layout(k: int, completeness: Mapping[str, Any] | None,
                  warning: str | None) -> _PanelLayout:
    """The figure size for ``k`` images per row, with room for the completeness sentence and
    the warning note."""
    col_w, header_h, row_h, foot_h = 1.25, 1.05, 1.95, 0.45
    width = col_w * (k + 2.2)
    note, note_h = _wrap_note(warning, width) if warning else ("", 0.0)
    sub = "score < 0: the training sample lowers this test loss; > 0: it raises it"
    if completeness is not None:
        sub = (format_completeness(completeness, unicode=True) + "\n"
               + _wrap(COMPLETENESS_MEANING, width, 14) + "\n" + sub)
    header_h += note_h + 0.16 * max(0, sub.count("\n") - 1)
    height = header_h + 2 * row_h + foot_h
    return _PanelLayout(width, height, header_h, foot_h, sub, note, note_h)


def _draw_test_panel(ax: Any, test: np.ndarray, show: Mapping[str, Any], test_label: Any,
                     prediction: Any) -> None:
    """The test image in ``ax``, captioned with its label and the prediction."""
    ax.imshow(test, **show)
    _frame(ax, width=2.0)
    caption = f"label {_plain(test_label)}"
    if prediction is not None:
        caption += f"\npredicted {_plain(prediction)}"
    ax.set_title("test sample", fontsize=11, fontweight="bold")
    ax.set_xlabel(caption, fontsize=10)


def _draw_train_row(fig: Any, grid: Any, r: int, k: int, entries: Sequence[Mapping[str, Any]],
                    heading: str, shown: Mapping[int, np.ndarray],
                    show: Mapping[str, Any]) -> None:
    """Row ``r`` of ``k`` training images (``entries``: index, label, score), headed by
    ``heading``; cells beyond the entries are left blank."""
    for c in range(k):
        cell = fig.add_subplot(grid[r, c + 2])
        if c >= len(entries):
            cell.axis("off")
            continue
        e = entries[c]
        cell.imshow(shown[e["index"]], **show)
        _frame(cell)
        cell.set_xlabel(
            f"#{e['index']}  label {e['label']}\n{e['score']:+.2e}",
            fontsize=8.5, labelpad=3,
        )
        if c == 0:
            cell.set_title(heading, loc="left", fontsize=10.5, fontweight="bold", pad=6)


def _plot_heading(test_label: Any, prediction: Any) -> str:
    """The default heading: "Test label L, predicted P" (and whether it is misclassified)."""
    heading = f"Test label {_plain(test_label)}"
    if prediction is not None:
        heading += f", predicted {_plain(prediction)}"
        if str(_plain(prediction)) != str(_plain(test_label)):
            heading += " (misclassified)"
    return heading


def _draw_header(fig: Any, layout: _PanelLayout, heading: str) -> None:
    """The heading, the line on what scores mean and any warning note, at the top."""
    height = layout.height
    fig.suptitle(heading, x=0.02, y=1 - 0.12 / height, ha="left", va="top", fontsize=13,
                 fontweight="bold")
    fig.text(0.02, 1 - 0.5 / height, layout.sub, ha="left", va="top", fontsize=9.5,
             color="0.25")
    if layout.note:
        _warning_note(fig, layout.note, 0.02,
                      1 - (layout.header_h - layout.note_h + 0.02) / height)


# ---- helpers ---------------------------------------------------------------------------------
def _wrap(text: str, width_in: float, chars_per_inch: float) -> str:
    """``text`` wrapped to a line width of ``width_in`` inches."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width=max(40, int(width_in * chars_per_inch))))


def _shape_of(image: Any, given: Sequence[int] | None) -> tuple[int, ...]:
    """``given``, or the shape to draw ``image`` as (:func:`image_shape`), or an error."""
    shape = image_shape(np.shape(image), given)
    if shape is None:
        raise InputError(f"cannot draw an input of shape {tuple(np.shape(image))} as an image: "
                         f"give image_shape, e.g. (28, 28)")
    return shape


def _wrap_note(text: str, width_in: float) -> tuple[str, float]:
    """A warning note wrapped to ``width_in`` inches, and the inches of height it needs."""
    import textwrap

    lines = textwrap.wrap("WARNING: " + text, width=max(40, int(width_in * 11)))
    return "\n".join(lines), 0.08 + 0.19 * len(lines)


def _warning_note(fig: Any, text: str, x: float, y: float) -> None:
    """A flagged answer's note, in red and bold, its top at figure height fraction ``y``."""
    fig.text(x, y, text, ha="left", va="top", fontsize=10, color="#c00000", fontweight="bold")


def _frame(ax, width: float = 0.8) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(width)
        spine.set_color("0.3")


def _as_image(value: Any, shape: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{what} has {arr.size} values; image_shape {shape} needs "
                         f"{int(np.prod(shape))}")
    arr = arr.reshape(shape)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"image_shape must be (H, W) or (H, W, 3), got {shape}")
    return arr


def _range(images: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([im.ravel() for im in images])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _scores(scores_row: Any) -> np.ndarray:
    row = np.asarray(scores_row, dtype=np.float64)
    if row.ndim != 1 or row.size == 0:
        raise InputError(f"scores_row must be a non-empty 1-d array, got shape {row.shape}")
    return row


def _check_k(k: int, n: int) -> int:
    if int(k) < 1:
        raise InputError(f"k must be >= 1, got {k!r}")
    return min(int(k), n)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _plain(value: Any) -> Any:
    """numpy/torch scalars as Python numbers, for text and JSON."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def plot_rankings(
    test_image: Any,
    heading: str,
    rows: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    train_images: Any,
    path: str | os.PathLike | None = None,
    *,
    image_shape: Sequence[int] | None = None,
    note: str | None = None,
    warning: str | None = None,
    cmap: str = "gray_r",
    dpi: int = 110,
) -> Figure:
    """Rankings side by side: the test image on the left and one row per entry of ``rows`` =
    ``[(row title, entries)]``, each entry ``{"index", "label", "score"}`` (as from
    :func:`top_entries`) drawn as its training image with training index, label and score
    beneath. Returns the matplotlib ``Figure``, written as PNG to ``path`` when one is given.

    ``image_shape``: as in :func:`plot_proponents_opponents` (None: guessed). ``note``: grey
    lines under the heading (what the scores mean, say). ``warning``: why this answer cannot be
    trusted, a red note under the heading."""
    if not rows:
        raise InputError("plot_rankings needs at least one row")
    train = np.asarray(train_images)
    k = max(len(entries) for _, entries in rows)
    image_shape = _shape_of(test_image, image_shape)
    test = _as_image(test_image, image_shape, "test image")
    images = {e["index"]: _as_image(train[e["index"]], image_shape, "training image")
              for _, entries in rows for e in entries}
    vmin, vmax = _range([test, *images.values()])
    show = {"cmap": cmap if test.ndim == 2 else None, "vmin": vmin, "vmax": vmax,
            "interpolation": "nearest"}
    width = 1.15 * (k + 4.2)
    warn, warn_h = _wrap_note(warning, width) if warning else ("", 0.0)
    lines = "\n".join(_wrap(part, width, 15) for part in note.split("\n")) if note else ""
    lines_h = 0.16 * (lines.count("\n") + 1) + 0.05 if lines else 0.0
    row_h, head_h = 1.35, 0.7 + warn_h + lines_h
    height = head_h + row_h * len(rows) + 0.25
    fig = _figure_class()(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(len(rows), k + 2, width_ratios=[2.6, 1.6] + [1.0] * k,
                            left=0.01, right=0.995, top=1 - head_h / height,
                            bottom=0.25 / height,  # room for the last row's labels
                            wspace=0.1, hspace=0.55)
    fig.suptitle(heading, fontsize=11, fontweight="bold", x=0.01, ha="left")
    if lines:
        fig.text(0.01, 1 - 0.42 / height, lines, ha="left", va="top", fontsize=8.5,
                 color="0.25")
    if warning:
        _warning_note(fig, warn, 0.01, 1 - (0.4 + lines_h) / height)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(test, **show)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("test image", fontsize=9)
    for r, (title, entries) in enumerate(rows):
        label_ax = fig.add_subplot(grid[r, 1])
        label_ax.axis("off")
        label_ax.text(1.0, 0.5, title, ha="right", va="center", fontsize=9,
                      transform=label_ax.transAxes)
        for c, e in enumerate(entries):
            cell = fig.add_subplot(grid[r, c + 2])
            cell.imshow(images[e["index"]], **show)
            cell.set_xticks([])
            cell.set_yticks([])
            label = f"  label {e['label']}" if "label" in e else ""
            cell.set_xlabel(f"#{e['index']}{label}\n{e['score']:+.2g}", fontsize=7,
                            labelpad=2)
    if path is not None:
        save_png(fig, path)
    return fig


def image_shape(sample_shape: Sequence[int], given: Sequence[int] | None = None
                ) -> tuple[int, ...] | None:
    """The shape to draw one input as: ``given``, the input's own shape when it has two or
    three dimensions, a square for a flat input of square length, else None (no picture)."""
    if given:
        return tuple(given)
    shape = tuple(sample_shape)
    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        return (side, side) if side * side == shape[0] else None
    return shape if len(shape) in (2, 3) else None


def save_png(fig: Any, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write a matplotlib ``Figure`` as PNG atomically (parent folders created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: fig.savefig(f, format="png", facecolor="white",
                                               **({"dpi": dpi} if dpi else {})))
    return target
