"""Every method on one task: time and peak memory, side by side, in one run.

Task: MLP 784-128-64-10 (float32) trained with SGD (lr 0.01, momentum 0.9, batch 64) on 5,000
seeded MNIST training images; 500 seeded MNIST test images are attributed. Each method runs in
its own child process (so its peak resident memory is its own) on the same saved model, with
the same thread count. Methods whose cost is per test sample (IIF per-test, IF with conjugate
gradients) attribute the first ``--per-test`` test images and the table extrapolates their time
to all test images, marked as such.

Usage::

    python benchmarks/bench_methods.py [--threads 2] [--quick] [--only if-exact,trak]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0


def make_mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def recipe(epochs: int):
    from iif import Recipe

    return Recipe(lr=0.01, momentum=0.9, batch_size=64, epochs=epochs)


def load_task_data(n_train: int, n_test: int, mnist_dir: str | None):
    from iif_paper.data import load_mnist

    x, y = load_mnist("train", root=mnist_dir)
    order = np.random.default_rng(SEED).permutation(len(y))[:n_train]
    xt, yt = load_mnist("test", root=mnist_dir)
    torder = np.random.default_rng(SEED + 1).permutation(len(yt))[:n_test]
    return (x[order], y[order]), (xt[torder], yt[torder])


def save_data(work: Path, train, test) -> None:
    """The subsets as .npy files: children load only them, so their memory is their own."""
    for name, arr in (("x", train[0]), ("y", train[1]), ("xt", test[0]), ("yt", test[1])):
        np.save(work / f"{name}.npy", arr, allow_pickle=False)


def load_saved(work: Path):
    x, y, xt, yt = (np.load(work / f"{n}.npy", allow_pickle=False) for n in ("x", "y", "xt", "yt"))
    return (x, y), (xt, yt)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the methods -----------------------------------------------------------------------------
def build(name: str, task, train, workdir: Path, args: argparse.Namespace):
    import iif
    from iif import CurvatureSettings, PathSettings, ProjectionSettings

    common = {"progress": False, "seed": SEED}
    if name == "if-exact":
        return iif.InfluenceFunction(task, train, **common)
    if name == "if-projected":
        return iif.InfluenceFunction(task, train, solver="projected",
                                     projection=ProjectionSettings(dim=args.proj_dim), **common)
    if name == "if-cg":
        return iif.InfluenceFunction(task, train, solver="cg",
                                     curvature=CurvatureSettings(kind="ggn"),
                                     cg=iif.CGSettings(max_iter=args.cg_iters, tol=args.cg_tol),
                                     **common)
    if name == "tracin":
        from iif.methods.tracin.checkpoints import load_checkpoints

        return iif.TracIn(task, train, checkpoints=load_checkpoints(workdir / "checkpoints"),
                          projection=ProjectionSettings(dim=args.proj_dim), **common)
    if name == "trak":
        return iif.TRAK(task, train, projection=ProjectionSettings(dim=args.trak_dim), **common)
    if name == "iif-per-test":
        return iif.IntegratedInfluence(task, train, path=PathSettings(steps=args.steps),
                                       projection=ProjectionSettings(dim=args.proj_dim),
                                       **common)
    if name == "iif-shared":
        return iif.IntegratedInfluence(task, train, path=PathSettings(steps=args.steps),
                                       baseline=iif.BaselineSettings(mode="shared"),
                                       projection=ProjectionSettings(dim=args.proj_dim),
                                       **common)
    raise ValueError(f"unknown method {name!r}")


def describe(name: str, args: argparse.Namespace) -> str:
    return {
        "if-exact": "IF, Fisher, exact (Woodbury in N dims)",
        "if-projected": f"IF, Fisher, projected P={args.proj_dim}",
        "if-cg": f"IF, Gauss-Newton, CG (tol {args.cg_tol:g}, <= {args.cg_iters} it.)",
        "tracin": f"TracIn, {args.checkpoints} checkpoints, P={args.proj_dim}",
        "trak": f"TRAK, 1 model, P={args.trak_dim}",
        "iif-per-test": f"IIF per-test baseline, K={args.steps}, P={args.proj_dim}",
        "iif-shared": f"IIF shared baseline, K={args.steps}, P={args.proj_dim}",
    }[name]


PER_TEST = {"if-cg", "iif-per-test"}
ALL = ["if-exact", "if-projected", "if-cg", "tracin", "trak", "iif-per-test", "iif-shared"]


def child(name: str, workdir: str, args: argparse.Namespace, queue) -> None:
    try:
        torch.set_num_threads(args.threads)
        import iif

        work = Path(workdir)
        train, test = load_saved(work)
        model = make_mlp()
        model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
        task = iif.Task(model, "classification", recipe(args.train_epochs))
        n_test = min(args.per_test, len(test[1])) if name in PER_TEST else len(test[1])
        test = (test[0][:n_test], test[1][:n_test])
        rss_before = rss_mib()
        start = time.perf_counter()
        method = build(name, task, train, work, args)
        result = method.attribute(test)
        seconds = time.perf_counter() - start
        solver = result.info.get("solver") or {}
        queue.put({"name": name, "seconds": seconds, "n_test": n_test,
                   "rss_before_mib": rss_before, "peak_mib": peak_mib(),
                   "scores_shape": list(result.scores.shape),
                   "cg_iterations": solver.get("cg_iterations"),
                   "cg_residuals": solver.get("cg_residuals")})
    except Exception as exc:  # reported in the table, the other methods still run
        queue.put({"name": name, "error": f"{type(exc).__name__}: {exc}"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--mnist-dir", default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(ALL))
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--per-test", type=int, default=None,
                    help="test images timed for per-test methods (default 3)")
    ap.add_argument("--train-epochs", type=int, default=None)
    ap.add_argument("--checkpoints", type=int, default=5, help="TracIn checkpoints (epochs)")
    ap.add_argument("--steps", type=int, default=5, help="IIF path steps K")
    ap.add_argument("--proj-dim", type=int, default=256)
    ap.add_argument("--trak-dim", type=int, default=2048)
    ap.add_argument("--cg-iters", type=int, default=500)
    ap.add_argument("--cg-tol", type=float, default=1e-4)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    sizes = ({"n_train": 300, "n_test": 20, "per_test": 1, "train_epochs": 2} if args.quick
             else {"n_train": 5000, "n_test": 500, "per_test": 3, "train_epochs": 5})
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.checkpoints = min(args.checkpoints, args.train_epochs)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import iif
    from iif.methods.tracin.checkpoints import train_with_checkpoints

    names = ALL if args.only is None else args.only.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; MNIST {args.n_train} train / {args.n_test} test, "
          f"MLP 784-128-64-10", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, test = load_task_data(args.n_train, args.n_test, args.mnist_dir)
        save_data(work, train, test)
        model = make_mlp()
        task = iif.Task(model, "classification", recipe(args.train_epochs))
        every = max(1, args.train_epochs // args.checkpoints)
        start = time.perf_counter()
        train_with_checkpoints(task, train, every=every, seed=SEED,
                               directory=work / "checkpoints", progress=False)
        print(f"training with checkpoints every {every} epoch(s): "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        torch.save(model.state_dict(), work / "model.pt")
        ctx = mp.get_context("spawn")
        for name in names:
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(name, tmp, args, queue))
            proc.start()
            res = queue.get()
            proc.join()
            res["description"] = describe(name, args)
            results.append(res)
            if "error" in res:
                print(f"  {name}: FAILED {res['error']}", flush=True)
            else:
                cg = (f"; CG iterations {res['cg_iterations']}, relative residuals "
                      f"{[f'{r:.1e}' for r in res['cg_residuals']]}"
                      if res.get("cg_iterations") else "")
                print(f"  {name}: {res['seconds']:.1f} s for {res['n_test']} test images, "
                      f"peak {res['peak_mib']:.0f} MiB{cg}", flush=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=2))
    return {"args": vars(args), "results": results}


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n== {args.n_train} train / {args.n_test} test, {args.threads} threads ==")
    print(f"{'method':<48} {'timed tests':>11} {'seconds':>9} {'s / test':>9} "
          f"{f'all {args.n_test} tests':>14} {'peak MiB':>9} {'before':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['description']:<48} failed: {r['error']}")
            continue
        per = r["seconds"] / r["n_test"]
        total = per * args.n_test
        mark = "*" if r["n_test"] < args.n_test else " "
        print(f"{r['description']:<48} {r['n_test']:>11} {r['seconds']:>9.1f} {per:>9.3f} "
              f"{total:>13.0f}{mark} {r['peak_mib']:>9.0f} {r['rss_before_mib']:>7.0f}")
    print("* extrapolated from the timed test images (the method's cost is per test image)")
    print("peak MiB: the child process's peak resident memory, including the loaded data and "
          "torch ('before': resident memory before the method was built)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
