"""What IIF's completeness says about its answers: the two loss changes of every test sample,
the gaps against them, which samples the trust rule flags, and (where the task has LDS ground
truth) whether the flagged answers rank training samples worse.

For each test sample, at the settings given (the defaults unless ``--sparse``/``--kind``/...):
Σ I (the scores' sum), ``delta`` = L(θ*) − L(θ′) (the unlearned baseline) and ``delta_path`` =
L(θ*) − L(θ₀) (the path's end), their gaps and the flags of ``iif.results.diagnostics``. With
``--lds`` the per-test LDS (R5, tuning half of ``quality_tasks``) is compared between the
samples each candidate rule would flag and the others, so that a rule is judged by whether it
singles out worse answers, on the tuning half only.

Usage::

    python benchmarks/bench_completeness.py --task digits [--tests 200] [--lds] [--threads 1]
        [--kind ggn --damping 1e-3 --ggn-rank none] [--dense]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

from iif import CurvatureSettings, IntegratedInfluence, PathSettings  # noqa: E402
from iif.evaluation.metrics import lds  # noqa: E402
from iif.results.diagnostics import GAP_THRESHOLD, KINDS, MOVE_THRESHOLD  # noqa: E402


def candidate_rules(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Boolean masks of the samples each rule would flag."""
    total, du, dp = c["sum"], c["delta"], c["delta_path"]
    ratio = total / du
    return {
        f"gap > {GAP_THRESHOLD} against delta": ~(c["gap"] <= GAP_THRESHOLD),
        "gap > 1 against delta": ~(c["gap"] <= 1.0),
        f"gap > {GAP_THRESHOLD} against delta_path": ~(c["gap_path"] <= GAP_THRESHOLD),
        "sum and delta of opposite signs": np.sign(total) * np.sign(du) < 0,
        "sum and delta_path of opposite signs": np.sign(total) * np.sign(dp) < 0,
        f"|delta| < {MOVE_THRESHOLD:g}": np.abs(du) < MOVE_THRESHOLD,
        f"|delta_path| < {MOVE_THRESHOLD:g}": np.abs(dp) < MOVE_THRESHOLD,
        "sum / delta < 0.01": ratio < 0.01,
        "sum / delta in [0.5, 2)": (ratio >= 0.5) & (ratio < 2),
    }


def report(c: dict[str, np.ndarray], flags: dict[str, list[int]],
           per_test: np.ndarray | None) -> None:
    n = len(c["sum"])
    print(f"\nmedians over {n} test samples: |sum| {np.median(np.abs(c['sum'])):.3g}, "
          f"|delta| {np.median(np.abs(c['delta'])):.3g}, |delta_path| "
          f"{np.nanmedian(np.abs(c['delta_path'])):.3g}; gap against delta "
          f"{np.nanmedian(c['gap']):.3g}, against delta_path {np.nanmedian(c['gap_path']):.3g}")
    warned = sorted({i for kind in KINDS if kind != "truncated" for i in flags.get(kind, [])})
    print("flags at these settings: " + ", ".join(f"{k} {len(flags.get(k, []))}" for k in KINDS)
          + f"; warned {len(warned)} of {n} ({100 * len(warned) / n:.1f} %)")
    header = f"  {'rule':<42} {'share':>7}"
    if per_test is not None:
        header += f" {'LDS flagged':>12} {'LDS others':>11}"
    print(header)
    valid = np.isfinite(per_test) if per_test is not None else None
    for name, mask in candidate_rules(c).items():
        line = f"  {name:<42} {100 * mask.mean():6.1f}%"
        if per_test is not None:
            inside, outside = per_test[mask & valid], per_test[~mask & valid]
            line += (f" {inside.mean() if inside.size else float('nan'):12.3f}"
                     f" {outside.mean() if outside.size else float('nan'):11.3f}")
        print(line)
    if per_test is not None:
        rho = spearmanr(per_test, np.log(np.abs(c["sum"] / c["delta"]) + 1e-12),
                        nan_policy="omit").statistic
        print(f"  Spearman of the per-test LDS with log |sum / delta|: {rho:.2f}")


def _rank(text: str) -> int | str | None:
    """``--ggn-rank``: an integer, "auto" or "none" (every direction)."""
    return None if text == "none" else text if text == "auto" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits", choices=sorted(qtasks.TASKS))
    ap.add_argument("--tests", type=int, default=200, help="first test samples (200)")
    ap.add_argument("--lds", action="store_true", help="per-test LDS on the tuning half "
                    "(builds or loads the task's ground truth)")
    ap.add_argument("--kind", default=None, help="curvature kind (default: the library's)")
    ap.add_argument("--damping", type=float, default=None,
                    help="absolute curvature damping (default: the ratio rule)")
    ap.add_argument("--ggn-rank", default="auto",
                    help="Gauss-Newton directions kept per sample: an integer, auto or none")
    ap.add_argument("--dense", action="store_true", help="dense path targets")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # the flags are printed below, once
    qt = qtasks.TASKS[args.task]()
    idx = np.arange(min(args.tests, qt.n_test()))
    options = {}
    if args.kind or args.damping is not None:
        options["curvature"] = CurvatureSettings(kind=args.kind or "fisher",
                                                 damping=args.damping,
                                                 ggn_rank=_rank(args.ggn_rank))
    if args.dense:
        options["path"] = PathSettings(sparse=False)
    start = time.perf_counter()
    result = IntegratedInfluence(qt.task, qt.train, progress=False, **options).attribute(
        qt.test_rows(idx))
    seconds = time.perf_counter() - start
    print(f"{args.task}: IIF {options or 'defaults'} on {idx.size} test samples, "
          f"{seconds:.1f} s ({seconds / idx.size:.2f} s per test), "
          f"{torch.get_num_threads()} thread(s)")
    c = {k: np.asarray(v, dtype=float) for k, v in result.completeness.items()}
    per_test = None
    if args.lds:
        gt = qtasks.truth(qt)
        rows = qtasks.halves(gt.subsets.shape[0])["tune"]
        per_test = lds(result.scores, gt.subsets[rows], gt.losses[rows][:, idx]).per_test
        print(f"LDS R5 on the tuning half: {np.nanmean(per_test):.3f}")
    report(c, result.info["flags"], per_test)
    return c


if __name__ == "__main__":
    main()
