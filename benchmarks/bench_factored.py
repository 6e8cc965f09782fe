"""Micro-benchmark: one exact (unprojected) Integrated Influence path step, dense per-sample
gradients against layer factors (``iif.engine.factored``).

Dense, as ``IntegratedInfluence._copy_step`` does it without projection:
``features.step_features`` with an ``IdentityProjector`` (u, psi: N x M), ``loss_features``
(gamma), ``curvature.gram_solver`` (float64 N x N Gram, Woodbury Cholesky), the solve and the
score products. Factored: ``factored.factored_step_scores`` (layer inputs and output
gradients, N x N Gram from them, the same damping rule and Cholesky). Both on float32 MLPs
with random data and soft path targets; the scores are compared.

Usage::

    python benchmarks/bench_factored.py [--threads 2] [--n-test 1] [--repeat 3]
                                        [--skip-dense-large]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from iif.engine.curvature import CurvatureSettings, gram_solver
from iif.engine.factored import (
    FactoredFisher,
    factored_step_scores,
    grams,
    linear_factors,
    supports_factored,
)
from iif.engine.features import loss_features, step_features
from iif.engine.functional import FunctionalModel
from iif.engine.grads import path_step_fn, sample_loss_fn
from iif.engine.linalg import rows_times
from iif.engine.projection import IdentityProjector
from iif.task.task import Recipe, Task

CHUNK = 128
MAX_BYTES = 16 << 30  # the dense features of the large case (2 x 2.2 GB) exceed the default


def make_case(widths: list[int], n: int, n_test: int, seed: int = 0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    classes = widths[-1]
    x = torch.randn(n + n_test, widths[0])
    labels = torch.randint(0, classes, (n + n_test,))
    onehot = nn.functional.one_hot(labels, classes).float()
    ybar = torch.softmax(fmodel.outputs(state, x), -1)
    # sparse path targets (the true-class coordinate) at t_k = 0.6 and t_{k-1} = 0.4
    rho = onehot * (0.6 * onehot + 0.4 * ybar)
    prev = onehot * (0.4 * onehot + 0.6 * ybar)
    return (task, fmodel, state, x[:n], rho[:n], prev[:n], x[n:], onehot[n:])


def dense_step(case, settings):
    task, fmodel, state, x, rho, prev, xt, tt = case
    n = x.shape[0]
    projector = IdentityProjector(fmodel.num_params)
    times = {}
    t0 = time.perf_counter()
    u, psi = step_features(fmodel, state, x, rho, prev, task, projector, CHUNK, MAX_BYTES)
    gamma = loss_features(fmodel, state, xt, tt, task, projector, CHUNK, MAX_BYTES)
    t1 = time.perf_counter()
    solver = gram_solver(u, n, settings, "fisher")
    t2 = time.perf_counter()
    scores = -rows_times(psi, solver.solve(gamma.T)).T / n
    t3 = time.perf_counter()
    times.update(features=t1 - t0, gram_solver=t2 - t1, solve_scores=t3 - t2, total=t3 - t0)
    return scores, solver.damping, times


def factored_parts(case, settings):
    """The stages of ``factored_step_scores`` one by one, for the breakdown."""
    task, fmodel, state, x, rho, prev, xt, tt = case
    t0 = time.perf_counter()
    train = linear_factors(fmodel, state, x, path_step_fn(task), rho, prev, chunk_size=CHUNK)
    test = linear_factors(fmodel, state, xt, sample_loss_fn(task), tt, chunk_size=CHUNK)
    t1 = time.perf_counter()
    k = grams(train)[0]
    t2 = time.perf_counter()
    solver = FactoredFisher(fmodel, train, settings, gram=k).solver()
    t3 = time.perf_counter()
    solver.scores(test)
    t4 = time.perf_counter()
    return {"factors": t1 - t0, "gram": t2 - t1, "cholesky": t3 - t2, "scores": t4 - t3}


def factored_step(case, settings):
    task, fmodel, state, x, rho, prev, xt, tt = case
    t0 = time.perf_counter()
    scores, solver = factored_step_scores(fmodel, state, x, rho, prev, xt, tt, task, settings,
                                          chunk_size=CHUNK)
    return scores, solver.damping, time.perf_counter() - t0


def best(fn, repeat):
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r[-1]["total"] if isinstance(r[-1], dict) else r[-1])


def run(name, widths, n, args, dense: bool):
    case = make_case(widths, n, args.n_test)
    fmodel = case[1]
    assert supports_factored(fmodel, case[2], case[3])
    settings = CurvatureSettings()
    print(f"\n== {name}: MLP {'-'.join(map(str, widths))}, M = {fmodel.num_params}, N = {n}, "
          f"n_test = {args.n_test} (load average {os.getloadavg()[0]:.1f})")
    small = make_case(widths, 8, 1)  # warm-up (vmap and kernels)
    dense_step(small, settings)
    factored_step(small, settings)
    f_scores, f_damping, f_time = best(lambda: factored_step(case, settings), args.repeat)
    parts = factored_parts(case, settings)
    print(f"factored: {f_time:8.3f} s   (" + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
          + ")")
    if not dense:
        print("dense: skipped (--skip-dense-large)")
        return
    repeat = args.repeat if n <= 2000 else 1
    d_scores, d_damping, d_times = best(lambda: dense_step(case, settings), repeat)
    print(f"dense:    {d_times['total']:8.3f} s   (features {d_times['features']:.3f}, "
          f"gram_solver {d_times['gram_solver']:.3f}, solve+scores "
          f"{d_times['solve_scores']:.3f})")
    print(f"speed-up: {d_times['total'] / f_time:8.1f} x   (gram_solver alone vs factored "
          f"total: {d_times['gram_solver'] / f_time:.1f} x)")
    diff = float((f_scores - d_scores).abs().max())
    scale = float(d_scores.abs().max())
    print(f"scores: max |factored - dense| = {diff:.3g} (max |score| {scale:.3g}, relative "
          f"{diff / scale:.2g}); damping {f_damping:.6g} vs {d_damping:.6g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-dense-large", action="store_true",
                        help="skip the dense step of the N = 5000 case (minutes, ~9 GB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (other processes skew "
          f"the timings)")
    run("small", [64, 128, 64, 10], 1000, args, dense=True)
    run("mnist", [784, 128, 64, 10], 5000, args, dense=not args.skip_dense_large)


if __name__ == "__main__":
    main()
