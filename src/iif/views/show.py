"""What an attribution folder holds, in words and pictures (``iif show DIR``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iif.errors import InputError
from iif.io import read_json_file
from iif.results.attribution import META_FILE, SCORES_FILE, Attribution, _kind
from iif.results.diagnostics import describe, summarize, trust_flags
from iif.results.runkey import data_digest
from iif.results.store import CHUNKS, MANIFEST
from iif.views.report import format_completeness, plot_proponents_opponents, top_entries
from iif.views.report import image_shape as guess_shape


def show(
    folder: str | Path,
    *,
    task: str | None = None,
    test_indices: Sequence[int] = (0,),
    k: int = 8,
    image_shape: Sequence[int] | None = None,
) -> str:
    """A text summary of ``folder``; with ``task`` (the job's task function) also writes
    ``show_<i>.png`` there for each test index: the test input with the model's prediction
    beside its top-k proponents and opponents (training index, label and score)."""
    folder = Path(folder)
    _check_folder(folder)
    if not (folder / SCORES_FILE).exists() or not (folder / META_FILE).exists():
        return _in_progress(folder)
    result = Attribution.load(folder)
    lines = _summary_lines(folder, result)
    flags = _flags(folder, result)
    summary = summarize(flags, result.completeness)
    if summary:
        lines.append(f"warning: {summary}")
    job, train, test = _job_data(folder, task, result)
    labels = images = None
    if train is not None:
        labels = train.labels.cpu().numpy()
        images = train.x.cpu().numpy()
    for i in test_indices:
        if not 0 <= i < result.n_test:
            raise InputError(f"test index {i} is outside 0..{result.n_test - 1}")
        comp = None if result.completeness is None else {
            key: v[i] for key, v in result.completeness.items()}
        note = describe(flags, i, result.completeness)
        lines += _test_lines(i, result.scores[i], labels, k, comp, note)
        if job is not None:
            lines += _draw_test(folder, job.task, (images, labels), test, i, result.scores[i],
                                k=k, image_shape=image_shape, completeness=comp, warning=note)
    return "\n".join(lines)


def _summary_lines(folder: Path, result: Attribution) -> list[str]:
    """The lines on the whole result: method and sizes, what a score means, the settings
    and the completeness gap."""
    meaning = "score > 0: the training sample raises the test loss"
    if "contrast" in result.info:
        meaning = "scores of the margin log p_A - log p_B; score > 0: pushes towards A"
    lines = [f"{folder}: {result.method}, {result.n_test} test x {result.n_train} training "
             f"samples; {meaning}"]
    settings = result.settings
    for key in ("projection", "baseline", "path", "curvature"):
        if isinstance(settings.get(key), dict):
            lines.append(f"  {key}: " + ", ".join(f"{a}={b}" for a, b in settings[key].items()))
    if result.completeness is not None and "gap" in result.completeness:
        gap = np.asarray(result.completeness["gap"], dtype=float)
        if np.isfinite(gap).any():
            lines.append(f"  completeness gap |sum - delta| / |delta|: median "
                         f"{np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}")
    return lines


def _job_data(folder: Path, task: str | None, result: Attribution):
    """The job of ``task`` with its validated training and test data, checked to be the
    data the scores in ``folder`` were computed on; ``(None, None, None)`` without a task."""
    if task is None:
        return None, None, None
    from iif.task.job import load_job

    job = load_job(task)
    if job is None:
        return None, None, None
    train = job.task.validate(job.train, "training data")
    test = job.task.validate(job.test, "test data", stream=False)
    if len(train) != result.n_train or len(test) != result.n_test:
        raise InputError(f"{task} gives {len(test)} test x {len(train)} training samples, "
                         f"the folder {result.n_test} x {result.n_train}")
    _check_data(folder, task, train, test)
    return job, train, test


def _test_lines(i: int, scores, labels, k: int, comp, note: str | None) -> list[str]:
    """The lines on test sample ``i``: its completeness, any warning, and its top-``k``
    proponents and opponents."""
    pro, opp = top_entries(scores, labels, k)
    lines = [f"test sample {i}: {format_completeness(comp)}"]
    if note:
        lines.append(f"  warning: test {i}: {note}")
    for title, entries in (("proponents", pro), ("opponents", opp)):
        lines.append(f"  {title}: " + ", ".join(
            f"#{e['index']}" + (f" (label {e['label']})" if "label" in e else "")
            + f" {e['score']:+.3g}" for e in entries))
    return lines


def _draw_test(folder: Path, task, train_arrays: tuple[np.ndarray, np.ndarray], test, i: int,
               scores, *, k: int, image_shape: Sequence[int] | None, completeness,
               warning) -> list[str]:
    """Write ``show_<i>.png`` in ``folder`` (test sample ``i`` with the model's prediction
    beside its proponents and opponents, ``train_arrays`` the training images and labels);
    the lines saying so."""
    images, labels = train_arrays
    shape = guess_shape(images.shape[1:], image_shape)
    if shape is None:
        raise InputError("inputs are not square images: give --image-shape")
    x_test = test.x[i].cpu().numpy()
    label = _label_text(test.labels[i].cpu().numpy().tolist())
    predicted, confidence = _predict(task, test.x[i : i + 1])
    lines = [f"  label {label}, predicted {predicted}"
             + (f" (p={confidence:.2f})" if confidence is not None else "")]
    heading = f"Test sample #{i}: label {label}, predicted {predicted}"
    if confidence is not None:
        heading += f" (p = {confidence:.2f})"
        if predicted != label:
            heading += ", misclassified"
    path = folder / f"show_{i}.png"
    plot_proponents_opponents(
        x_test, label, images, labels, scores, path, k=k,
        image_shape=shape, title=heading, prediction=predicted, completeness=completeness,
        warning=warning)
    lines.append(f"  wrote {path}")
    return lines


def _predict(task, x1) -> tuple[object, float | None]:
    """The model's prediction for one input ``x1`` (a batch of one), in eval mode: the class
    and its probability for classification, the output (rounded for reading) for
    regression."""
    import torch

    from iif.engine.functional import module_mode

    with torch.no_grad(), module_mode(task.model, False):
        out = task.model(x1).reshape(1, -1)[0].double()
    if task.kind == "classification":
        prob = torch.softmax(out, dim=0)
        return int(prob.argmax()), float(prob.max())
    values = [float(f"{v:.4g}") for v in out.cpu().tolist()]
    return (values[0] if len(values) == 1 else values), None


def _label_text(label: object) -> object:
    """A label as drawn: a class, or a regression target rounded like the prediction."""
    if isinstance(label, list):
        values = [float(f"{v:.4g}") for v in label]
        return values[0] if len(values) == 1 else values
    return label


# ---- the folder and its files, every malformation named --------------------------------------
_GIVE = "give the --out folder of an iif attribute run"
_REDO = "remove the folder and run iif attribute again"
_REDO_CHUNK = ("remove it and its .npy and run the same iif attribute command again (the chunk "
               "is computed again)")


def _check_folder(folder: Path) -> None:
    """Refuse a ``folder`` that is missing, a file, or holds no attribution run."""
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; {_GIVE}")
    if not folder.is_dir():
        raise InputError(f"{folder}: a file, not a folder; {_GIVE}")
    names = {SCORES_FILE, META_FILE, MANIFEST}
    present = sorted(p.name for p in folder.iterdir() if p.name in names)
    if not present:
        empty = not any(folder.iterdir())
        what = "an empty folder" if empty else f"no {MANIFEST}, {SCORES_FILE} or {META_FILE}"
        raise InputError(f"{folder}: {what}; {_GIVE}")
    if MANIFEST not in present and len(present) == 1:
        missing = META_FILE if present == [SCORES_FILE] else SCORES_FILE
        raise InputError(f"{folder}: {present[0]} without {missing}; remove the folder and "
                         f"write the result again (iif attribute or Attribution.save)")


def _check_data(folder: Path, task: str, train, test) -> None:
    """Refuse a task function whose data are not the ones the scores were computed on (other
    samples, or the same in another order): the pictures would show the wrong samples. The
    run key's data digests in the manifest say; a folder without them cannot be checked."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    parts = _read_json(manifest, _REDO)
    parts = parts.get("parts") if isinstance(parts, dict) else None
    if not isinstance(parts, dict):
        return
    for name, data in (("training data", train), ("test data", test)):
        if name in parts and parts[name] != data_digest(data):
            raise InputError(f"{task} gives other {name} than the scores in {folder} were "
                             f"computed on (other samples, or the same in another order); the "
                             f"pictures would label and draw the wrong samples")


def _read_json(path: Path, remedy: str) -> object:
    if path.is_dir():  # worded like the other unreadable files, not as a non-regular one
        raise InputError(f"{path}: cannot be read ({os.strerror(errno.EISDIR)}); {remedy}")
    try:
        return read_json_file(path, "a file of the result")
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}); {remedy}") from None
    except ValueError as exc:  # not JSON, or not UTF-8 text
        raise InputError(f"{path}: not valid JSON ({exc}); {remedy}") from None


def _in_progress(folder: Path) -> str:
    """The line on an unfinished run: its manifest and how many chunks are done."""
    path = folder / MANIFEST
    manifest = _read_json(path, _REDO)
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object, found {_kind(manifest)}; "
                         f"{_REDO}")
    missing = [k for k in ("method", "n_test", "n_train", "bounds") if k not in manifest]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}; {_REDO}")
    bounds = manifest["bounds"]
    if not (isinstance(bounds, list) and len(bounds) >= 2
            and all(isinstance(b, int) for b in bounds)):
        raise InputError(f"{path}: 'bounds' is not a list of chunk boundaries; {_REDO}")
    done = 0
    for record_path in sorted((folder / CHUNKS).glob("*.json")):
        record = _read_json(record_path, _REDO_CHUNK)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise InputError(f"{record_path}: not a chunk record (a JSON object with its "
                             f"sha256); {_REDO_CHUNK}")
        done += 1
    total = len(bounds) - 1
    return (f"{folder}: {manifest['method']} run in progress, {done} of {total} chunks "
            f"finished (n_test {manifest['n_test']}, n_train {manifest['n_train']}); "
            f"rerun the attribute command to finish it")


def _flags(folder: Path, result: Attribution) -> dict[str, list[int]]:
    """The per-test flags recorded in the result, or made from its completeness and info
    (a result saved before flags were recorded)."""
    flags = result.info.get("flags")
    try:
        if isinstance(flags, dict) and all(
                isinstance(v, list) and all(isinstance(i, int) for i in v)
                for v in flags.values()):
            return flags
        return trust_flags(result.completeness, result.info)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise InputError(f"{folder / META_FILE}: malformed 'info' ({type(exc).__name__}: "
                         f"{exc}); remove {SCORES_FILE} and {META_FILE} and run the same iif "
                         f"attribute command again") from None
