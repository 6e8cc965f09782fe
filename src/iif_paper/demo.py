"""A complete, small example: train an MLP on scikit-learn digits and explain a few test
predictions with Integrated Influence.

``run_demo`` writes into ``out_dir``:

- ``summary.json``: settings, accuracy, timings and, per explained test sample, its label and
  prediction, top proponents and opponents (training index, label, score), completeness and
  whether its unlearning baseline fell back to theta*; for a misclassified sample also
  ``contrast``: why the model predicted its class and not the label (Integrated Influence
  with ``contrast=label``), the training samples pushing most towards each, and completeness;
- ``test_<index>.png`` (``index``: the sample's index in the digits test split): the test
  image beside its top proponents and opponents, with the completeness line explained;
- ``test_<index>_contrast.png`` for a misclassified sample: the training samples pushing most
  towards the predicted class and towards the label;
- ``attribution/``: the full score matrix (``iif.Attribution.load`` reads it back; row s is
  the test sample ``summary["test_samples"][s]["index"]``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from iif.engine.projection import ProjectionSettings
from iif.engine.training import train
from iif.errors import InputError
from iif.io import atomic_write, jsonable
from iif.methods.integrated.baseline import BaselineSettings
from iif.methods.integrated.integrated import IntegratedInfluence
from iif.methods.integrated.target_path import PathSettings
from iif.results.attribution import Attribution
from iif.results.diagnostics import index_offset
from iif.task.task import Recipe, Task
from iif.views.report import (
    contrast_caption,
    format_test_summary,
    gap_text,
    plot_proponents_opponents,
    plot_rankings,
    top_entries,
)
from iif_paper.data import load_digits

log = logging.getLogger("iif.demo")  # under the "iif" logger, which the CLI prints

SUMMARY_FILE = "summary.json"
ATTRIBUTION_DIR = "attribution"
IMAGE_SHAPE = (8, 8)
N_TEST_SPLIT = 200


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick`` shrinks them so that a run takes a few seconds."""

    n_train: int | None  # None: all 1,597 training digits
    epochs: int  # training epochs
    path_steps: int  # K
    projection_dim: int
    top_k: int

    @classmethod
    def make(cls, quick: bool, top_k: int = 8) -> DemoConfig:
        if quick:
            return cls(n_train=300, epochs=10, path_steps=2, projection_dim=64, top_k=top_k)
        return cls(n_train=None, epochs=30, path_steps=5, projection_dim=256, top_k=top_k)


def make_model(seed: int) -> nn.Module:
    """The demo's 64-64-10 ReLU MLP, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def choose_test_samples(labels: np.ndarray, predictions: np.ndarray, n: int) -> list[int]:
    """``n`` consecutive test samples: the first ``n``, or those ending at the first
    misclassified sample when it lies beyond them (explaining a mistake is the most
    instructive case). Consecutive, so that warnings and records name them by their test
    index (``iif.results.diagnostics.index_offset``)."""
    n = min(int(n), len(labels))
    wrong = np.flatnonzero(predictions != labels)
    end = max(n, int(wrong[0]) + 1) if wrong.size and n >= 2 else n
    return list(range(end - n, end))


def run_demo(
    out_dir: str | Path,
    n_test: int = 3,
    seed: int = 0,
    quick: bool = False,
    progress: bool | None = None,
    *,
    top_k: int = 8,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train, attribute ``n_test`` test predictions, print and save the results.

    Args:
        out_dir: folder for ``summary.json``, ``test_<index>.png`` and ``attribution/``.
        n_test: test samples to explain (1..200).
        seed: data split, model initialisation, minibatch order and attribution seed.
        quick: a smaller run (300 training samples, 10 epochs, K=2) for smoke tests.
        progress: progress reports (see iif.progress; None: bars on a terminal, else log lines).
        top_k: proponents and opponents shown per test sample.
        stream: where the per-sample summaries are printed (default: stdout); pass an
            ``io.StringIO()`` to keep them, or ``open(os.devnull, "w")`` to silence them.

    Returns:
        The dictionary written to ``summary.json``.
    """
    n_test = _positive_int(n_test, "n_test")
    if n_test > N_TEST_SPLIT:
        raise InputError(f"n_test must be at most {N_TEST_SPLIT} (the digits test split)")
    top_k = _positive_int(top_k, "top_k")
    seed = _int(seed, "seed")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stdout if stream is None else stream
    cfg = DemoConfig.make(bool(quick), top_k)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    (x_train, y_train), (x_test, y_test) = load_digits(cfg.n_train, N_TEST_SPLIT, seed)
    recipe = Recipe(lr=0.05, epochs=cfg.epochs, batch_size=64, optimizer="sgd", momentum=0.9)
    task = Task(make_model(seed), "classification", recipe)
    log.info("training a 64-64-10 MLP on %d digits for %d epochs", len(y_train), cfg.epochs)
    t0 = time.perf_counter()
    losses = train(task, (x_train, y_train), seed=seed, progress=progress)
    timings["training"] = time.perf_counter() - t0

    train_prob = _probabilities(task.model, x_train)
    test_prob = _probabilities(task.model, x_test)
    train_acc = float(np.mean(train_prob.argmax(1) == y_train))
    test_pred = test_prob.argmax(1)
    test_acc = float(np.mean(test_pred == y_test))
    log.info("accuracy: train %.3f, test %.3f (%.1f s)", train_acc, test_acc,
             timings["training"])

    chosen = choose_test_samples(y_test, test_pred, n_test)
    method = IntegratedInfluence(
        task,
        (x_train, y_train),
        # lr: the recipe's 0.05 with momentum overshoots when the test term is scaled by
        # 1/lam = 10; 0.01 reaches the default stop, chance-level test loss, without diverging.
        baseline=BaselineSettings(lam=0.1, lr=0.01),
        path=PathSettings(steps=cfg.path_steps),
        projection=ProjectionSettings(dim=cfg.projection_dim, seed=seed),
        seed=seed,
        progress=progress,
    )
    log.info("attributing %d test samples (indices %s) with Integrated Influence",
             len(chosen), chosen)
    t0 = time.perf_counter()
    with index_offset(chosen[0]):  # warnings name the samples by their test index
        attribution = method.attribute((x_test[chosen], y_test[chosen]))
    timings["attribution"] = time.perf_counter() - t0
    attribution.save(out / ATTRIBUTION_DIR)

    # a mistake: why the predicted class and not the label? (one baseline per sample, trained
    # towards the label; the scores attribute the margin log p_predicted - log p_label)
    wrong = [index for index in chosen if test_pred[index] != y_test[index]]
    contrast: dict[int, Attribution] = {}
    if wrong:
        log.info("explaining the mistake(s) %s against their labels", wrong)
        t0 = time.perf_counter()
        for index in wrong:  # one at a time, so that warnings name each by its test index
            with index_offset(index):
                contrast[index] = method.attribute((x_test[[index]], y_test[[index]]),
                                                   contrast=y_test[[index]])
        timings["contrast"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = []
    fell_back = set(attribution.info.get("fallback_tests", []))
    for s, index in enumerate(chosen):
        entry = _sample_entry(attribution, s, index, y_test, test_prob, y_train, cfg.top_k,
                              s in fell_back)
        image = out / f"test_{index}.png"
        plot_proponents_opponents(
            x_test[index], int(y_test[index]), x_train, y_train, attribution.scores[s], image,
            k=cfg.top_k, image_shape=IMAGE_SHAPE, prediction=entry["prediction"],
            completeness=entry["completeness"],
            title=_picture_title(entry),
        )
        entry["image"] = image.name
        print(format_test_summary(entry, _text_title(entry)), file=stream)
        if index in contrast:
            entry["contrast"] = _contrast_entry(contrast[index], 0, y_train,
                                                cfg.top_k)
            why = out / f"test_{index}_contrast.png"
            _plot_contrast(entry, x_test[index], x_train, why)
            entry["contrast"]["image"] = why.name
            print(_contrast_text(entry), file=stream)
        samples.append(entry)
        print(file=stream)
    timings["pictures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    summary = {
        "dataset": "digits (scikit-learn, 8x8)",
        "sign": "score > 0: including the training sample raises the test loss (opponent); "
                "score < 0: it lowers the test loss (proponent)",
        "settings": {
            "seed": seed,
            "quick": bool(quick),
            "n_test": len(chosen),
            "n_train": int(len(y_train)),
            "model": "MLP 64-64-10, ReLU",
            "demo": asdict(cfg),
            "attribution": attribution.settings,
        },
        "accuracy": {"train": train_acc, "test": test_acc},
        "training_loss": [float(v) for v in losses],
        "fallbacks": int(attribution.info.get("fallbacks", 0)),
        "truncated": int(attribution.info.get("truncated", 0)),
        "damping_retries": int(attribution.info.get("damping_retries", 0)),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "test_samples": samples,
        "files": {
            "attribution": ATTRIBUTION_DIR,
            "images": [e["image"] for e in samples],
            "contrast_images": [e["contrast"]["image"] for e in samples if "contrast" in e],
        },
    }
    text = json.dumps(jsonable(summary), indent=2, allow_nan=False)
    atomic_write(out / SUMMARY_FILE, lambda f: f.write((text + "\n").encode()))
    print(f"test accuracy {test_acc:.3f}; {summary['fallbacks']} of {len(chosen)} baselines "
          f"fell back; attribution {timings['attribution']:.1f} s, total "
          f"{timings['total']:.1f} s", file=stream)
    names = ", ".join(summary["files"]["images"] + summary["files"]["contrast_images"])
    print(f"wrote {out / SUMMARY_FILE}, pictures {names} and {out / ATTRIBUTION_DIR}/",
          file=stream)
    return summary


def load_attribution(out_dir: str | Path) -> Attribution:
    """The score matrix a demo run saved in ``out_dir``."""
    return Attribution.load(Path(out_dir) / ATTRIBUTION_DIR)


# ---- helpers ---------------------------------------------------------------------------------
def _sample_entry(
    attribution: Attribution,
    s: int,
    index: int,
    y_test: np.ndarray,
    test_prob: np.ndarray,
    y_train: np.ndarray,
    k: int,
    fell_back: bool,
) -> dict[str, Any]:
    label = int(y_test[index])
    prob = test_prob[index]
    pro, opp = top_entries(attribution.scores[s], y_train, k)
    comp = attribution.completeness or {}
    return {
        "position": s,
        "index": int(index),
        "label": label,
        "prediction": int(prob.argmax()),
        "confidence": float(prob.max()),
        "label_probability": float(prob[label]),
        "test_loss": float(-math.log(max(float(prob[label]), 1e-300))),
        "proponents": pro,
        "opponents": opp,
        "proponents_sharing_label": int(sum(e["label"] == label for e in pro)),
        "completeness": _completeness_row(comp, s),
        "fell_back": bool(fell_back),
    }


def _completeness_row(comp: dict[str, Any], s: int) -> dict[str, float]:
    """Row ``s`` of a result's completeness: the sum, both loss changes and their gaps (the
    path's end only where it was measured: JSON holds no NaN)."""
    row = {key: float(np.asarray(comp[key])[s]) for key in ("sum", "delta", "gap") if key in comp}
    for key in ("delta_path", "gap_path"):
        value = float(np.asarray(comp[key])[s]) if key in comp else math.nan
        if math.isfinite(value):
            row[key] = value
    return row


def _contrast_entry(contrast: Attribution, s: int, y_train: np.ndarray, k: int
                    ) -> dict[str, Any]:
    """Row ``s`` of the contrast result: A (predicted), B (label), the training samples
    pushing most towards each, and completeness of the margin."""
    a, b = int(contrast.info["contrast"]["A"][s]), int(contrast.info["contrast"]["B"][s])
    towards_b, towards_a = top_entries(contrast.scores[s], y_train, k)
    comp = contrast.completeness or {}
    return {
        "A": a,
        "B": b,
        "question": f"why {a} and not {b}?",
        "sign": f"score > 0: the training sample pushes towards {a} (the prediction); "
                f"< 0: towards {b} (the label)",
        "towards_prediction": towards_a,
        "towards_label": towards_b,
        "completeness": _completeness_row(comp, s),
        "fell_back": s in set(contrast.info.get("fallback_tests", [])),
    }


def _contrast_text(entry: dict[str, Any]) -> str:
    c = entry["contrast"]
    lines = [f"  why {c['A']} and not {c['B']} (the label)? margin log p_{c['A']} - "
             f"log p_{c['B']}, score > 0 pushes towards {c['A']}",
             f"    {contrast_caption(c['A'], c['B'])}"]
    for name, entries in ((f"towards {c['A']}", c["towards_prediction"]),
                          (f"towards {c['B']}", c["towards_label"])):
        lines.append(f"    {name}: " + ", ".join(
            f"#{e['index']} (label {e['label']}) {e['score']:+.2e}" for e in entries))
    comp = c["completeness"]
    if comp:
        lines.append(f"    completeness: sum of scores {comp['sum']:+.4g}, margin(theta*) - "
                     f"margin(theta') = {comp['delta']:+.4g}, gap "
                     f"{gap_text(comp['gap'], comp['delta'], c.get('fell_back', False))}")
    return "\n".join(lines)


def _plot_contrast(entry: dict[str, Any], x: np.ndarray, x_train: np.ndarray, path: Path
                   ) -> None:
    c = entry["contrast"]
    a, b = c["A"], c["B"]
    heading = (f"Test sample #{entry['index']}: label {entry['label']}, predicted {a} "
               f"(p = {entry['confidence']:.2f}). Why {a} and not {b}?")
    comp = c["completeness"]
    note = [f"Scores attribute the margin log p_{a} \u2212 log p_{b}: > 0 pushes towards "
            f"{a} (the prediction), < 0 towards {b} (the label).",
            *textwrap.wrap(_sentence(contrast_caption(a, b, unicode=True)), 150)]
    if comp:
        note.append(f"completeness: sum of scores {comp['sum']:+.4g}, margin(\u03b8*) \u2212 "
                    f"margin(\u03b8') = {comp['delta']:+.4g}, gap "
                    f"{gap_text(comp['gap'], comp['delta'], c.get('fell_back', False), 2)}")
        note.append(f"Completeness check: summed over all training samples, the scores should "
                    f"equal how much the margin grew from the baseline model \u03b8' "
                    f"(trained towards {b}) to the trained model \u03b8*.")
    rows = [(f"towards {a}\n(predicted)", c["towards_prediction"]),
            (f"towards {b}\n(label)", c["towards_label"])]
    plot_rankings(x, heading, rows, x_train, path, image_shape=IMAGE_SHAPE,
                  note="\n".join(note))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _text_title(entry: dict[str, Any]) -> str:
    status = "correct" if entry["prediction"] == entry["label"] else "MISCLASSIFIED"
    return (f"test sample #{entry['index']}: label {entry['label']}, predicted "
            f"{entry['prediction']} (p={entry['confidence']:.2f}, {status})")


def _picture_title(entry: dict[str, Any]) -> str:
    text = (f"Test sample #{entry['index']}: label {entry['label']}, "
            f"predicted {entry['prediction']} (p = {entry['confidence']:.2f})")
    if entry["prediction"] != entry["label"]:
        text += ", misclassified"
    if entry["fell_back"]:
        text += "  [baseline fell back to \u03b8*]"
    return text


def _probabilities(model: nn.Module, x: np.ndarray) -> np.ndarray:
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(x, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return torch.softmax(out, dim=-1).double().cpu().numpy()


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _positive_int(value: Any, name: str) -> int:
    value = _int(value, name)
    if value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    return value
