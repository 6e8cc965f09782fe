"""Per-test IIF one test sample at a time against batches of stacked test samples, in one run.

MLP 784-128-64-10 (float32) trained 5 epochs with SGD (lr 0.01, momentum 0.9, batch 64) on
seeded MNIST training images; the same seeded test images are attributed with
``IntegratedInfluence(test_batch=B)`` for each B (per-test unlearning baselines, K = 5,
Kronecker projection P = 256 by default). Prints seconds per test sample, the throughput ratio
to B = 1, and the largest score difference to B = 1 relative to the largest score (the
batched scores equal the one-at-a-time ones up to float32 rounding).

Usage::

    python benchmarks/bench_batched.py [--threads 2] [--n-train 5000] [--n-test 32]
        [--batches 1 8 32] [--structure kronecker|dense] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from bench_engine import machine_info, make_mlp, max_rss_mib, mnist_subset, timed

import iif
from iif import IntegratedInfluence, PathSettings, ProjectionSettings, Recipe, Task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=5, help="IIF path steps K")
    ap.add_argument("--proj-dim", type=int, default=256)
    ap.add_argument("--structure", default="kronecker", choices=["kronecker", "dense"])
    ap.add_argument("--train-epochs", type=int, default=5)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    args.n_train = args.n_train or (500 if args.quick else 5000)
    args.n_test = args.n_test or (8 if args.quick else 32)
    args.batches = args.batches or ([1, 4, 8] if args.quick else [1, 8, 32])
    return args


def training_epoch_per_copy(task: Task, x: torch.Tensor, y: torch.Tensor,
                            batches: list[int]) -> dict[int, float]:
    """Seconds per model copy of one training epoch: ``fit`` for one model, ``fit_stacked``
    for B copies sharing the minibatches (median of 3 after a warm-up)."""
    from iif.engine.functional import FunctionalModel
    from iif.engine.stacked import StackedState, fit_stacked
    from iif.engine.training import fit

    data = task.validate((x, y), "training data")
    fmodel = FunctionalModel(task.model)
    state = fmodel.state()
    out = {}
    for b in batches:
        def run(b: int = b) -> None:
            gen = torch.Generator().manual_seed(0)
            if b == 1:
                fit(task, fmodel, state, data.x, data.targets, epochs=1, generator=gen)
            else:
                fit_stacked(task, fmodel, StackedState.repeat(state, b), data.x, data.targets,
                            epochs=1, generator=gen)
        out[b] = statistics.median(timed(run, repeats=3)) / b
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    x, y = mnist_subset("train", args.n_train, None)
    xt, yt = mnist_subset("test", args.n_test, None)
    task = Task(make_mlp(), "classification",
                recipe=Recipe(lr=0.01, momentum=0.9, batch_size=64, epochs=args.train_epochs))
    iif.train(task, (x, y), seed=0, progress=False)
    print(f"torch {torch.__version__}, {args.threads} threads; N = {len(y)}, {len(yt)} test "
          f"samples, K = {args.steps}, P = {args.proj_dim} ({args.structure})", flush=True)

    rows = []
    reference = None
    for b in args.batches:
        method = IntegratedInfluence(
            task, (x, y), path=PathSettings(steps=args.steps), test_batch=b, progress=False,
            projection=ProjectionSettings(dim=args.proj_dim, structure=args.structure))
        start = time.perf_counter()
        result = method.attribute((xt, yt))
        seconds = time.perf_counter() - start
        if reference is None:
            reference = result.scores
        diff = float(np.abs(result.scores - reference).max() / np.abs(reference).max())
        rows.append({"test_batch": b, "seconds": seconds, "s_per_test": seconds / len(yt),
                     "max_rel_diff_to_first": diff,
                     "fallbacks": result.info["fallbacks"],
                     "truncated": result.info["truncated"]})
        print(f"  test_batch {b:>3}: {seconds:7.2f} s, {seconds / len(yt):.3f} s per test "
              f"sample, max |diff| / max |score| to test_batch {args.batches[0]}: {diff:.1e}",
              flush=True)

    epoch = training_epoch_per_copy(task, x, y, args.batches)

    base = rows[0]["s_per_test"]
    print(f"\n{'test_batch':>10}{'s / test':>10}{'tests / s':>11}{'ratio':>8}")
    for r in rows:
        r["ratio"] = base / r["s_per_test"]
        print(f"{r['test_batch']:>10}{r['s_per_test']:>10.3f}{1 / r['s_per_test']:>11.2f}"
              f"{r['ratio']:>7.2f}x")
    print("\none epoch of path training (SGD, batch 64), seconds per model copy:")
    for b, sec in epoch.items():
        print(f"  {b:>3} cop{'y' if b == 1 else 'ies'}: {sec:.4f} s per copy "
              f"({epoch[min(epoch)] / sec:.2f}x)")
    out = {"machine": info, "args": vars(args), "rows": rows, "epoch_per_copy_s": epoch,
           "max_rss_mib": max_rss_mib()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
