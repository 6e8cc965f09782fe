"""One prediction explained, in words and a picture: ``iif explain``.

Without a contrast: the training samples that most lower the test sample's loss (proponents)
and most raise it (opponents). With ``contrast=B``: why the model predicts A and not B, the
training samples pushing most towards A (largest margin scores) and towards B (most negative).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iif.errors import InputError
from iif.io import atomic_write, jsonable
from iif.results.diagnostics import describe, index_offset, kinds_of, summarize, trust_flags
from iif.task.data import several_inputs
from iif.views.report import (
    COMPLETENESS_MEANING,
    contrast_caption,
    format_completeness,
    gap_text,
    plot_rankings,
    top_entries,
)
from iif.views.report import image_shape as guess_shape


def explain(
    method: Any,
    test_data: Any,
    index: int,
    out: str | Path,
    *,
    contrast: Any = None,
    k: int = 8,
    image_shape: Sequence[int] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Attribute test sample ``index`` (with ``contrast``: a class or "runner-up"), write
    ``explain_<index>.json`` and ``explain_<index>.png`` into ``out``; returns the printed
    text and the JSON record."""
    test = method.validate_test(test_data)
    if not 0 <= index < len(test):
        raise InputError(f"test index {index} is outside 0..{len(test) - 1}")
    one = test.subset([index])
    with index_offset(index):  # a warning names the sample by its index in test_data
        result = method.attribute((one.x, one.labels), contrast=contrast)
    # flags by the sample's index in test_data (row 0 of the result)
    flags = trust_flags(result.completeness, result.info, offset=index)
    warning = summarize(flags, result.completeness, offset=index)
    note = describe(flags, index, result.completeness, row=0)
    scores = result.scores[0]
    labels = method.train.labels.cpu().numpy()
    comp = {key: v[0] for key, v in result.completeness.items()}
    output = method.fmodel.outputs(method.state, one.x)[0].double()
    if method.task.kind == "classification":
        prob = output.softmax(0)
        predicted, shown = int(prob.argmax()), f"{int(prob.argmax())} (p = {float(prob.max()):.2f})"
    else:  # regression: the output itself
        values = output.cpu().tolist()
        predicted = values[0] if len(values) == 1 else values
        shown = ", ".join(f"{v:.4g}" for v in values)
    true = one.labels[0].cpu().numpy().tolist()
    low, high = top_entries(scores, labels, k)
    if contrast is not None:
        a, b = result.info["contrast"]["A"][0], result.info["contrast"]["B"][0]
        heading = (f"Test sample {index} (label {true}, predicted {shown}): why class {a} "
                   f"and not {b}?")
        rows = [(f"towards {a}", high), (f"towards {b}", low)]
        what = (f"scores attribute the margin log p_{a} - log p_{b}; positive = pushes "
                f"towards {a}")
    else:
        heading = f"Test sample {index} (label {true}, predicted {shown})"
        rows = [("proponents", low), ("opponents", high)]
        what = "positive = including the sample raises the test loss"
    fell_back = index in flags.get("fallback", [])  # its gap is NaN: no loss change
    captions = []  # what the rows mean, in text and in the picture
    if contrast is not None:
        gap = gap_text(comp["gap"], comp["delta"], fell_back, digits=2)
        check = (f"completeness: sum of scores {comp['sum']:+.4g}, margin(theta*) - "
                 f"margin(theta') = {comp['delta']:+.4g}, gap {gap}")
        meaning = (f"Completeness check: summed over all training samples, the scores should "
                   f"equal how much the margin grew from the baseline model \u03b8' (trained "
                   f"towards {b}) to the trained model \u03b8*.")
        captions = [contrast_caption(a, b), contrast_caption(a, b, unicode=True)]
    else:
        check = format_completeness({**comp, "fell_back": fell_back})
        meaning = COMPLETENESS_MEANING
    lines = [heading, f"  {what}", *[f"  {c}" for c in captions[:1]], f"  {check}"]
    if warning:
        lines.append(f"warning: {warning}")
    for title, entries in rows:
        lines.append(f"  {title}: " + ", ".join(
            f"#{e['index']} (label {e['label']}) {e['score']:+.3g}" for e in entries))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"test_index": index, "label": true, "predicted": predicted,
              "contrast": result.info.get("contrast"), "completeness": comp,
              "flags": kinds_of(flags, index), "warning": note,
              "rows": {title: entries for title, entries in rows},
              "settings": result.settings}
    text = json.dumps(jsonable(record), indent=2, allow_nan=False)
    atomic_write(folder / f"explain_{index}.json", lambda f: f.write(text.encode()))
    if several_inputs(method.train.x):
        lines.append("  (samples with several inputs are not drawn)")
        return "\n".join(lines), record
    images = method.train.x.cpu().numpy()
    shape = guess_shape(images.shape[1:], image_shape)
    if shape is not None:
        path = folder / f"explain_{index}.png"
        plot_rankings(one.x[0].cpu().numpy(), heading, rows, images, path, image_shape=shape,
                      note="\n".join([what, *captions[1:], _symbols(check), meaning]),
                      warning=note)
        lines.append(f"  wrote {path}")
    else:
        lines.append("  (inputs are not square images: give --image-shape for a picture)")
    return "\n".join(lines), record


def _symbols(text: str) -> str:
    """The completeness line with theta and the minus sign as symbols, for the picture."""
    return (text.replace("theta*", "\u03b8*").replace("theta'", "\u03b8'")
            .replace(") - ", ") \u2212 "))
