"""What an attribution folder holds, in words and pictures (``iif show DIR``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iif.attribution import META_FILE, SCORES_FILE, Attribution
from iif.diagnostics import describe, summarize, trust_flags
from iif.errors import InputError
from iif.report import format_completeness, plot_proponents_opponents, top_entries
from iif.report import image_shape as guess_shape
from iif.store import CHUNKS, MANIFEST


def show(
    folder: str | Path,
    *,
    task: str | None = None,
    test_indices: Sequence[int] = (0,),
    k: int = 8,
    image_shape: Sequence[int] | None = None,
) -> str:
    """A text summary of ``folder``; with ``task`` (the job's task function) also writes
    ``show_<i>.png`` there for each test index, the test input beside its top-k proponents
    and opponents."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if not (folder / SCORES_FILE).exists() or not (folder / META_FILE).exists():
        if manifest is None:
            raise InputError(f"{folder} holds neither an attribution nor a manifest")
        done = len(list((folder / CHUNKS).glob("*.json")))
        total = len(manifest["bounds"]) - 1
        return (f"{folder}: {manifest['method']} run in progress, {done} of {total} chunks "
                f"finished (n_test {manifest['n_test']}, n_train {manifest['n_train']}); "
                f"rerun the attribute command to finish it")
    result = Attribution.load(folder)
    meaning = "score > 0: the training sample raises the test loss"
    if "contrast" in result.info:
        meaning = "scores of the margin log p_A - log p_B; score > 0: pushes towards A"
    lines = [f"{folder}: {result.method}, {result.n_test} test x {result.n_train} training "
             f"samples; {meaning}"]
    settings = result.settings
    for key in ("projection", "baseline", "path", "curvature"):
        if key in settings:
            lines.append(f"  {key}: " + ", ".join(f"{a}={b}" for a, b in settings[key].items()))
    if result.completeness is not None:
        gap = np.asarray(result.completeness["gap"], dtype=float)
        if np.isfinite(gap).any():
            lines.append(f"  completeness gap |sum - delta| / |delta|: median "
                         f"{np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}")
    flags = result.info.get("flags")
    if not isinstance(flags, dict):  # a result saved before flags were recorded
        flags = trust_flags(result.completeness, result.info)
    summary = summarize(flags, result.completeness)
    if summary:
        lines.append(f"warning: {summary}")
    job = None
    if task is not None:
        from iif.config import load_job

        job = load_job(task)
    labels = images = None
    if job is not None:
        train = job.task.validate(job.train, "training data")
        test = job.task.validate(job.test, "test data")
        if len(train) != result.n_train or len(test) != result.n_test:
            raise InputError(f"{task} gives {len(test)} test x {len(train)} training samples, "
                             f"the folder {result.n_test} x {result.n_train}")
        labels = train.labels.cpu().numpy()
        images = train.x.cpu().numpy()
    for i in test_indices:
        if not 0 <= i < result.n_test:
            raise InputError(f"test index {i} is outside 0..{result.n_test - 1}")
        pro, opp = top_entries(result.scores[i], labels, k)
        comp = None if result.completeness is None else {
            key: v[i] for key, v in result.completeness.items()}
        lines.append(f"test sample {i}: {format_completeness(comp)}")
        note = describe(flags, i, result.completeness)
        if note:
            lines.append(f"  warning: test {i}: {note}")
        for title, entries in (("proponents", pro), ("opponents", opp)):
            lines.append(f"  {title}: " + ", ".join(
                f"#{e['index']}" + (f" (label {e['label']})" if "label" in e else "")
                + f" {e['score']:+.3g}" for e in entries))
        if job is not None:
            shape = guess_shape(images.shape[1:], image_shape)
            if shape is None:
                raise InputError("inputs are not square images: give --image-shape")
            x_test = test.x[i].cpu().numpy()
            path = plot_proponents_opponents(
                x_test, test.labels[i].cpu().numpy().tolist(), images, labels, result.scores[i],
                folder / f"show_{i}.png", k=k, image_shape=shape, completeness=comp,
                warning=note)
            lines.append(f"  wrote {path}")
    return "\n".join(lines)
