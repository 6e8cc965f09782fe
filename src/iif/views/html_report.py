"""A self-contained HTML page of an attribution result (``iif report DIR --html``).

Sign convention: a score < 0 marks a proponent (including the training sample lowers the test
loss), a score > 0 an opponent (it raises it); a ``helpful`` view and a contrast result say
what their sign means on the page instead.

The page holds the method, its settings and the run key, then one ``<section class="entry">``
per test sample: its index, label and prediction when known, the completeness (sum of scores,
change of the test loss, gap) when the method reports it, and its top proponents and
opponents with training indices and scores. Samples are drawn as inline PNG images (base64
data URIs) when the inputs look like images, printed as text when they are strings or a
``decode`` function turns them into text, and left as bare indices without data. Everything
is inline and HTML-escaped: one ``<style>`` block, no scripts, fonts or network requests.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iif.errors import InputError
from iif.io import atomic_write
from iif.results.attribution import META_FILE, SCORES_FILE, Attribution
from iif.task.data import several_inputs
from iif.task.inputs import Inputs
from iif.views.report import _as_image, _check_k, _plain, contrast_caption, gap_text
from iif.views.report import image_shape as guess_shape

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MAX_TEXT = 2000  # characters of one text sample shown; longer ones are cut with an ellipsis
IMAGE_PX = 72  # on-page size of the longer side of a sample image
Decode = Callable[[Any], str]


@dataclass(frozen=True)
class PageData:
    """What the page shows beside the scores; every field optional.

    train_x, test_x: the inputs, one per training / test sample (arrays, tensors or lists of
        strings), drawn as images or printed as text.
    train_labels, test_labels, predictions: shown beside the indices (predictions: the
        model's output per test sample).
    decode: ``decode(x) -> str`` for one input (say a 1-D tensor of byte or token ids): the
        samples are printed as its text.
    image_shape: the shape to draw one input as, e.g. ``(28, 28)`` (default: guessed).
    tests: the test samples to show, by index, in this order (default: all).
    warning: a line on the whole page, e.g. that the samples could not be checked against
        the run the scores come from.
    """

    train_x: Any = None
    test_x: Any = None
    train_labels: Any = None
    test_labels: Any = None
    predictions: Any = None
    decode: Decode | None = None
    image_shape: Sequence[int] | None = None
    tests: Sequence[int] | None = None
    warning: str | None = None


def write_html(  # noqa: PLR0913 (notebook API: keywords kept flat, as in iif.views.report)
    source: Attribution | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    top: int = 5,
    train_x: Any = None,
    test_x: Any = None,
    train_labels: Any = None,
    test_labels: Any = None,
    predictions: Any = None,
    decode: Decode | None = None,
    image_shape: Sequence[int] | None = None,
    tests: Sequence[int] | None = None,
) -> Path:
    """Write the HTML page of ``source`` (an :class:`~iif.Attribution`, or a folder written
    by ``iif attribute --out`` or ``Attribution.save``) to ``path`` atomically; return the
    path. Default ``path``: ``report.html`` in the folder (required for an Attribution).

    Sign convention: score < 0 = proponent (the training sample lowers the test loss),
    score > 0 = opponent (it raises it). ``top`` proponents and opponents per test sample;
    the other keywords are the fields of :class:`PageData`.
    """
    data = PageData(train_x, test_x, train_labels, test_labels, predictions, decode,
                    image_shape, tests)
    result, folder, run_key = load_result(source)
    return _write(result, folder, run_key, path, data, top)


def report_folder(folder: str | os.PathLike, path: str | os.PathLike | None = None, *,
                  top: int = 5, task: str | None = None,
                  image_shape: Sequence[int] | None = None,
                  tests: Sequence[int] | None = None) -> Path:
    """``iif report DIR --html``: write the page of the result folder ``folder`` to ``path``
    (default ``folder/report.html``); return the path. With ``task`` (``MODULE:FUNCTION``,
    as for ``iif attribute``) the page shows the task's samples, labels and the model's
    predictions, after checking they are the model and data the scores were computed with
    (a folder recording nothing to check them against is reported in a warning, logged and
    on the page); a ``decode(x) -> str`` function in the task's module prints the inputs as
    text. Sign convention: score < 0 = proponent, > 0 = opponent."""
    result, where, run_key = load_result(folder)
    data = PageData(image_shape=image_shape)
    if task is not None:
        data = task_data(where, task, result, image_shape)
        if data.warning:
            log.warning("%s", data.warning)
    return _write(result, where, run_key, path, dataclasses.replace(data, tests=tests), top)


def task_data(folder: Path, task: str, result: Attribution,
              image_shape: Sequence[int] | None = None) -> PageData:
    """The :class:`PageData` of the task function ``task`` for the result in ``folder``:
    inputs, labels, the model's predictions and the module's ``decode`` if it has one. A task
    whose model or data are not the ones the scores were computed with is refused; the
    warning of a folder recording nothing to check them against is the page's."""
    from iif.task.job import task_module
    from iif.views.show import _job_data, _predictions

    job, train, test, warning = _job_data(folder, task, result)
    if job is None:
        return PageData(image_shape=image_shape)
    decode = getattr(task_module(task), "decode", None)
    if several_inputs(train.x) and not callable(decode):
        log.info("samples with several inputs are not drawn: the page lists their indices "
                 "(a decode(x) function in the task's module prints them as text)")
        return PageData(None, None, train.labels.cpu().numpy(), test.labels.cpu().numpy(),
                        _predictions(job.task, test.x), None, image_shape, warning=warning)
    return PageData(train.x.cpu(), test.x.cpu(), train.labels.cpu().numpy(),
                    test.labels.cpu().numpy(), _predictions(job.task, test.x),
                    _guarded(decode, task) if callable(decode) else None, image_shape,
                    warning=warning)


def _guarded(decode: Decode, task: str) -> Decode:
    """``decode`` whose failures name the user's function (the message of any exception
    raised inside it, with its file and line)."""
    from iif.errors import UserCodeError

    def call(x: Any) -> str:
        try:
            return decode(x)
        except Exception as exc:
            raise UserCodeError(f"calling decode() of {task.rsplit(':', 1)[0]}", exc) from exc

    return call


def _write(result: Attribution, folder: Path | None, run_key: str | None,
           path: str | os.PathLike | None, data: PageData, top: int) -> Path:
    """Render the page and write it to ``path`` (default ``folder/report.html``) atomically."""
    if path is None:
        if folder is None:
            raise InputError("write_html needs a path for an Attribution (no folder to put "
                             f"{REPORT_FILE} in)")
        path = folder / REPORT_FILE
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target} is a folder; give the path of the HTML file to write")
    page = render_html(result, data, top=top, run_key=run_key,
                       source=str(folder) if folder is not None else None)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: f.write(page.encode("utf-8")))
    return target


def load_result(source: Attribution | str | os.PathLike
                ) -> tuple[Attribution, Path | None, str | None]:
    """The result of ``source`` (an Attribution or a result folder), its folder (None for an
    Attribution) and its run key (None when unknown); an :class:`InputError` naming what is
    wrong with a folder that holds no finished result."""
    from iif.results.store import MANIFEST
    from iif.views.show import _check_folder, _in_progress, _read_json

    if isinstance(source, Attribution):
        return source, None, _text_or_none(source.info.get("run_key"))
    folder = Path(source)
    _check_folder(folder)
    if not (folder / SCORES_FILE).exists() or not (folder / META_FILE).exists():
        raise InputError(_in_progress(folder))  # names the chunks done and how to finish
    result = Attribution.load(folder)
    key = result.info.get("run_key")
    if (folder / MANIFEST).exists():
        manifest = _read_json(folder / MANIFEST, "remove the folder and run iif attribute "
                                                 "again")
        if isinstance(manifest, dict) and manifest.get("key"):
            key = manifest["key"]
    return result, folder, _text_or_none(key)


def _shown(result: Attribution, tests: Sequence[int] | None) -> list[int]:
    """The test indices to show: all, or ``tests`` checked against the result."""
    if tests is None:
        return list(range(result.n_test))
    shown = [int(i) for i in tests]
    if not shown:
        raise InputError("no test index given")
    for i in shown:
        if not 0 <= i < result.n_test:
            raise InputError(f"test index {i} is outside 0..{result.n_test - 1}")
    return shown


def render_html(result: Attribution, data: PageData | None = None, *, top: int = 5,
                run_key: str | None = None, source: str | None = None) -> str:
    """The page of ``result`` as one HTML string (see :func:`write_html`; sign convention:
    score < 0 = proponent, > 0 = opponent). ``source``: the folder named in the heading."""
    data = data or PageData()
    k = _check_k(top, result.n_train)
    samples = _Samples.of(result, data)
    flags = _page_flags(result)
    parts = [_head(result.method), _header(result, run_key, source, flags, data.warning),
             "<main>"]
    parts += [_entry(result, i, k, samples, flags) for i in _shown(result, data.tests)]
    parts.append("</main>\n<footer>" + _esc(_footer()) + "</footer>\n</body>\n</html>\n")
    return "\n".join(parts)


# ---- samples: images, text or nothing ---------------------------------------------------------
@dataclass
class _Samples:
    """How the page shows the inputs, labels and predictions it was given."""

    data: PageData
    train_kind: str  # "image", "text" or "none"
    test_kind: str
    shape: tuple[int, ...] | None
    bounds: tuple[float, float]  # value range mapped to white..black, shared by the page
    cache: dict[tuple[str, int], str]

    @classmethod
    def of(cls, result: Attribution, data: PageData) -> _Samples:
        _check_lengths(result, data)
        shape = None
        arrays = []
        for x in (data.train_x, data.test_x):
            if _kind(x, data) == "image":
                arr = _numeric(x)
                shape = shape or _image_shape(arr, data.image_shape)
                arrays.append(arr)
        return cls(data, _kind(data.train_x, data), _kind(data.test_x, data), shape,
                   _bounds(arrays), {})

    def html(self, which: str, i: int) -> str:
        """Test (``which="test"``) or training sample ``i`` as an inline image, escaped text,
        or "" when the page has no data for it."""
        kind = self.train_kind if which == "train" else self.test_kind
        x = self.data.train_x if which == "train" else self.data.test_x
        if kind == "none":
            return ""
        if kind == "text":
            text = self.data.decode(x[i]) if self.data.decode is not None else x[i]
            if isinstance(text, bytes):  # raw bytes: shown as UTF-8, bad bytes replaced
                text = text.decode("utf-8", errors="replace")
            text = str(text)
            if len(text) > MAX_TEXT:
                text = text[:MAX_TEXT] + "\u2026"
            return f'<pre class="text">{_esc(text)}</pre>'
        if (which, i) not in self.cache:
            picture = _as_image(_numeric(x[i : i + 1])[0], self.shape, f"{which} sample {i}")
            self.cache[(which, i)] = _image_tag(picture, self.bounds,
                                                f"{which} sample {i}")
        return self.cache[(which, i)]

    def label(self, which: str, i: int) -> str | None:
        labels = self.data.train_labels if which == "train" else self.data.test_labels
        return None if labels is None else _value_text(labels[i])

    def prediction(self, i: int) -> str | None:
        preds = self.data.predictions
        return None if preds is None else _value_text(preds[i])


def _kind(x: Any, data: PageData) -> str:
    """``"text"`` for strings or with a decode function, ``"image"`` for numbers, ``"none"``
    without inputs or for samples of several inputs without a decode function."""
    if x is None:
        return "none"
    if data.decode is not None:
        return "text"
    if isinstance(x, Inputs):  # several inputs per sample: no picture of them
        return "none"
    first = x[0] if len(x) else None
    if isinstance(first, (str, bytes)) or (isinstance(x, np.ndarray) and x.dtype.kind in "USO"):
        return "text"
    return "image"


def _numeric(x: Any) -> np.ndarray:
    """Inputs (array, tensor or nested lists) as a float array, one row per sample."""
    if hasattr(x, "detach"):  # a torch tensor, maybe on a GPU
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the inputs cannot be drawn as images ({exc}); give decode= to show "
                         f"them as text") from None


def _image_shape(arr: np.ndarray, given: Sequence[int] | None) -> tuple[int, ...]:
    shape = guess_shape(arr.shape[1:], given)
    if shape is None:
        raise InputError(f"inputs of shape {tuple(arr.shape[1:])} are not square images: give "
                         f"image_shape (--image-shape), or decode to show them as text")
    return shape


def _bounds(arrays: list[np.ndarray]) -> tuple[float, float]:
    """The value range of every drawn input: one scale for the whole page, so a darker pixel
    means the same value in every picture."""
    finite = [a[np.isfinite(a)] for a in arrays]
    values = np.concatenate([f.ravel() for f in finite]) if finite else np.empty(0)
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _image_tag(picture: np.ndarray, bounds: tuple[float, float], alt: str) -> str:
    """An ``<img>`` with ``picture`` (H, W) or (H, W, 3) as a PNG data URI, enlarged by whole
    pixels so that small inputs stay sharp in any browser."""
    from matplotlib.image import imsave

    lo, hi = bounds
    scaled = np.clip((np.nan_to_num(picture, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    factor = max(1, IMAGE_PX // max(scaled.shape[:2]))
    scaled = np.repeat(np.repeat(scaled, factor, axis=0), factor, axis=1)
    buf = io.BytesIO()
    if scaled.ndim == 2:  # grey-scale: dark ink on white, as in iif.views.report's pictures
        imsave(buf, scaled, cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    else:
        imsave(buf, scaled, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="image" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _check_lengths(result: Attribution, data: PageData) -> None:
    for name, n in (("train_x", result.n_train), ("train_labels", result.n_train),
                    ("test_x", result.n_test), ("test_labels", result.n_test),
                    ("predictions", result.n_test)):
        value = getattr(data, name)
        if value is not None and len(value) != n:
            raise InputError(f"{name} has {len(value)} samples, the scores {n}")


def _value_text(value: Any) -> str:
    """A label or prediction as text: a class, or a regression value rounded for reading."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    value = _plain(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                               for v in value) + "]"
    return str(value)


# ---- the page ---------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .3em; }
.sign { background: #f3f3f3; border-left: 4px solid #888; padding: .4em .8em; }
table.facts td, table.settings td { padding: .1em .8em .1em 0; vertical-align: top; }
table.facts td:first-child, table.settings td:first-child { color: #555; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; }
.warning { color: #b00000; font-weight: bold; }
.entry { border: 1px solid #ccc; border-radius: 6px; margin: 1em 0; padding: .6em 1em;
         display: flex; gap: 1.5em; align-items: flex-start; }
.entry .test { flex: 0 0 14em; }
.entry h2 { font-size: 1.15em; margin: 0 0 .4em; }
.entry h3 { font-size: 1em; margin: .3em 0; }
.completeness { font-size: .9em; display: grid; grid-template-columns: auto auto;
                gap: 0 .6em; margin: .4em 0; }
.completeness dt { color: #555; }
.completeness dd { margin: 0; font-variant-numeric: tabular-nums; }
ol.ranking { list-style: none; display: flex; flex-wrap: wrap; gap: .5em; padding: 0;
             margin: 0 0 .6em; }
ol.ranking li { border-radius: 4px; padding: .3em; font-size: .85em; text-align: center;
                min-width: 5.5em; max-width: 16em; }
ol.proponents li { background: #e6f4ea; }
ol.opponents li { background: #fce8e6; }
h3.proponents { color: #1e6b34; }
h3.opponents { color: #a32018; }
img.image { display: block; margin: 0 auto .2em; border: 1px solid #999;
            image-rendering: pixelated; }
pre.text { white-space: pre-wrap; word-break: break-word; max-height: 12em; overflow: auto;
           margin: 0 0 .2em; padding: .3em; background: #fafafa; border: 1px solid #ddd;
           text-align: left; font-size: .95em; }
.caption { color: #444; font-size: .9em; margin: 0 0 .4em; }
.score { font-variant-numeric: tabular-nums; font-weight: bold; }
.label, .meta { color: #444; }
footer { color: #777; font-size: .85em; margin-top: 2em; }
"""


def _head(method: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>iif report: {_esc(method)}</title>\n<style>{_STYLE}</style>\n</head>\n"
            "<body>")


def _header(result: Attribution, run_key: str | None, source: str | None,
            flags: Mapping[str, Any] | None, warning: str | None = None) -> str:
    """The method, the sign convention, the facts of the run, its settings and any warning
    on the whole page (``warning``, and the flagged test samples)."""
    from iif.results.diagnostics import summarize

    facts = [("method", result.method),
             ("samples", f"{result.n_test} test \u00d7 {result.n_train} training"),
             ("run key", run_key or "not recorded")]
    if source is not None:
        facts.insert(0, ("folder", source))
    gap = _gap_summary(result.completeness)
    if gap:
        facts.append(("completeness gap", gap))
    rows = "".join(f"<tr><td>{_esc(a)}</td><td><code>{_esc(b)}</code></td></tr>"
                   for a, b in facts)
    out = [f"<header>\n<h1>iif report: {_esc(result.method)}</h1>",
           f'<p class="sign">{_esc(_sign_line(result))}</p>',
           f'<table class="facts">{rows}</table>']
    summary = summarize(flags, result.completeness) if flags is not None else ""
    for line in (warning, summary):
        if line:
            out.append(f'<p class="warning">warning: {_esc(line)}</p>')
    out.append(_settings_table(result.settings))
    out.append("</header>")
    return "\n".join(out)


def _sign_line(result: Attribution) -> str:
    if "contrast" in result.info:
        return ("Scores explain the margin log p_A \u2212 log p_B between the predicted class "
                "A and the contrast class B: score > 0 pushes towards A, score < 0 towards "
                "B.")
    if result.orientation == "helpful":
        return ("Sign convention (helpful view): score > 0 = proponent, including the "
                "training sample lowers the test loss; score < 0 = opponent, it raises it.")
    return ("Sign convention: score < 0 = proponent, including the training sample lowers "
            "the test loss; score > 0 = opponent, it raises it.")


def _gap_summary(completeness: Mapping[str, Any] | None) -> str:
    if not completeness or "gap" not in completeness:
        return ""
    gap = np.asarray(completeness["gap"], dtype=float)
    if not np.isfinite(gap).any():
        return ""
    return (f"|sum \u2212 change| / |change|: median {np.nanmedian(gap):.3g}, "
            f"max {np.nanmax(gap):.3g}")


def _settings_table(settings: Mapping[str, Any]) -> str:
    from iif.results.store import _flatten

    flat = _flatten(dict(settings))
    if not flat:
        return '<p class="meta">settings: none recorded</p>'
    rows = "".join(f"<tr><td>{_esc(k)}</td><td><code>{_esc(_json_text(v))}</code></td></tr>"
                   for k, v in flat.items())
    return ('<details><summary>settings</summary>'
            f'<table class="settings">{rows}</table></details>')


def _entry(result: Attribution, i: int, k: int, samples: _Samples,
           flags: Mapping[str, Any] | None) -> str:
    """The section of test sample ``i``: the sample, its facts and its two rankings."""
    from iif.results.diagnostics import describe

    out = [f'<section class="entry" id="test-{i}" data-test-index="{i}">', '<div class="test">',
           f"<h2>Test sample #{i}</h2>", samples.html("test", i)]
    meta = _test_meta(result, i, samples)
    if meta:
        out.append(f'<p class="meta">{_esc(meta)}</p>')
    fell_back = flags is not None and i in flags.get("fallback", [])
    out.append(_completeness(result.completeness, i, fell_back, "contrast" in result.info))
    note = describe(flags, i, result.completeness) if flags is not None else None
    if note:
        out.append(f'<p class="warning">warning: {_esc(note)}</p>')
    out.append('</div>\n<div class="rankings">')
    classes = _contrast(result, i)
    if classes is not None:
        out.append(f'<p class="caption">{_esc(contrast_caption(*classes, unicode=True))}</p>')
    for cls, heading, ranked in _rankings(result, i, k, classes):
        out.append(f'<h3 class="{cls}">{_esc(heading)}</h3>')
        out.append(f'<ol class="ranking {cls}">'
                   + "".join(_train_item(j, score, samples) for j, score in ranked) + "</ol>")
    out.append("</div>\n</section>")
    return "\n".join(part for part in out if part)


def _test_meta(result: Attribution, i: int, samples: _Samples) -> str:
    """``label L · predicted P`` (and whether it is misclassified), as far as known."""
    label, predicted = samples.label("test", i), samples.prediction(i)
    parts = [] if label is None else [f"label {label}"]
    if predicted is not None:
        parts.append(f"predicted {predicted}"
                     + (" (misclassified)" if label is not None and label != predicted else ""))
    classes = _contrast(result, i)
    if classes is not None:
        parts.append(f"A = {classes[0]}, B = {classes[1]}")
    return " \u00b7 ".join(parts)


def _contrast(result: Attribution, i: int) -> tuple[Any, Any] | None:
    """The classes A and B of test ``i`` of a contrast result; None for another result, or
    one of another form (nothing is then said of them)."""
    contrast = result.info.get("contrast")
    if not isinstance(contrast, dict):
        return None
    try:
        return contrast["A"][i], contrast["B"][i]
    except (KeyError, IndexError, TypeError):
        return None


def _completeness(completeness: Mapping[str, Any] | None, i: int,
                  fell_back: bool = False, margin: bool = False) -> str:
    """Sum of scores, change of the test loss (``margin``: of a contrast's margin) and gap of
    test ``i`` (``fell_back``: its baseline fell back, so there is no gap to show), or ""
    without them."""
    if not completeness:
        return ""
    f = "margin" if margin else "L"
    names = (("sum", "sum of scores"),
             ("delta", f"change {f}(\u03b8*) \u2212 {f}(\u03b8\u2032)"), ("gap", "gap"))
    rows = []
    for key, name in names:
        if key in completeness:
            value = float(np.asarray(completeness[key], dtype=float)[i])
            text = f"{value:+.4g}" if key != "gap" else gap_text(value, None, fell_back)
            rows.append(f"<dt>{_esc(name)}</dt><dd>{_esc(text)}</dd>")
    return f'<dl class="completeness">{"".join(rows)}</dl>' if rows else ""


def _rankings(result: Attribution, i: int, k: int, classes: tuple[Any, Any] | None = None
              ) -> list[tuple[str, str, list]]:
    """The rows of test ``i``: class, heading and (index, score) pairs, proponents first;
    ``classes``: its A and B, for a contrast result."""
    pro = result.proponents(i, k, with_scores=True)
    opp = result.opponents(i, k, with_scores=True)
    if "contrast" in result.info:
        a, b = ("A", "B") if classes is None else (f"A = {classes[0]}", f"B = {classes[1]}")
        return [("opponents", f"Towards {b} (score < 0)", pro),
                ("proponents", f"Towards {a} (score > 0)", opp)]
    if result.orientation == "helpful":
        return [("proponents", "Proponents: lower the test loss (score > 0)", pro),
                ("opponents", "Opponents: raise the test loss (score < 0)", opp)]
    return [("proponents", "Proponents: lower the test loss (score < 0)", pro),
            ("opponents", "Opponents: raise the test loss (score > 0)", opp)]


def _train_item(j: int, score: float, samples: _Samples) -> str:
    label = samples.label("train", j)
    label_html = "" if label is None else f' <span class="label">label {_esc(label)}</span>'
    return (f'<li class="train" data-index="{j}" data-score="{score!r}">'
            f"{samples.html('train', j)}"
            f'<span class="index">#{j}</span>{label_html}<br>'
            f'<span class="score">{score:+.3g}</span></li>')


def _page_flags(result: Attribution) -> Mapping[str, Any] | None:
    """The result's per-test flags (see :mod:`iif.results.diagnostics`), or None when its info is
    not of a form they can be read from (the page then simply has no warnings)."""
    from iif.views.show import _flags

    try:
        return _flags(Path(META_FILE), result)
    except InputError:
        return None


def _footer() -> str:
    from iif.version import __version__

    return f"written by iif {__version__}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
