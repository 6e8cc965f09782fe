"""A linearized Integrated Influence: baseline and path as damped Newton steps, measured.

With the path models replaced by Newton steps from theta* and the features taken at theta*
(the linearization), the first step's identity (``IntegratedInfluence._star_weights``) holds
at every step: on a sparse path with one-hot labels, psi_i^(k) = (1/K)(1 - ybar_{i,y_i}) u*_i,
so the K steps add up to the influence function reweighted per training sample,

    I_lin(i) = (1 - ybar_{i,y_i}) * IF(i),

whatever K and the path models are. Only the baseline remains: ``ybar_i = f(x_i; theta')``
with theta' a damped Newton step that unlearns the test sample (the default bounded
objective, ``-log(1 - p_y)``), ``theta' = theta* - alpha F^{-1} grad`` with F the damped
empirical Fisher of the influence function (the default damping rule). Its cost is the
influence function's plus one forward pass over the training set per test sample.

Rows (tuning half; LDS R1 and R5): the influence function; the reweighting by
``1 - p_{i,y_i}(theta*)`` (alpha = 0); the Newton baseline at several step sizes and at the
step whose test loss reaches chance (log C); and IIF with the trained baseline but every
feature at theta* (``PathSettings(steps=1, epochs=0)``).

Usage::

    python benchmarks/bench_linearized.py --task digits --tests 200 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

from iif import CurvatureSettings, InfluenceFunction, IntegratedInfluence, PathSettings  # noqa: E402
from iif.engine.curvature import default_damping, rank_bound  # noqa: E402
from iif.engine.functional import module_mode  # noqa: E402
from iif.methods.integrated.baseline import complement_loss  # noqa: E402


class Newton:
    """theta* moved along ``-F^{-1} grad(-log(1 - p_y))`` of one test sample, F the damped
    empirical Fisher ``G^T G / N + delta I`` (Woodbury in the N training samples, float64)."""

    def __init__(self, engine):
        self.engine, self.state = engine, engine.state
        g = engine.per_sample_grads(engine.state, engine.train.x, engine.train.targets)
        self.g = g.double()
        n, m = self.g.shape
        # the influence function's default damping rule on this Fisher's trace
        trace = float((self.g * self.g).sum()) / n
        self.delta = default_damping(CurvatureSettings(), trace, rank_bound(n, m, m))
        kernel = self.g @ self.g.T + n * self.delta * torch.eye(n, dtype=self.g.dtype)
        self.chol = torch.linalg.cholesky(kernel)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        w = torch.cholesky_solve(self.g @ v, self.chol)
        return (v - self.g.T @ w) / self.delta

    def _outputs(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fm, state = self.engine.fmodel, self.state
        moved = fm.unflatten(delta.to(torch.float32))
        params = {k: state.params[k] + moved[k] for k in state.params}
        with torch.no_grad(), module_mode(fm.module, False):
            return fm(params, state.buffers, x)

    def direction(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fm, state = self.engine.fmodel, self.state
        zero = torch.zeros(fm.num_params)

        def loss(delta: torch.Tensor) -> torch.Tensor:
            moved = fm.unflatten(delta)
            params = {k: state.params[k] + moved[k] for k in state.params}
            return complement_loss(fm(params, state.buffers, x[None]), target[None]).sum()

        with module_mode(fm.module, False):
            grad = torch.func.grad(loss)(zero)
        return -self.solve(grad.double()[:, None])[:, 0]

    def test_loss(self, delta: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> float:
        out = self._outputs(delta, x[None])
        return float(-(torch.log_softmax(out, -1) * target[None]).sum())

    def kept(self, delta: torch.Tensor) -> torch.Tensor:
        """ybar_{i,y_i} of every training sample at theta* + delta."""
        out = self._outputs(delta, self.engine.train.x)
        return (torch.softmax(out, -1) * self.engine.train.targets).sum(-1).double()


def chance_step(newton: Newton, direction: torch.Tensor, x, target, level: float) -> float:
    """The step size along ``direction`` at which the test loss first reaches ``level``."""
    lo, hi = 0.0, 1.0
    while newton.test_loss(hi * direction, x, target) < level and hi < 1e6:
        hi *= 2.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if newton.test_loss(mid * direction, x, target) < level else (lo, mid)
    return hi


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("digits", "mnist"), default="digits")
    p.add_argument("--tests", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--half", choices=("tune", "report"), default="tune")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    qt = qtasks.TASKS[args.task]()
    gt = qtasks.truth(qt)
    idx = np.arange(min(args.tests, qt.n_test()))
    sub = qtasks.subset_truth(gt, idx)
    print(f"task {qt.name}: {idx.size} test samples, half {args.half}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = []

    def row(name: str, scores: np.ndarray, seconds: float) -> None:
        r = qtasks.lds_scores(sub, scores, args.half)
        rows.append((name, r, seconds))
        print(f"{name}: R1 {r['r1']:.3f}  R5 {r['r5']:.3f}  ({seconds:.1f} s)", flush=True)

    start = time.perf_counter()
    method = InfluenceFunction(qt.task, qt.train, progress=False)
    influence = method.attribute(qt.test_rows(idx)).scores
    row("IF, defaults", influence, time.perf_counter() - start)

    start = time.perf_counter()
    newton = Newton(method.engine)
    test = method.validate_test(qt.test_rows(idx))
    directions = [newton.direction(test.x[j], test.targets[j]) for j in range(idx.size)]
    setup = time.perf_counter() - start
    level = math.log(test.targets.shape[1])
    for alpha in (0.0, 0.001, 0.01, 0.1, 1.0, "chance"):
        start = time.perf_counter()
        weights = []
        for j, d in enumerate(directions):
            a = chance_step(newton, d, test.x[j], test.targets[j], level) \
                if alpha == "chance" else alpha
            weights.append(1.0 - newton.kept(a * d))
        w = torch.stack(weights).numpy()
        row(f"linearized IIF, Newton step {alpha}", influence * w,
            setup + time.perf_counter() - start)

    start = time.perf_counter()
    at_star = IntegratedInfluence(qt.task, qt.train, path=PathSettings(steps=1, epochs=0),
                                  progress=False).attribute(qt.test_rows(idx)).scores
    row("IIF, trained baseline, features at theta*", at_star, time.perf_counter() - start)

    print(f"\n| configuration | LDS R1 ({args.half}) | LDS R5 ({args.half}) | seconds |")
    print("|---|---:|---:|---:|")
    for name, r, seconds in rows:
        print(f"| {name} | {r['r1']:.3f} ± {r['r1_se']:.3f} | {r['r5']:.3f} ± {r['r5_se']:.3f} "
              f"| {seconds:.1f} |")


if __name__ == "__main__":
    main()
