"""Scaling with the training-set size N and the projection dimension P: time and peak memory.

N sweep: seeded MNIST subsets of N = 1,000, 5,000 and 20,000 training images, an MLP
784-128-64-10 trained 3 epochs on each (SGD lr 0.01, momentum 0.9, batch 64). On each model:

- IIF, per-test unlearning baselines, K = 5, Kronecker projection P = 256, timed on the first
  ``--per-test`` test images: seconds per test image (its cost is per test image);
- TRAK (``iif.TRAK``, one model, P = 2048, dense): seconds for ``--n-test`` test images,
  training features included (its cost is mostly the training set's);
- IF, projected (``iif.InfluenceFunction(solver="projected")``, Kronecker P = 256): the same.

P sweep, at N = 5,000: IIF with Kronecker projections of P = 64, 256, 1,024, 4,096 (the
budget is split evenly over the three layers, so the actual P is 60, 243, 988 and 3,314: the
last layer's 10 x 65 gradient caps its share; the actual P is recorded and plotted), and with
``--dense`` the dense projection up to P = 1,024.

Every measurement runs in its own child process (peak resident memory is its own, VmHWM) on
the saved model and data, with the same thread count, after an untimed warm-up run of the same
method on 64 training images and 1 test image (the peak is reset after it where Linux
allows). The figure (``--plot``, default ``docs/scaling.png``; a ``--quick`` run draws one
only when given ``--plot``) has two panels, against N and against P, with time on the left
axis (solid) and peak memory on the right (dashed), all axes logarithmic.

Usage::

    python benchmarks/bench_scaling.py [--threads 2] [--quick] [--dense] [--json PATH]
        [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_methods import load_saved, load_task_data, make_mlp, recipe, rss_mib, save_data
from bench_vs_dattri import peak_mib, reset_peak, spawn

from iif import Task
from iif.methods.base import AttributionMethod

SEED = 0
WARMUP_TRAIN = 64  # training samples of the untimed warm-up run in each child
ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "iif": "IIF per test image",
    "iif-dense": "IIF dense per test image",
    "trak": "TRAK",
    "if-projected": "IF projected",
}


def describe(spec: dict[str, Any]) -> str:
    p = f"P={spec['proj_dim']}"
    if spec["method"] in ("iif", "iif-dense"):
        return f"IIF per-test, K={spec['steps']}, {spec['structure']} {p}"
    if spec["method"] == "trak":
        return f"TRAK, 1 model, {spec['structure']} {p}"
    return f"IF projected, Fisher, {spec['structure']} {p}"


# ---- the child -------------------------------------------------------------------------------
def build(spec: dict[str, Any], task: Task, train: tuple[np.ndarray, np.ndarray]
          ) -> AttributionMethod:
    import iif
    from iif import PathSettings, ProjectionSettings

    projection = ProjectionSettings(dim=spec["proj_dim"], structure=spec["structure"])
    common = {"progress": False, "seed": SEED}
    if spec["method"] in ("iif", "iif-dense"):
        return iif.IntegratedInfluence(task, train, path=PathSettings(steps=spec["steps"]),
                                       projection=projection, **common)
    if spec["method"] == "trak":
        return iif.TRAK(task, train, projection=projection, **common)
    if spec["method"] == "if-projected":
        return iif.InfluenceFunction(task, train, solver="projected", projection=projection,
                                     **common)
    raise ValueError(f"unknown method {spec['method']!r}")


def child(spec: dict[str, Any], workdir: str, threads: int, queue: Any) -> None:
    try:
        torch.set_num_threads(threads)
        import iif

        work = Path(workdir)
        train, test = load_saved(work)
        test = (test[0][: spec["n_test"]], test[1][: spec["n_test"]])
        model = make_mlp()
        model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
        task = iif.Task(model, "classification", recipe(spec["epochs"]))
        # untimed warm-up on a small problem: a fresh process's one-off start-up work (about
        # 1 s for the first functorch call) would otherwise dominate small N
        build(spec, task, (train[0][:WARMUP_TRAIN], train[1][:WARMUP_TRAIN])).attribute(
            (test[0][:1], test[1][:1]))
        peak_reset = reset_peak()
        rss_before = rss_mib()
        start = time.perf_counter()
        method = build(spec, task, train)
        method.attribute(test)
        seconds = time.perf_counter() - start
        queue.put({**spec, "seconds": seconds, "s_per_test": seconds / spec["n_test"],
                   "dim": int(method.projector.dim), "rss_before_mib": rss_before,
                   "peak_reset": peak_reset,
                   "peak_mib": peak_mib()})
    except Exception as exc:  # reported, the other measurements still run
        queue.put({**spec, "error": f"{type(exc).__name__}: {exc}"})


# ---- the parent ------------------------------------------------------------------------------
def measure(spec: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    res = {**spec, **spawn(child, spec, str(workdir), args.threads)}
    res["description"] = describe(spec)
    if "error" in res:
        print(f"  N={spec['n_train']:>6} {res['description']:<40} FAILED {res['error']}",
              flush=True)
    else:
        print(f"  N={spec['n_train']:>6} {res['description']:<40} P={res['dim']:>5} "
              f"{res['seconds']:8.2f} s for {spec['n_test']:>3} test images "
              f"({res['s_per_test']:.3f} s each), peak {res['peak_mib']:.0f} MiB", flush=True)
    return res


def prepare(n_train: int, work: Path, args: argparse.Namespace) -> None:
    """Data subsets and the trained model of one N, saved for the children."""
    import iif

    work.mkdir(parents=True, exist_ok=True)
    train, test = load_task_data(n_train, args.n_test, args.mnist_dir)
    save_data(work, train, test)
    model = make_mlp()
    task = iif.Task(model, "classification", recipe(args.epochs))
    start = time.perf_counter()
    iif.train(task, train, seed=SEED, progress=False)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), work / "model.pt")
    with torch.no_grad():
        model.eval()
        acc = float((model(torch.from_numpy(test[0])).argmax(1)
                     == torch.from_numpy(test[1])).float().mean())
    print(f"N = {n_train}: trained {args.epochs} epochs in {seconds:.1f} s, accuracy on the "
          f"{args.n_test} test images {acc:.3f}", flush=True)


def specs_for_n(n_train: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"n_train": n_train, "steps": args.steps, "epochs": args.epochs}
    return [
        {**base, "sweep": "N", "method": "iif", "structure": "kronecker",
         "proj_dim": args.proj_dim, "n_test": args.per_test},
        {**base, "sweep": "N", "method": "trak", "structure": args.trak_structure,
         "proj_dim": args.trak_dim, "n_test": args.n_test},
        {**base, "sweep": "N", "method": "if-projected", "structure": "kronecker",
         "proj_dim": args.proj_dim, "n_test": args.n_test},
    ]


def specs_for_p(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"n_train": args.p_sweep_n, "steps": args.steps, "epochs": args.epochs,
            "sweep": "P"}
    out = [{**base, "method": "iif", "structure": "kronecker", "proj_dim": p,
            "n_test": args.per_test} for p in args.dims]
    if args.dense:
        out += [{**base, "method": "iif-dense", "structure": "dense", "proj_dim": p,
                 "n_test": args.dense_per_test} for p in args.dims if p <= args.dense_max]
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    order = list(LABELS)
    rows = sorted(rows, key=lambda r: (r["sweep"] != "N", order.index(r["method"]),
                                       r["n_train"], r["proj_dim"]))
    print(f"\n{'sweep':<6}{'method':<40}{'N':>7}{'P':>6}{'tests':>6}{'seconds':>10}"
          f"{'s / test':>10}{'peak MiB':>10}{'before':>8}")
    for r in rows:
        head = f"{r['sweep']:<6}{r['description']:<40}{r['n_train']:>7}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
            continue
        print(f"{head}{r['dim']:>6}{r['n_test']:>6}{r['seconds']:>10.2f}{r['s_per_test']:>10.3f}"
              f"{r['peak_mib']:>10.0f}{r['rss_before_mib']:>8.0f}")
    print("IIF: its time is per test image (timed on the few it attributed); TRAK and IF: the "
          "time for all their test images, training features included. P: the projector's "
          "actual dimension. peak MiB: the child's peak resident memory (VmHWM, reset after "
          "the warm-up), with torch "
          "and the data; before: its resident memory when the timed run began (after the "
          "warm-up).")
    for method in ("iif", "trak", "if-projected"):
        sweep = sorted((r for r in rows if r["sweep"] == "N" and r["method"] == method
                        and "error" not in r), key=lambda r: r["n_train"])
        if len(sweep) > 1:
            lo, hi = sweep[0], sweep[-1]
            print(f"{LABELS[method]}: N x{hi['n_train'] / lo['n_train']:.3g} -> time "
                  f"x{hi['s_per_test'] / lo['s_per_test']:.3g}, peak memory "
                  f"x{hi['peak_mib'] / lo['peak_mib']:.3g}")


def plot(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    colors = {"iif": "C0", "iif-dense": "C3", "trak": "C1", "if-projected": "C2"}
    panels = ((axes[0], "N", "n_train", "training images N"),
              (axes[1], "P", "dim", "projection dimension P (points at the actual P)"))
    for ax, sweep, key, xlabel in panels:
        mem = ax.twinx()
        xs: set[float] = set()
        for method in colors:
            pts = sorted((r for r in ok if r["sweep"] == sweep and r["method"] == method),
                         key=lambda r: r[key])
            if not pts:
                continue
            x = [r[key] for r in pts]
            xs.update(x)
            if method.startswith("iif"):
                label = f"{LABELS[method]} (s)"
                seconds = [r["s_per_test"] for r in pts]
            else:
                label = f"{LABELS[method]}, {pts[0]['n_test']} test images (s)"
                seconds = [r["seconds"] for r in pts]
            ax.plot(x, seconds, "-o", color=colors[method], label=label)
            mem.plot(x, [r["peak_mib"] for r in pts], "--s", color=colors[method],
                     alpha=0.7, label=f"{LABELS[method]}: peak MiB")
        for a in (ax, mem):
            a.set_xscale("log")
            a.set_yscale("log")
            a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            a.yaxis.set_major_formatter(plain)
            a.yaxis.set_minor_formatter(NullFormatter())
        # ticks at the requested sizes, not decades (a Kronecker P can sit just below its tick)
        ax.set_xticks(sorted(xs) if sweep == "N" else args.dims)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds (solid, circles)")
        mem.set_ylabel("peak resident MiB (dashed, squares)")
        lines = ax.get_legend_handles_labels()
        mem_lines = mem.get_legend_handles_labels()
        ax.legend(lines[0] + mem_lines[0], lines[1] + mem_lines[1], fontsize=7, ncol=2,
                  loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"MNIST MLP 784-128-64-10, IIF K={args.steps}, Kronecker P={args.proj_dim}"
                      f"; TRAK P={args.trak_dim}", fontsize=9)
    axes[1].set_title(f"IIF per test image, N = {args.p_sweep_n:,}", fontsize=9)
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    fig.suptitle(f"time and peak memory, {threads}, torch {torch.__version__}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--mnist-dir", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="the N sweep")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="the P sweep")
    ap.add_argument("--p-sweep-n", type=int, default=None, help="N of the P sweep")
    ap.add_argument("--dense", action="store_true", help="also dense IIF in the P sweep")
    ap.add_argument("--dense-max", type=int, default=1024, help="largest dense P")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per N")
    ap.add_argument("--n-test", type=int, default=None, help="test images for TRAK and IF")
    ap.add_argument("--per-test", type=int, default=None, help="test images timed for IIF")
    ap.add_argument("--dense-per-test", type=int, default=None,
                    help="test images timed for dense IIF")
    ap.add_argument("--steps", type=int, default=5, help="IIF path steps K")
    ap.add_argument("--proj-dim", type=int, default=None, help="P of IIF and IF, N sweep")
    ap.add_argument("--trak-dim", type=int, default=None)
    ap.add_argument("--trak-structure", choices=["dense", "kronecker"], default="dense")
    ap.add_argument("--skip-n", action="store_true", help="skip the N sweep")
    ap.add_argument("--skip-p", action="store_true", help="skip the P sweep")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--plot", default=None, metavar="PATH",
                    help="figure path (default docs/scaling.png; none for --quick)")
    args = ap.parse_args(argv)
    quick = {"sizes": [300, 1000], "dims": [16, 64], "p_sweep_n": 300, "epochs": 1,
             "n_test": 5, "per_test": 1, "dense_per_test": 1, "proj_dim": 64, "trak_dim": 256}
    full = {"sizes": [1000, 5000, 20000], "dims": [64, 256, 1024, 4096], "p_sweep_n": 5000,
            "epochs": 3, "n_test": 100, "per_test": 3, "dense_per_test": 1, "proj_dim": 256,
            "trak_dim": 2048}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None and not args.quick:
        args.plot = str(ROOT / "docs" / "scaling.png")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
    print(f"torch {machine['torch']}, {machine['threads']} threads, {machine['cpus']} CPUs, "
          f"load {machine['load_start']:.2f}; N sweep {args.sizes}, P sweep {args.dims} at "
          f"N = {args.p_sweep_n}", flush=True)
    rows: list[dict[str, Any]] = []
    needed = sorted(set(([] if args.skip_n else args.sizes)
                        + ([] if args.skip_p else [args.p_sweep_n])))
    with tempfile.TemporaryDirectory() as tmp:
        for n_train in needed:
            work = Path(tmp) / f"n{n_train}"
            prepare(n_train, work, args)
            if not args.skip_n and n_train in args.sizes:
                rows += [measure(spec, work, args) for spec in specs_for_n(n_train, args)]
            if not args.skip_p and n_train == args.p_sweep_n:
                rows += [measure(spec, work, args) for spec in specs_for_p(args)]
    machine["load_end"] = os.getloadavg()[0]
    print_table(rows)
    out = {"machine": machine, "args": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, Path(args.plot), args)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
