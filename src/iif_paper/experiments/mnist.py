"""The MNIST task shared by Table 2, Table 3 and Figure 2 (paper appendix D, Table 5).

A 4-layer MLP 784-128-64-10 with ReLU and dropout 0.1, cross-entropy, SGD with learning rate
0.01 and momentum 0.9 for 50 epochs (batch size 64: the paper does not give one). Training and
test samples are drawn at random, seeded, from the canonical MNIST files
(``iif_paper.data.load_mnist``: ``$IIF_MNIST_DIR`` or ``../shared/data/mnist``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from iif.task.task import Recipe, Task
from iif_paper.data import load_mnist

EPOCHS = 50
BATCH_SIZE = 64


def mlp(seed: int) -> nn.Module:
    """The paper's MNIST MLP (latent sizes 128, 64, 10; dropout 0.1), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(64, 10),
        )


def recipe(epochs: int = EPOCHS) -> Recipe:
    return Recipe(lr=0.01, momentum=0.9, batch_size=BATCH_SIZE, epochs=epochs)


def task(seed: int, epochs: int = EPOCHS) -> Task:
    """An untrained task with the paper's model and recipe."""
    return Task(mlp(seed), "classification", recipe(epochs))


def draw(n_train: int, n_test: int | None, seed: int):
    """``((x, y), (xt, yt))``: ``n_train`` random training images and ``n_test`` random test
    images (None: none), float32 (n, 784) and int64 labels."""
    x, y = load_mnist("train")
    order = np.random.default_rng(seed).permutation(len(y))[:n_train]
    train = (x[order], y[order])
    if n_test is None:
        return train, None
    xt, yt = load_mnist("test")
    torder = np.random.default_rng(seed + 1).permutation(len(yt))[:n_test]
    return train, (xt[torder], yt[torder])


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(data[0])).argmax(1).numpy()
    return float(np.mean(pred == np.asarray(data[1])))


def methods(task: Task, train, size: dict, checkpoints, seed: int, progress,
            baseline=None, **common) -> dict:
    """The four methods of the MNIST experiments with the paper's settings: Kronecker-factored
    projections of ``size["dim"]`` (TRAK: ``size["trak_dim"]``), TracIn on ``checkpoints``,
    IIF with ``baseline`` (default ``BaselineSettings()``) and ``size["steps"]`` path steps.
    ``common`` goes to every method (e.g. ``chunk_size``)."""
    from iif.engine.projection import ProjectionSettings
    from iif.methods import TRAK, InfluenceFunction, IntegratedInfluence, TracIn
    from iif.methods.integrated.baseline import BaselineSettings
    from iif.methods.integrated.target_path import PathSettings

    proj = ProjectionSettings(dim=size["dim"], seed=seed, structure="kronecker")
    common = {"seed": seed, "progress": progress, **common}
    return {
        "IF": InfluenceFunction(task, train, solver="projected", projection=proj, **common),
        "TracIn": TracIn(task, train, checkpoints=checkpoints, projection=proj, **common),
        "TRAK": TRAK(task, train, projection=ProjectionSettings(
            dim=size["trak_dim"], seed=seed, structure="kronecker"), **common),
        "IIF": IntegratedInfluence(task, train, baseline=baseline or BaselineSettings(),
                                   path=PathSettings(steps=size["steps"]), projection=proj,
                                   **common),
    }
