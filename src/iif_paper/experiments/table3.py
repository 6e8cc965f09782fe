"""Table 3 of the paper: finding mislabelled training samples by self-influence (AUC).

Protocol (paper §3.3): 1,000 random training images, 10% of their labels flipped to another
class at random, the model trained on the noisy labels; every method scores each training
sample's self-influence, and ``-self_influence`` ranks the samples (most negative first: the
samples the model fits only through themselves). AUC of that ranking for the flipped samples.

Datasets: MNIST with the 4-layer MLP of :mod:`iif_paper.experiments.mnist`; CIFAR-10 with ResNet-9
when ``$IIF_CIFAR10_DIR`` names a ``cifar-10-batches-py`` folder; Fashion-MNIST with a small
CNN (the offline stand-in for CIFAR-10), run when its IDX files are found (Debian package
``dataset-fashion-mnist``, or ``$IIF_FASHION_MNIST_DIR``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iif.evaluation import detection_curve, flip_labels, mislabel_auc
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif.task.task import Recipe, Task
from iif_paper.data import load_mnist
from iif_paper.data.cifar import cifar10_dir, load_cifar10
from iif_paper.experiments import mnist
from iif_paper.experiments.base import ExperimentResult, Table, begin

NAME = "table3"
TITLE = "Table 3: AUC of finding mislabelled samples by self-influence"
FASHION_ENV = "IIF_FASHION_MNIST_DIR"
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)

PAPER: Table = {
    "IF": {"MNIST": 0.869, "CIFAR-10": None},  # the paper: out of memory on CIFAR-10
    "TracIn": {"MNIST": 0.853, "CIFAR-10": 0.677},
    "TRAK": {"MNIST": 0.866, "CIFAR-10": 0.728},
    "IIF": {"MNIST": 0.885, "CIFAR-10": 0.736},
}

SIZES: dict[str, dict[str, Any]] = {
    "full": {"n_train": 1000, "epochs": mnist.EPOCHS, "cnn_epochs": 10, "checkpoints": 5,
             "steps": 5, "dim": 256, "trak_dim": 2048, "resnet_width": 1.0,
             "chunk_size": 16},
    "smoke": {"n_train": 120, "epochs": 3, "cnn_epochs": 2, "checkpoints": 3, "steps": 2,
              "dim": 32, "trak_dim": 64, "resnet_width": 0.125, "chunk_size": 64},
}


def fashion_dir() -> Path | None:
    """The Fashion-MNIST folder if one is available locally."""
    candidates = [os.environ.get(FASHION_ENV), *FASHION_DIRS]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file():
            return Path(c)
    return None


def cnn(seed: int) -> nn.Module:
    """A small CNN for 28x28 images: two 3x3 convolutions with pooling, dropout 0.1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 7 * 7, 10),
        )


def resnet9(seed: int, width: float = 1.0) -> nn.Module:
    """ResNet-9 (paper Table 5: channels 64, 128, 128, 128, 256, 512, 512, 512, then 10
    classes; dropout 0.1) for 3 x 32 x 32 images; ``width`` scales every channel count."""
    def c(ch: int) -> int:
        return max(4, int(round(ch * width)))

    def block(cin: int, cout: int, pool: bool = False) -> list[nn.Module]:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                  nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    class Residual(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.body = nn.Sequential(*block(ch, ch), *block(ch, ch))

        def forward(self, x):
            return x + self.body(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            *block(3, c(64)), *block(c(64), c(128), pool=True), Residual(c(128)),
            *block(c(128), c(256), pool=True), *block(c(256), c(512), pool=True),
            Residual(c(512)), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.1),
            nn.Linear(c(512), 10),
        )


def one_dataset(x, y, model: nn.Module, recipe: Recipe, size, seed, progress) -> dict:
    noisy, flipped = flip_labels(y, 0.1, num_classes=10, seed=seed)
    task = Task(model, "classification", recipe)
    every = max(1, recipe.epochs // size["checkpoints"])
    checkpoints = train_with_checkpoints(task, (x, noisy), every=every, seed=seed,
                                         progress=progress)
    out: dict[str, Any] = {"auc": {}, "curve": {}, "seconds": {}}
    # IIF's self-influence uses the per-sample baselines of paper 3.3 (lambda = 0 in the
    # paper's Table 6: theta'_i = theta* + eta grad l_i), not the unlearning settings
    for name, method in mnist.methods(task, (x, noisy), size, checkpoints, seed, progress,
                                      chunk_size=size["chunk_size"]).items():
        t0 = time.perf_counter()
        si = method.self_influence()
        out["seconds"][name] = time.perf_counter() - t0
        out["auc"][name] = mislabel_auc(si, flipped)
        out["curve"][name] = detection_curve(si, flipped)
    out["train_accuracy_noisy_labels"] = mnist.accuracy(task.model, (x, noisy))
    out["flipped"] = int(flipped.sum())
    return out


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Run Table 3 at ``scale`` and write ``table3.json`` and ``table3.md`` into ``out_dir``."""
    start, out, size = begin(out_dir, scale, SIZES)
    datasets: dict[str, dict] = {}
    (x, y), _ = mnist.draw(size["n_train"], None, seed)
    datasets["MNIST"] = one_dataset(x, y, mnist.mlp(seed), mnist.recipe(size["epochs"]), size,
                                    seed, progress)
    fashion = fashion_dir()
    if fashion is not None:
        fx, fy = load_mnist("train", root=fashion, flatten=False)
        order = np.random.default_rng(seed).permutation(len(fy))[: size["n_train"]]
        recipe = Recipe(lr=0.001, optimizer="adam", batch_size=64, epochs=size["cnn_epochs"])
        datasets["Fashion-MNIST"] = one_dataset(fx[order], fy[order], cnn(seed), recipe, size,
                                                seed, progress)
    cifar = cifar10_dir()
    if cifar is not None:
        cx, cy = load_cifar10("train", cifar)
        order = np.random.default_rng(seed).permutation(len(cy))[: size["n_train"]]
        recipe = Recipe(lr=0.001, optimizer="adam", batch_size=64, epochs=size["cnn_epochs"])
        datasets["CIFAR-10"] = one_dataset(cx[order], cy[order],
                                           resnet9(seed, size["resnet_width"]), recipe, size,
                                           seed, progress)
    results: Table = {m: {d: datasets[d]["auc"][m] for d in datasets} for m in PAPER}
    notes = []
    if fashion is None:
        notes.append("Fashion-MNIST was not found (install the Debian package "
                     "dataset-fashion-mnist or set $IIF_FASHION_MNIST_DIR); its column is "
                     "missing.")
    if cifar is None:
        notes.append("CIFAR-10 was not given (set $IIF_CIFAR10_DIR to a cifar-10-batches-py "
                     "folder); the paper's CIFAR-10 numbers are shown for reference only.")
    settings = {**size, "seed": seed, "flip_fraction": 0.1,
                "datasets": {d: {k: v for k, v in info.items() if k != "auc"}
                             for d, info in datasets.items()},
                "fashion_mnist_dir": None if fashion is None else str(fashion),
                "cifar10_dir": None if cifar is None else str(cifar)}
    best = {d: max(PAPER, key=lambda m, d=d: results[m][d]) for d in datasets}
    differences = " ".join(
        [f"{d}: best {best[d]} ({results[best[d]][d]:.3f}); " + ", ".join(
            f"{m} {results[m][d]:.3f}" + (f" (paper {PAPER[m][d]:.3f})" if PAPER[m].get(d)
                                          is not None else "") for m in PAPER) + "."
         for d in datasets] + notes)
    protocol = (
        f"{size['n_train']} random training images per dataset, 10% of labels flipped to a "
        f"random other class (seeded); MNIST: MLP 784-128-64-10, dropout 0.1, SGD lr 0.01 "
        f"momentum 0.9, {size['epochs']} epochs; Fashion-MNIST: a two-layer CNN, Adam lr "
        f"0.001, {size['cnn_epochs']} epochs; CIFAR-10 (when given): ResNet-9 at width "
        f"{size['resnet_width']:g}, Adam lr 0.001, {size['cnn_epochs']} epochs. Score: "
        f"-self-influence; AUC over all training samples. IIF uses per-sample baselines "
        f"theta*+eta grad l_i (paper 3.3); all "
        f"projections are Kronecker-factored with P = {size['dim']} "
        f"(TRAK: {size['trak_dim']}).")
    result = ExperimentResult(
        name=NAME, scale=scale, title=TITLE, settings=settings, results=results, paper=PAPER,
        columns=[c for c in ("MNIST", "Fashion-MNIST", "CIFAR-10")
                 if c in datasets or c == "CIFAR-10"],
        protocol=protocol, differences=differences, notes=notes,
        seconds=time.perf_counter() - start,
    )
    return result.write(out)
