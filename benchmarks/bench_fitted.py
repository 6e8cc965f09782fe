"""Fitted state: the first attribute call (which fits the training side) against a second call
on new test samples, and fitting into a folder against loading it in a new method object.

Task: MLP 784-128-64-10 (float32) trained with SGD (lr 0.01, momentum 0.9, batch 64) on
``--n-train`` seeded MNIST training images. For each method (IF exact from layer factors, IF
projected, TRAK) and one model, in one run with the same thread count:

- ``first``: ``attribute`` on 32 test images (fits the training side),
- ``second``: ``attribute`` on 32 other test images (test features and products only),
- ``save``: ``fit(folder)`` in a new method object (computes and writes the state),
- ``load+attr``: ``fit(folder)`` in another new method object (reads it) and ``attribute``.

Scores of the second call and of the loaded object are checked bit-equal to a fresh method's.

Usage::

    python benchmarks/bench_fitted.py [--threads 1] [--n-train 2000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0
N_TEST = 32


def make_mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def load_data(n_train: int, mnist_dir: str | None):
    """``n_train`` seeded training images and two disjoint sets of N_TEST test images."""
    from iif_paper.data import load_mnist

    x, y = load_mnist("train", root=mnist_dir)
    order = np.random.default_rng(SEED).permutation(len(y))[:n_train]
    xt, yt = load_mnist("test", root=mnist_dir)
    torder = np.random.default_rng(SEED + 1).permutation(len(yt))[: 2 * N_TEST]
    first, second = torder[:N_TEST], torder[N_TEST:]
    as_t = torch.from_numpy
    return ((as_t(x[order]), as_t(y[order])), (as_t(xt[first]), as_t(yt[first])),
            (as_t(xt[second]), as_t(yt[second])))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name: str, make: Callable[[], Any], test_a, test_b) -> dict[str, float]:
    method = make()
    first, _ = timed(lambda: method.attribute(test_a))
    second, result = timed(lambda: method.attribute(test_b))
    reference = make().attribute(test_b).scores
    with tempfile.TemporaryDirectory() as folder:
        save, _ = timed(lambda: make().fit(folder))
        load, loaded = timed(lambda: make().fit(folder).attribute(test_b))
    equal = (np.array_equal(result.scores, reference)
             and np.array_equal(loaded.scores, reference))
    print(f"{name:<14} {first:9.3f} {second:9.3f} {first / second:8.1f}x {save:9.3f} "
          f"{load:10.3f} {save / load:8.1f}x  {'yes' if equal else 'NO'}", flush=True)
    return {"first": first, "second": second, "save": save, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--mnist-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from iif import TRAK, InfluenceFunction, ProjectionSettings, Recipe, Task, train

    train_data, test_a, test_b = load_data(args.n_train, args.mnist_dir)
    task = Task(make_mlp(), "classification",
                Recipe(lr=0.01, momentum=0.9, batch_size=64, epochs=args.epochs))
    train(task, train_data)
    task.model.eval()
    proj = ProjectionSettings(dim=args.proj_dim)
    methods: dict[str, Callable[[], Any]] = {
        "IF exact": lambda: InfluenceFunction(task, train_data, progress=False),
        "IF projected": lambda: InfluenceFunction(task, train_data, progress=False,
                                                  projection=proj),
        "TRAK": lambda: TRAK(task, train_data, progress=False, projection=proj),
    }
    print(f"MNIST MLP 784-128-64-10, N = {args.n_train} training images, {N_TEST} test images "
          f"per call, P = {args.proj_dim} (projected), threads = {args.threads}; seconds")
    print(f"{'method':<14} {'first':>9} {'second':>9} {'ratio':>9} {'save':>9} "
          f"{'load+attr':>10} {'ratio':>9}  bit-equal")
    for name, make in methods.items():
        bench(name, make, test_a, test_b)


if __name__ == "__main__":
    main()
