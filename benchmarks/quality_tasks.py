"""The two held-out tasks of the quality benchmark (``bench_quality.py``) and their LDS ground
truth, with the subsets split once into a tuning half and a report half.

- ``digits``: scikit-learn digits, 1,000 train / 200 test, MLP 64-128-64-10, SGD lr 0.05,
  momentum 0.9, weight decay 5e-4, batch 64, 40 epochs.
- ``mnist``: 5,000 train / 500 test from ``../shared/data/mnist``, MLP 784-128-64-10 with
  dropout 0.1, SGD lr 0.01, momentum 0.9, batch 64, 50 epochs.

Ground truth: ``N_SUBSETS`` random half-size subsets, ``REPEATS`` retrained models per subset
(R5 = their mean test loss; R1 = the first model's), cached by ``iif.evaluation.ground_truth``.
Subsets with an even index form the tuning half, odd ones the report half: settings are only
ever chosen on the tuning half (``lds(..., half="tune")``), and tables report the other half.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iif import Recipe, Task, train
from iif.evaluation import GroundTruth, RetrainSettings, ground_truth, lds

SEED = 0
N_SUBSETS = 100
REPEATS = 5
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "quality"


@dataclass
class QualityTask:
    name: str
    task: Task
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    make_model: object  # seed -> untrained nn.Module of the task's architecture


def digits_task() -> QualityTask:
    from iif_paper.data import load_digits

    (x, y), (xt, yt) = load_digits(n_train=1000, n_test=200, seed=SEED)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                             nn.Linear(64, 10))

    recipe = Recipe(lr=0.05, epochs=40, batch_size=64, momentum=0.9, weight_decay=5e-4)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    train(task, (x, y), seed=SEED)
    model.eval()
    return QualityTask("digits", task, (x, y), (xt, yt), make)


def mnist_task(n_train: int = 5000, n_test: int = 500) -> QualityTask:
    from iif_paper.data import load_mnist

    x, y = load_mnist("train")
    order = np.random.default_rng(SEED).permutation(len(y))[:n_train]
    xt, yt = load_mnist("test")
    torder = np.random.default_rng(SEED + 1).permutation(len(yt))[:n_test]
    x, y = x[order].reshape(n_train, -1), y[order]
    xt, yt = xt[torder].reshape(n_test, -1), yt[torder]

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.1),
                             nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))

    recipe = Recipe(lr=0.01, epochs=50, batch_size=64, momentum=0.9)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    train(task, (x, y), seed=SEED)
    model.eval()
    return QualityTask("mnist", task, (x, y), (xt, yt), make)


TASKS = {"digits": digits_task, "mnist": mnist_task}


def truth(qt: QualityTask, progress: bool | None = None) -> GroundTruth:
    settings = RetrainSettings(n_subsets=N_SUBSETS, fraction=0.5, repeats=REPEATS, seed=SEED,
                               batch_models=50)
    gt = ground_truth(qt.task, qt.train, qt.test, settings, cache_dir=CACHE / qt.name,
                      progress=progress)
    assert gt is not None
    return gt


def halves(n_subsets: int = N_SUBSETS) -> dict[str, np.ndarray]:
    """Subset indices of the tuning half (even) and the report half (odd)."""
    idx = np.arange(n_subsets)
    return {"tune": idx[0::2], "report": idx[1::2]}


def lds_scores(gt: GroundTruth, scores: np.ndarray, half: str) -> dict[str, float]:
    """LDS R1 and R5 (with standard errors) of ``scores`` (n_test, N) on one half."""
    rows = halves(gt.subsets.shape[0])[half]
    r5 = lds(scores, gt.subsets[rows], gt.losses[rows])
    r1 = lds(scores, gt.subsets[rows], gt.repeat_losses[rows, 0])
    return {"r1": r1.mean, "r1_se": r1.stderr, "r5": r5.mean, "r5_se": r5.stderr}


def subset_truth(gt: GroundTruth, test_idx: np.ndarray) -> GroundTruth:
    """The ground truth of some test samples only (columns ``test_idx``)."""
    from dataclasses import replace

    return replace(gt, losses=gt.losses[:, test_idx],
                   repeat_losses=gt.repeat_losses[:, :, test_idx])
