"""Table 2 of the paper: LDS of IF, TracIn, TRAK and IIF on MNIST.

Protocol (paper §3.2, appendix D): 5,000 random MNIST training images, 1,000 random test
images, the 4-layer MLP of :mod:`iif_paper.experiments.mnist` trained 50 epochs. Each method scores
every (test, training) pair; the LDS compares, over M random half-size training subsets, the
sum of a test image's scores over the subset with the test loss of a model retrained on it
(:func:`iif.evaluation.ground_truth`, batched, cached under ``out_dir/cache``). A linear
datamodel fitted on M other subsets gives the ceiling of additive attributions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from iif.evaluation import RetrainSettings, ground_truth
from iif.evaluation.datamodel import datamodel_lds
from iif.methods.integrated.baseline import BaselineSettings
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif_paper.experiments import mnist
from iif_paper.experiments.base import ExperimentResult, Table, begin

NAME = "table2"
TITLE = "Table 2: LDS on MNIST"
COLUMN = "LDS"

PAPER: Table = {
    "IF": {COLUMN: 0.1035},
    "TracIn": {COLUMN: 0.1379},
    "TRAK": {COLUMN: 0.1115},
    "IIF": {COLUMN: 0.1635},
    "datamodel": {COLUMN: None},
}

SIZES: dict[str, dict[str, Any]] = {
    # full: the paper's sizes, except M = 1,000 retrained models (the paper trained 5,000)
    "full": {"n_train": 5000, "n_test": 1000, "epochs": mnist.EPOCHS, "n_subsets": 1000,
             "batch_models": 32, "checkpoints": 5, "steps": 5, "dim": 256, "trak_dim": 2048},
    "smoke": {"n_train": 200, "n_test": 6, "epochs": 3, "n_subsets": 12, "batch_models": 6,
              "checkpoints": 3, "steps": 2, "dim": 64, "trak_dim": 128},
}


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Run Table 2 at ``scale`` and write ``table2.json`` and ``table2.md`` into ``out_dir``."""
    start, out, size = begin(out_dir, scale, SIZES)
    train, test = mnist.draw(size["n_train"], size["n_test"], seed)
    task = mnist.task(seed, size["epochs"])
    every = max(1, size["epochs"] // size["checkpoints"])
    checkpoints = train_with_checkpoints(task, train, every=every, seed=seed, progress=progress)
    acc = {"train": mnist.accuracy(task.model, train), "test": mnist.accuracy(task.model, test)}

    timings: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {}
    # the paper's Table 6 for MNIST attribution: lambda = 0.5, P = 256; 5 unlearning epochs
    baseline = BaselineSettings(lam=0.5, epochs=5)
    for name, method in mnist.methods(task, train, size, checkpoints, seed, progress,
                                      baseline).items():
        t0 = time.perf_counter()
        scores[name] = method.attribute(test).scores
        timings[name] = time.perf_counter() - t0

    template = mnist.task(seed + 1000, size["epochs"])  # re-initialised per retrained model
    retrain = RetrainSettings(n_subsets=size["n_subsets"], fraction=0.5, seed=seed,
                              batch_models=size["batch_models"], epochs=size["epochs"])
    truth = ground_truth(template, train, test, retrain, cache_dir=out / "cache",
                         progress=progress)
    fit_settings = RetrainSettings(**{**retrain.to_dict(), "seed": seed + 1})
    fit_truth = ground_truth(template, train, test, fit_settings, cache_dir=out / "cache",
                             progress=progress)

    results: Table = {}
    stderr: Table = {}
    for name, s in scores.items():
        r = truth.evaluate(s)
        results[name], stderr[name] = {COLUMN: r.mean}, {COLUMN: r.stderr}
    ceiling = datamodel_lds(fit_truth.subsets, fit_truth.losses, truth.subsets, truth.losses)
    results["datamodel"], stderr["datamodel"] = {COLUMN: ceiling.mean}, {COLUMN: ceiling.stderr}

    settings = {
        **size, "seed": seed, "fraction": 0.5, "repeats": 1, "accuracy": acc,
        "methods": {
            "IF": "projected empirical Fisher, P = 256 (Kronecker), default damping",
            "TracIn": f"{len(checkpoints)} checkpoints (every {every} epochs), P = 256",
            "TRAK": f"1 model, P = {size['trak_dim']} (Kronecker)",
            "IIF": f"per-test unlearning baseline, lambda = 0.5, 5 epochs, K = {size['steps']}, "
                   f"P = 256 (Kronecker), empirical Fisher",
        },
        "seconds": {**timings, "ground_truth": truth.info.get("wall_seconds"),
                    "datamodel_ground_truth": fit_truth.info.get("wall_seconds")},
        "retrained_models": 2 * size["n_subsets"],
    }
    best = max(scores, key=lambda k: results[k][COLUMN])
    differences = _differences(results, stderr, best, size)
    result = ExperimentResult(
        name=NAME, scale=scale, title=TITLE, settings=settings, results=results,
        paper=PAPER, stderr=stderr, columns=[COLUMN],
        protocol=_protocol(size, every, len(checkpoints)), differences=differences,
        seconds=time.perf_counter() - start,
    )
    return result.write(out)


def _protocol(size: dict[str, Any], every: int, n_checkpoints: int) -> str:
    return (
        f"{size['n_train']} random MNIST training images and {size['n_test']} random test "
        f"images; MLP 784-128-64-10 with ReLU and dropout 0.1, SGD (lr 0.01, momentum 0.9, "
        f"batch 64) for {size['epochs']} epochs. LDS over M = {size['n_subsets']} random "
        f"subsets of half the training set, one retrained model each (same recipe, fresh "
        f"initialisation), Spearman per test image, mean ± standard error over test images. "
        f"The datamodel ceiling is a ridge regression of each test loss on subset membership "
        f"fitted on M other subsets. All projections are Kronecker-factored (seed-matched); "
        f"TracIn uses {n_checkpoints} checkpoints, one every {every} epochs."
    )


def _differences(results: Table, stderr: Table, best: str, size: dict[str, Any]) -> str:
    lines = []
    for name in ("IF", "TracIn", "TRAK", "IIF"):
        ours, paper = results[name][COLUMN], PAPER[name][COLUMN]
        lines.append(f"{name}: {ours:.4f} ± {stderr[name][COLUMN]:.4f} (paper {paper:.4f}).")
    order = sorted(("IF", "TracIn", "TRAK", "IIF"), key=lambda k: -results[k][COLUMN])
    lines.append(f"Our ranking: {' > '.join(order)}; the paper's: IIF > TracIn > TRAK > IF. "
                 f"Best here: {best}.")
    if size["n_subsets"] < 5000:
        lines.append(f"We retrain M = {size['n_subsets']} models where the paper trained "
                     f"5,000: our standard errors are over test images, not over subsets.")
    lines.append(f"Datamodel ceiling: {results['datamodel'][COLUMN]:.4f}.")
    return " ".join(lines)
