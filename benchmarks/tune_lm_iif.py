"""IIF's settings on the language-model experiment (``iif reproduce lm --scale full``): LDS,
completeness gap, recall@10 of the planted copies and seconds of a few baseline and path
settings, on one seed's data, model and LDS ground truth (docs/RESULTS.md, "Choosing IIF's
settings for sequences").

The data, the model and the LDS ground truth (the experiment's 32 random halves, one model
retrained on each) are built once per seed with the functions of
:mod:`iif_paper.experiments.lm`; the retrained models' query losses are cached in
``--cache`` so that a second run on the same seed skips the retraining.

Usage::

    python benchmarks/tune_lm_iif.py --seed 1 --queries 10 [--configs default lam10 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from iif import BaselineSettings, IntegratedInfluence
from iif.engine.projection import ProjectionSettings
from iif.evaluation.metrics import lds, random_subsets
from iif.methods.integrated.target_path import PathSettings
from iif_paper.experiments import lm
from iif_paper.lm.tokenizer import encode

CONFIGS: dict[str, tuple[str, BaselineSettings, PathSettings]] = {
    "default": ("complement, lam 1, 1 epoch, no stop; K 3 (default)",
                BaselineSettings(), PathSettings(steps=3)),
    "lam10": ("complement, lam 10", BaselineSettings(lam=10.0), PathSettings(steps=3)),
    "lr-10": ("complement, baseline lr 3e-4 (recipe's / 10)", BaselineSettings(lr=3e-4),
              PathSettings(steps=3)),
    "stop100": ("complement, stop at summed test loss 100 nats",
                BaselineSettings(stop_test_loss=100.0), PathSettings(steps=3)),
    "loss": ("loss objective, chance stop (auto)", BaselineSettings(objective="loss"),
             PathSettings(steps=3)),
    "K5": ("default baseline; K 5", BaselineSettings(), PathSettings(steps=5)),
    "dense": ("default baseline; K 3, dense path targets", BaselineSettings(),
              PathSettings(steps=3, sparse=False)),
    "lam10-K5": ("complement, lam 10; K 5", BaselineSettings(lam=10.0),
                 PathSettings(steps=5)),
    "P1024": ("default baseline; K 3, Kronecker P 1024", BaselineSettings(),
              PathSettings(steps=3)),
    "dense-P1024": ("default baseline; K 3, dense path targets, Kronecker P 1024",
                    BaselineSettings(), PathSettings(steps=3, sparse=False)),
}
DIMS = {"P1024": 1024, "dense-P1024": 1024}
"""Projection dimension of a config (the experiment's P = 256 otherwise)."""


def ground_truth(setup: lm.Setup, queries: tuple[torch.Tensor, torch.Tensor],
                 cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The LDS subsets (n_subsets, N) and the retrained models' query losses
    (n_subsets, n_queries), from ``cache`` when it holds this seed's."""
    subsets = random_subsets(setup.size["lds_subsets"], len(setup.train[0]), 0.5, setup.seed)
    if cache.exists():
        saved = np.load(cache)
        if np.array_equal(saved["subsets"], subsets):
            return subsets, saved["losses"]
    subsets, losses = lm.subset_losses(setup, queries)
    np.savez(cache, subsets=subsets, losses=losses)
    return subsets, losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=10, help="the first this many queries")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--cache", type=Path, default=Path("results/tune_lm"))
    p.add_argument("--out", type=Path, default=None,
                   help="JSON lines of the rows (default: <cache>/seed<seed>.jsonl)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    out = args.out or args.cache / f"seed{args.seed}.jsonl"

    size = lm.SIZES["full"]
    start = time.perf_counter()
    planted = lm.load_planted(size, args.seed)
    task, checkpoints, info = lm._train(planted, size, args.seed, progress=False)
    length = size["max_bytes"] + 2
    setup = lm.Setup(task, task, encode(planted.train, length), checkpoints, size, args.seed,
                     False)
    queries = encode(planted.queries, length)
    subsets, losses = ground_truth(setup, queries, args.cache / f"lds_seed{args.seed}.npz")
    print(f"seed {args.seed}: model trained ({info['train_seconds']:.0f} s), query token loss "
          f"{info['query_token_loss']:.3f}; LDS ground truth ready after "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    n = args.queries
    sub = (queries[0][:n], queries[1][:n])
    header = "| config | settings | LDS | median gap | median abs delta (nats) | recall@10 | s |"
    print(f"\n{n} queries, seed {args.seed}\n{header}\n|---|---|---:|---:|---:|---:|---:|",
          flush=True)
    for key in args.configs:
        label, baseline, path = CONFIGS[key]
        proj = ProjectionSettings(dim=DIMS.get(key, size["dim"]), seed=args.seed,
                                  structure="kronecker")
        t0 = time.perf_counter()
        result = IntegratedInfluence(task, setup.train, baseline=baseline, path=path,
                                     projection=proj, test_batch=1, seed=args.seed,
                                     progress=False).attribute(sub)
        seconds = time.perf_counter() - t0
        score = lds(result.scores, subsets, losses[:, :n])
        comp = result.completeness or {}
        gap = float(np.nanmedian(comp["gap"])) if "gap" in comp else float("nan")
        delta = float(np.median(np.abs(comp["delta"]))) if "delta" in comp else float("nan")
        recall = float(lm.recall_at_k(result, planted.planted[:n]).mean())
        row = {"seed": args.seed, "queries": n, "config": key, "settings": label,
               "lds": score.mean, "lds_se": score.stderr, "gap": gap, "delta": delta,
               "recall": recall, "seconds": seconds,
               "per_query_lds": score.per_test.tolist()}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {key} | {label} | {score.mean:.3f} ± {score.stderr:.3f} | {gap:.3f} | "
              f"{delta:.1f} | {recall:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
