"""What an attribution folder holds, in words and pictures (``iif show DIR``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np

from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.io import read_json_file
from iif.results.attribution import META_FILE, SCORES_FILE, Attribution, _kind
from iif.results.chunks import read_json
from iif.results.diagnostics import describe, summarize, trust_flags
from iif.results.runkey import PROBE, RunKey, behaviour_digest, data_digest, tensor_digest
from iif.results.store import CHUNKS, MANIFEST
from iif.task.data import several_inputs
from iif.task.inputs import call_model
from iif.task.outputs import model_output
from iif.views.report import (
    contrast_caption,
    format_completeness,
    gap_text,
    plot_proponents_opponents,
    plot_rankings,
    top_entries,
)
from iif.views.report import image_shape as guess_shape

DEFAULT_SHOWN = 3  # test samples detailed and drawn when none are chosen
NOT_DRAWN = "  (samples with several inputs are not drawn; the lines above list them)"


def show(
    folder: str | Path,
    *,
    task: str | None = None,
    test_indices: Sequence[int] | None = None,
    k: int = 8,
    image_shape: Sequence[int] | None = None,
) -> str:
    """A text summary of ``folder``: the run, one line per test sample (its top proponent and
    opponent, and with ``task`` its label and the model's prediction), then the top-k
    proponents and opponents of ``test_indices`` (default: the first three). With ``task``
    (the job's task function, checked to be the model and data the scores were computed
    with) also writes ``show_<i>.png`` there for each of them: the test input with the
    model's prediction beside its proponents and opponents (training index, label, score)."""
    folder = Path(folder)
    _check_folder(folder)
    if not (folder / SCORES_FILE).exists() or not (folder / META_FILE).exists():
        return _in_progress(folder)
    result = Attribution.load(folder)
    chosen = _chosen(result, test_indices)
    lines = _summary_lines(folder, result)
    flags = _flags(folder, result)
    summary = summarize(flags, result.completeness)
    if summary:
        lines.append(f"warning: {summary}")
    loaded = _job_data(folder, task, result)
    if loaded.warning:
        lines.append(f"warning: {loaded.warning}")
    view = _View(folder, result, flags, loaded, k, image_shape)
    lines += [view.overview(i) for i in range(result.n_test)]
    for i in chosen:
        lines += view.details(i)
        if loaded.job is not None:
            lines += view.draw(i)
    return "\n".join(lines)


def _chosen(result: Attribution, test_indices: Sequence[int] | None) -> list[int]:
    """The test samples to detail and draw: ``test_indices`` checked, or the first three."""
    if test_indices is None:
        return list(range(min(DEFAULT_SHOWN, result.n_test)))
    chosen = [int(i) for i in test_indices]
    for i in chosen:
        if not 0 <= i < result.n_test:
            raise InputError(f"test index {i} is outside 0..{result.n_test - 1}")
    return chosen


def _summary_lines(folder: Path, result: Attribution) -> list[str]:
    """The lines on the whole result: method and sizes, what a score means, the settings
    and the completeness gap."""
    meaning = "score > 0: the training sample raises the test loss"
    if result.orientation == "helpful":
        meaning = "score > 0: the training sample lowers the test loss (helpful view)"
    if "contrast" in result.info:
        meaning = "scores of the margin log p_A - log p_B; score > 0: pushes towards A"
    lines = [f"{folder}: {result.method}, {result.n_test} test x {result.n_train} training "
             f"samples; {meaning}"]
    settings = result.settings
    for key in ("projection", "baseline", "path", "curvature"):
        if isinstance(settings.get(key), dict):
            lines.append(f"  {key}: " + ", ".join(f"{a}={b}" for a, b in settings[key].items()))
    comp = result.completeness
    for key, what in (("gap", "delta (to the baseline theta')"),
                      ("gap_path", "delta_path (to the path's end theta_0)")):
        gap = np.asarray(comp[key], dtype=float) if comp is not None and key in comp else None
        if gap is not None and np.isfinite(gap).any():
            lines.append(f"  completeness gap |sum - d| / |d| against {what}: median "
                         f"{np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}")
    return lines


class _Loaded(NamedTuple):
    """The task function's job with its validated data (all None without a task), and the
    warning line when the folder records nothing to check them against."""

    job: Any = None
    train: Any = None
    test: Any = None
    warning: str | None = None


def _job_data(folder: Path, task: str | None, result: Attribution) -> _Loaded:
    """The job of ``task`` with its validated training and test data, checked to be the
    model and data the scores in ``folder`` were computed with (:func:`_check_run`)."""
    if task is None:
        return _Loaded()
    from iif.task.job import load_job

    job = load_job(task)
    if job is None:
        return _Loaded()
    train = job.task.validate(job.train, "training data")
    test = job.task.validate(job.test, "test data", like=train, stream=False)
    if len(train) != result.n_train or len(test) != result.n_test:
        raise InputError(f"{task} gives {len(test)} test x {len(train)} training samples, "
                         f"the folder {result.n_test} x {result.n_train}")
    warning = _check_run(folder, task, _Run(job, train, test, result))
    return _Loaded(job, train, test, warning)


class _View:
    """The lines and pictures of one result's test samples."""

    def __init__(self, folder: Path, result: Attribution, flags: dict[str, list[int]],
                 loaded: _Loaded, k: int, image_shape: Sequence[int] | None):
        self.folder, self.result, self.flags, self.loaded = folder, result, flags, loaded
        self.k, self.image_shape = k, image_shape
        self.contrast = _contrast_classes(result)
        self.labels = self.images = self.test_labels = self.predicted = None
        if loaded.job is not None:
            self.labels = loaded.train.labels.cpu().numpy()
            x = loaded.train.x
            self.images = None if several_inputs(x) else x.cpu().numpy()
            self.test_labels = [_label_text(v) for v in loaded.test.labels.cpu().numpy().tolist()]
            self.predicted = [_label_text(v) for v in _predictions(loaded.job.task,
                                                                   loaded.test.x)]

    def completeness(self, i: int) -> dict[str, Any] | None:
        """Test ``i``'s sum, delta and gap, with ``fell_back`` when its baseline fell back."""
        comp = self.result.completeness
        if comp is None:
            return None
        out: dict[str, Any] = {key: v[i] for key, v in comp.items()}
        if i in self.flags.get("fallback", []):
            out["fell_back"] = True
        return out

    def rows(self, i: int, k: int) -> list[tuple[str, list[dict[str, Any]]]]:
        """Test ``i``'s two rankings, titled: proponents and opponents, or for a contrast the
        samples pushing towards A and towards B."""
        low, high = top_entries(self.result.scores[i], self.labels, k)
        if self.contrast is not None:
            a, b = self.contrast[0][i], self.contrast[1][i]
            return [(f"towards {a}", high), (f"towards {b}", low)]
        if self.result.orientation == "helpful":  # scores > 0 lower the loss
            return [("proponents", high), ("opponents", low)]
        return [("proponents", low), ("opponents", high)]

    def overview(self, i: int) -> str:
        """One line on test ``i``: label and prediction when known, the strongest sample of
        each ranking and the completeness gap."""
        head = []
        if self.test_labels is not None:
            head.append(f"label {self.test_labels[i]}, predicted {self.predicted[i]}")
        if self.contrast is not None:
            head.append(f"why {self.contrast[0][i]} and not {self.contrast[1][i]}")
        tops = []
        for title, entries in self.rows(i, 1):
            name = title if self.contrast is not None else "top " + title[:-1]
            tops.append(f"{name} {_entry_text(entries[0])}")
        parts = [*head, ", ".join(tops)]
        comp = self.completeness(i)
        if comp is not None and "gap" in comp:
            parts.append("gap " + gap_text(comp["gap"], comp.get("delta"),
                                           bool(comp.get("fell_back"))))
        return f"  test {i}: " + "; ".join(parts)

    def details(self, i: int) -> list[str]:
        """The lines on test sample ``i``: its completeness, any warning, what its rows mean
        (a contrast) and its top-``k`` samples of each ranking."""
        comp = self.completeness(i)
        lines = [f"test sample {i}: "
                 + format_completeness(comp, margin=self.contrast is not None)]
        note = describe(self.flags, i, self.result.completeness)
        if note:
            lines.append(f"  warning: test {i}: {note}")
        if self.contrast is not None:
            lines.append("  " + contrast_caption(self.contrast[0][i], self.contrast[1][i]))
        for title, entries in self.rows(i, self.k):
            lines.append(f"  {title}: " + ", ".join(_entry_text(e) for e in entries))
        return lines

    def draw(self, i: int) -> list[str]:
        """Write ``show_<i>.png`` in the folder (test sample ``i`` with the model's prediction
        beside its rankings); the lines saying so."""
        if self.images is None:  # several inputs per sample: no picture of them
            return [NOT_DRAWN]
        shape = guess_shape(self.images.shape[1:], self.image_shape)
        if shape is None:
            raise InputError("inputs are not square images: give --image-shape")
        test, task = self.loaded.test, self.loaded.job.task
        x_test = test.x[i].cpu().numpy()
        label = self.test_labels[i]
        predicted, confidence = _predict(task, test.x[i : i + 1])
        lines = [f"  label {label}, predicted {predicted}"
                 + (f" (p={confidence:.2f})" if confidence is not None else "")]
        heading = f"Test sample #{i}: label {label}, predicted {predicted}"
        if confidence is not None:
            heading += f" (p = {confidence:.2f})"
            if predicted != label:
                heading += ", misclassified"
        path = self.folder / f"show_{i}.png"
        comp, note = self.completeness(i), describe(self.flags, i, self.result.completeness)
        if self.contrast is not None:
            a, b = self.contrast[0][i], self.contrast[1][i]
            text = [f"scores attribute the margin log p_{a} \u2212 log p_{b}; positive = "
                    f"pushes towards {a}", contrast_caption(a, b, unicode=True)]
            if comp is not None:
                text.append(format_completeness(comp, unicode=True, margin=True))
            plot_rankings(x_test, f"{heading}: why {a} and not {b}?", self.rows(i, self.k),
                          self.images, path, image_shape=shape, note="\n".join(text),
                          warning=note)
        else:
            row = self.result.scores[i]  # drawn in the loss orientation the picture states
            plot_proponents_opponents(
                x_test, label, self.images, self.labels,
                row if self.result.orientation == "loss" else -row, path,
                k=self.k, image_shape=shape, title=heading, prediction=predicted,
                completeness=comp, warning=note)
        lines.append(f"  wrote {path}")
        return lines


def _entry_text(e: dict[str, Any]) -> str:
    """``#12 (label 3) -0.0412``: one ranked training sample."""
    label = f" (label {e['label']})" if "label" in e else ""
    return f"#{e['index']}{label} {e['score']:+.3g}"


def _contrast_classes(result: Attribution) -> tuple[list[Any], list[Any]] | None:
    """A and B per test sample of a contrast result; None for any other result."""
    contrast = result.info.get("contrast")
    if not isinstance(contrast, dict):
        return None
    a, b = contrast.get("A"), contrast.get("B")
    if not (isinstance(a, list) and isinstance(b, list)
            and len(a) == len(b) == result.n_test):
        raise InputError(f"{META_FILE}: 'info.contrast' does not hold the classes A and B of "
                         f"every test sample; remove {SCORES_FILE} and {META_FILE} and run the "
                         f"same iif attribute command again")
    return a, b


def _predict(task, x1) -> tuple[object, float | None]:
    """The model's prediction for one input ``x1`` (a batch of one), in eval mode: the class
    and its probability for classification, the output (rounded for reading) for
    regression."""
    import torch

    from iif.engine.functional import module_mode

    with torch.no_grad(), module_mode(task.model, False):
        out = model_output(call_model(task.model, x1), task.output).reshape(1, -1)[0].double()
    if task.kind == "classification":
        prob = torch.softmax(out, dim=0)
        return int(prob.argmax()), float(prob.max())
    values = [float(f"{v:.4g}") for v in out.cpu().tolist()]
    return (values[0] if len(values) == 1 else values), None


def _predictions(task: Any, x: Any, batch: int = 256) -> list[Any]:
    """The model's prediction for every input in ``x``, in eval mode: the class for
    classification, the output for regression."""
    import torch

    from iif.engine.functional import module_mode

    out = []
    with torch.no_grad(), module_mode(task.model, False):
        for lo in range(0, len(x), batch):
            y = model_output(call_model(task.model, x[lo : lo + batch]), task.output)
            y = y.reshape(min(batch, len(x) - lo), -1)
            if task.kind == "classification":
                out += y.argmax(dim=1).cpu().tolist()
            else:
                out += [row if len(row) > 1 else row[0] for row in y.double().cpu().tolist()]
    return out


def _label_text(label: object) -> object:
    """A label or output as shown: a class, or a regression value rounded for reading."""
    if isinstance(label, list):
        values = [float(f"{v:.4g}") for v in label]
        return values[0] if len(values) == 1 else values
    if isinstance(label, float):
        return float(f"{label:.4g}")
    return label


# ---- the task checked against the run key the folder records -----------------------------
class _Run(NamedTuple):
    """What a task function gives, against the result it is to be shown with."""

    job: Any
    train: Any
    test: Any
    result: Attribution


# the run key's parts a task function determines, and what a difference means
_COMPARED = {
    "model weights": "with another model (parameters differ)",
    "model behaviour": (f"with another model (the same parameters, but other outputs on the "
                        f"first {PROBE} training and test samples: other code, or state "
                        f"outside the parameters)"),
    "training data": "on other training data (other samples, or the same in another order)",
    "test data": "on other test data (other samples, or the same in another order)",
}


def _check_run(folder: Path, task: str, run: _Run) -> str | None:
    """Refuse a task function whose model or data are not the ones the scores in ``folder``
    were computed with: the pictures would show another model's predictions, or label and
    draw the wrong samples. The run key parts the folder records (:func:`_recorded_parts`)
    say; returns the warning line for a folder that records none."""
    recorded = _recorded_parts(folder, run.result)
    names = [n for n in _COMPARED if recorded is not None and n in recorded]
    if not names:
        return (f"{folder} records no run key of its scores to check {task} against (a result of "
                f"Attribution.save, or of an older iif): its labels, predictions and pictures "
                f"are the task's, trusted to be the model and data the scores were computed "
                f"with")
    given = RunKey({n: _task_part(n, run) for n in names})
    differ = given.differences({n: recorded[n] for n in names})
    if differ:
        what = " and ".join(_COMPARED.get(n, f"with another {n}") for n in differ)
        raise InputError(f"{folder} was scored {what} than the task in {task}; pass the task "
                         f"the result was computed with")
    return None


def _recorded_parts(folder: Path, result: Attribution) -> dict[str, str] | None:
    """The run key parts of the scores in ``folder``: its manifest's, or without one a chunk
    record's of the run that assembled them (``info["run_key"]``); None when it records
    none (a result of ``Attribution.save``, or a folder of an older iif)."""
    key = result.info.get("run_key")
    if (folder / MANIFEST).exists():
        records = [_read_json(folder / MANIFEST, _REDO)]
    elif isinstance(key, str):
        records = (read_json(path, "chunk record")
                   for path in sorted((folder / CHUNKS).glob("rows-*.json")))
    else:
        return None
    for record in records:
        parts = record.get("parts") if isinstance(record, dict) else None
        if not (isinstance(parts, dict) and all(isinstance(v, str) for v in parts.values())):
            continue
        if isinstance(key, str) and record.get("key") != key:
            continue  # another run's: it says nothing of these scores
        return parts
    return None


def _task_part(name: str, run: _Run) -> str:
    """The digest of the run key part ``name`` for what the task function gives, made as
    :func:`iif.results.runkey.run_key` makes it."""
    if name == "training data":
        return data_digest(run.train)
    if name == "test data":
        return data_digest(run.test)
    models = _models(run)
    if name == "model weights":
        weights = []
        for model in models:
            state = FunctionalModel(model).state()
            weights += list(state.params.values()) + list(state.buffers.values())
        return tensor_digest(weights)
    # model behaviour: every distinct model probed as the method's members are
    if run.result.method == "tracin":
        models = models[:1]  # its runs share the task's model at theta*
    chunk = run.result.settings.get("chunk_size", 128)
    members = []
    for model in models:
        fmodel = FunctionalModel(model, run.job.task.output)
        member = SimpleNamespace(fmodel=fmodel, state=fmodel.state(),
                                 chunk_size=chunk if isinstance(chunk, int) else 128)
        member.engine = member
        members.append(member)
    method = SimpleNamespace(task=run.job.task, train=run.train, members=lambda: members)
    return behaviour_digest(method, run.test)


def _models(run: _Run) -> list[Any]:
    """The models whose weights the run key holds, in its order: the job's ensemble, or the
    task's model; TracIn's runs each at the task's model (theta*), one per run."""
    task_model = run.job.task.model
    if run.result.method == "tracin":
        runs = run.result.settings.get("ensemble_size", 1)
        return [task_model] * (runs if isinstance(runs, int) and runs > 0 else 1)
    return list(run.job.models) if run.job.models is not None else [task_model]


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
