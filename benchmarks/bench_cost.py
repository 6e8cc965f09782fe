"""Per-test cost of Integrated Influence on the quality tasks, beside what bounds it.

One path step of IIF trains a path model for an epoch and takes the per-sample gradients of
every training sample at it; a test sample's path has K - 1 such steps after theta* (whose
per-sample gradients and solver are computed once per run), one unlearning epoch for its
baseline and, with ``PathSettings(measure_end=True)``, one more epoch for the path's end. The
two floor rows time one epoch of the recipe's optimizer over the training set and one pass
of per-sample gradients over it, at theta*: no IIF setting that trains its path models can
cost less per test sample than ``K - 1`` of each.

Rows, all on the same test samples of the task, in one run:

- floors: one training epoch; one per-sample-gradient pass;
- IIF with the curvature fitted at each path model and once at theta* (``path_fit``; the
  line under the table says which of the two the default ``"auto"`` is on this model);
- IF at the defaults and TRAK-1 (one model trained on half the data, as in
  ``bench_quality.py``), whose per-test figures share their one-off work (training TRAK's
  model, featurising the training set, the curvature) among the test samples measured.

Usage::

    python benchmarks/bench_cost.py --task cnn --tests 4 --threads 1
    python benchmarks/bench_cost.py --task lm --tests 4 --threads 1

State the machine's load with the figures: on 2 cores a second job slows every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

from iif import (  # noqa: E402
    TRAK,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    train_ensemble,
)


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def floors(qt) -> dict[str, float]:
    """Seconds of one training epoch and of one per-sample-gradient pass at theta*."""
    engine = InfluenceFunction(qt.task, qt.train, progress=False).engine
    x, targets = engine.train.x, engine.train.targets
    _, epoch = _timed(lambda: engine.fit(engine.state, x, targets, epochs=1,
                                         generator=torch.Generator().manual_seed(0)))
    _, grads = _timed(lambda: engine.loss_features(engine.state, x, targets))
    return {"one training epoch": epoch, "one per-sample-gradient pass": grads}


def methods(qt, idx: np.ndarray) -> dict[str, float]:
    """Total seconds of each method on the test samples ``idx``."""
    test = qt.test_rows(idx)
    rows: dict[str, float] = {}
    def iif(fit: str):
        return lambda: IntegratedInfluence(qt.task, qt.train, progress=False,
                                           curvature=CurvatureSettings(path_fit=fit))

    for name, make in (
        ("IIF, curvature fitted at each path model", iif("each")),
        ("IIF, curvature fitted once at theta*", iif("once")),
        ("IF, defaults", lambda: InfluenceFunction(qt.task, qt.train, progress=False)),
    ):
        _, rows[name] = _timed(lambda make=make: make().attribute(test))

    def trak() -> None:
        members = train_ensemble(qt.task, qt.train, 1, subset="half", seed=qtasks.SEED + 1,
                                 progress=False)
        TRAK(qt.task, qt.train, models=members, progress=False).attribute(test)

    _, rows["TRAK-1 (training its model included)"] = _timed(trak)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(qtasks.TASKS), default="cnn")
    p.add_argument("--tests", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    qt = qtasks.TASKS[args.task]()
    idx = np.arange(args.tests)
    print(f"task {qt.name}: {qt.n_train()} training samples, {idx.size} test samples, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    bounds = floors(qt)
    totals = methods(qt, idx)
    trak = totals["TRAK-1 (training its model included)"] / idx.size
    print("\n| | seconds | per test sample | / TRAK-1 per test |")
    print("|---|---:|---:|---:|")
    for name, seconds in bounds.items():
        print(f"| floor: {name} | {seconds:.2f} | | |")
    for name, seconds in totals.items():
        per = seconds / idx.size
        print(f"| {name} | {seconds:.1f} | {per:.2f} | {per / trak:.1f}x |")
    default = IntegratedInfluence(qt.task, qt.train, progress=False)._path_fit()
    print(f"\nIIF's default path_fit='auto' is {default!r} on this model.")


if __name__ == "__main__":
    main()
