"""Engine benchmark: per-sample-gradient throughput and Integrated Influence cost on MNIST.

Part A measures the gradient engine on an MLP 784-128-64-10 (float32) over MNIST images:
``iif.engine.grads.per_sample_grads`` (one loss gradient per sample) and
``iif.engine.features.step_features`` (the IIF featurisation: two gradients per sample, u and psi,
from one shared forward, projected to P dimensions), split into its Jacobian and projection
parts. A hand-written per-sample gradient of the same MLP (einsum outer products) is timed as
a reference for what the materialised (n, M) output costs without ``vmap``.

Part B trains the MLP briefly on a seeded subset of the MNIST training split and times
Integrated Influence per test sample (per-test unlearning baselines, K path models, projected
empirical Fisher), with a per-stage breakdown taken by wrapping the engine's functions in this
process (the package itself is not changed).

FLOP convention: a forward pass costs 2 M FLOPs per sample and a backward pass 4 M (M
parameters), so one per-sample gradient counts 6 M; the IIF featurisation counts 2 M + 2 x 4 M
= 10 M for its two gradients, plus 2 M P per projected row.

Usage::

    python benchmarks/bench_engine.py [--threads 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import iif
import iif.engine.engine
import iif.engine.features
from iif import IntegratedInfluence, PathSettings, ProjectionSettings, Recipe, Task
from iif.engine.engine import Engine
from iif.engine.features import step_features
from iif.engine.functional import FunctionalModel
from iif.engine.grads import path_step_fn, per_sample_grads, per_sample_jacobians
from iif.engine.projection import RandomProjector, make_projector
from iif_paper.data import load_mnist

SEED = 0


# ---- small helpers ---------------------------------------------------------------------------
def make_mlp(seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "requested_threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                if k in os.environ},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def mnist_subset(
    split: str, n: int, root: str | None, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a seeded random permutation of an MNIST split."""
    x, y = load_mnist(split, root=root)
    order = np.random.default_rng(seed).permutation(len(y))[:n]
    return torch.from_numpy(x[order]), torch.from_numpy(y[order])


def manual_mlp_grads(params: dict[str, torch.Tensor], x: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """Per-sample soft-cross-entropy gradients of the 3-layer ReLU MLP by hand, (n, M)."""
    w1, b1 = params["0.weight"], params["0.bias"]
    w2, b2 = params["2.weight"], params["2.bias"]
    w3, b3 = params["4.weight"], params["4.bias"]
    z1 = x @ w1.T + b1
    a1 = z1.clamp_min(0)
    z2 = a1 @ w2.T + b2
    a2 = z2.clamp_min(0)
    z3 = a2 @ w3.T + b3
    d3 = torch.softmax(z3, -1) * t.sum(-1, keepdim=True) - t
    d2 = (d3 @ w3) * (z2 > 0)
    d1 = (d2 @ w2) * (z1 > 0)
    n = x.shape[0]
    out = torch.empty(n, sum(p.numel() for p in params.values()), dtype=x.dtype)
    pos = 0
    for d, a in ((d1, x), (d2, a1), (d3, a2)):
        rows, cols = d.shape[1], a.shape[1]
        torch.mul(d[:, :, None], a[:, None, :], out=out[:, pos : pos + rows * cols].view(
            n, rows, cols))
        pos += rows * cols
        out[:, pos : pos + rows] = d
        pos += rows
    return out


# ---- part A: gradient engine throughput ------------------------------------------------------
def bench_grads(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    b = _GradBench.make(x, y, args.proj_dim)
    ref = per_sample_grads(b.fmodel, b.state, b.data.x[:64], b.data.targets[:64], b.task,
                           chunk_size=64)
    manual = manual_mlp_grads(b.state.params, b.data.x[:64], b.data.targets[:64])
    max_err = float((ref - manual).abs().max() / ref.abs().max())
    print(f"  M = {b.m} parameters, n = {b.n} samples, P = {b.p}; hand-written gradients "
          f"agree with per_sample_grads to {max_err:.1e} (relative max)", flush=True)
    for chunk in args.chunks:
        _bench_grads_chunk(b, chunk, args.repeats)
    projection = _bench_projection(b, args.chunks[len(args.chunks) // 2], args.repeats)
    return {"num_params": b.m, "n": b.n, "proj_dim": b.p, "rows": b.rows,
            "projection": projection}


@dataclass
class _GradBench:
    """The MLP, its data and projectors for part A, and the rows measured so far."""

    task: Task
    data: Any
    fmodel: FunctionalModel
    state: Any
    projector: RandomProjector
    kron: Any
    kron_flops: float
    p: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def make(cls, x: torch.Tensor, y: torch.Tensor, p: int) -> _GradBench:
        model = make_mlp()
        task = Task(model, "classification")
        data = task.validate((x, y))
        fmodel = FunctionalModel(model)
        m = fmodel.num_params
        projector = RandomProjector(m, ProjectionSettings(dim=p))
        kron = make_projector(m, ProjectionSettings(dim=p, structure="kronecker"), "cpu",
                              torch.float32, fmodel)
        # per projected row: G A_in (out x cols x p_in) then A_out^T (out x p_in x p_out),
        # 2 FLOPs
        kron_flops = sum(2 * layer.out_features * (layer.in_features + 1) * layer.p_in
                         + 2 * layer.out_features * layer.p_in * layer.p_out
                         for layer in kron.layers)
        return cls(task, data, fmodel, fmodel.state(), projector, kron, kron_flops, p)

    @property
    def m(self) -> int:
        return self.fmodel.num_params

    @property
    def n(self) -> int:
        return self.data.x.shape[0]

    @property
    def rho(self) -> torch.Tensor:
        return self.data.targets

    @property
    def rho_prev(self) -> torch.Tensor:
        return 0.6 * self.data.targets  # any second target: same cost as a real path step

    def record(self, name: str, chunk: int, times: list[float], grad_flops: float,
               extra_flops: float = 0.0) -> None:
        n = self.n
        med = statistics.median(times)
        row = {
            "name": name, "chunk": chunk, "n": n, "seconds_median": med,
            "seconds_all": times, "samples_per_s": n / med,
            "grad_gflops": grad_flops * n / med / 1e9,
            "total_gflops": (grad_flops + extra_flops) * n / med / 1e9,
        }
        self.rows.append(row)
        print(f"  {name:<34} chunk {chunk:>4}  {med * 1e3:9.1f} ms  "
              f"{row['samples_per_s']:10.0f} samples/s  {row['grad_gflops']:7.2f} GFLOP/s"
              + (f"  ({row['total_gflops']:.2f} incl. projection)" if extra_flops else ""),
              flush=True)


def _bench_grads_chunk(b: _GradBench, chunk: int, repeats: int) -> None:
    """Part A's rows at one chunk size: gradients, step features (dense and Kronecker
    projection) and their Jacobian and projection parts."""
    fmodel, state, task, data, n, m, p = b.fmodel, b.state, b.task, b.data, b.n, b.m, b.p
    rho, rho_prev = b.rho, b.rho_prev
    step_fn = path_step_fn(task)

    def psg() -> None:
        per_sample_grads(fmodel, state, data.x, data.targets, task, chunk_size=chunk)

    def manual_run() -> None:
        for lo in range(0, n, chunk):
            manual_mlp_grads(state.params, data.x[lo : lo + chunk],
                             data.targets[lo : lo + chunk])

    def feats(projector: Any = b.projector) -> None:
        step_features(fmodel, state, data.x, rho, rho_prev, task, projector,
                      chunk_size=chunk, progress=False)

    def jac_only() -> None:
        for _ in per_sample_jacobians(fmodel, state, data.x, step_fn, rho, rho_prev,
                                      chunk_size=chunk):
            pass

    jac = torch.randn(min(chunk, n), 2, m)

    def proj_only(projector: Any = b.projector) -> None:
        for _ in range(0, n, chunk):
            projector.project(jac)

    b.record("per_sample_grads", chunk, timed(psg, repeats), 6 * m)
    b.record("hand-written MLP gradients (ref.)", chunk, timed(manual_run, repeats), 6 * m)
    b.record("step_features (u, psi -> P)", chunk, timed(feats, repeats), 10 * m,
             2 * 2 * m * p)
    b.record("  of which Jacobians (u, psi)", chunk, timed(jac_only, repeats), 10 * m)
    b.record("  of which projection", chunk, timed(proj_only, repeats), 0.0, 2 * 2 * m * p)
    b.record(f"step_features, kronecker P={b.kron.dim}", chunk,
             timed(lambda: feats(b.kron), repeats), 10 * m, 2 * b.kron_flops)
    b.record("kronecker project() of (n, 2, M) grads", chunk,
             timed(lambda: proj_only(b.kron), repeats), 0.0, 2 * b.kron_flops)


def _bench_projection(b: _GradBench, chunk: int, repeats: int) -> dict[str, Any]:
    """The dense projection's costs: regenerating its blocks, a matmul with a cached matrix
    for ``chunk`` samples, and one row (a test gradient) with and without the cache."""
    projector, m, n, p = b.projector, b.m, b.n, b.p

    def regen() -> None:
        for i in range(len(projector.blocks)):
            projector.block(i)

    regen_times = timed(regen, repeats)
    a_full = torch.cat([projector.block(i) for i in range(len(projector.blocks))])
    jac = torch.randn(min(chunk, n), 2, m)
    mm_times = timed(lambda: jac @ a_full, repeats)
    gamma = torch.randn(1, m)
    one_row = timed(lambda: projector.project(gamma), repeats)
    one_row_cached = timed(lambda: gamma @ a_full, repeats)
    projection = {
        "blocks": len(projector.blocks),
        "block_rows": projector.blocks[0][1] - projector.blocks[0][0],
        "matrix_mib": m * p * 4 / 2**20,
        "regenerate_all_blocks_s": statistics.median(regen_times),
        "matmul_cached_chunk": chunk,
        "matmul_cached_rows": jac.shape[0] * 2,
        "matmul_cached_s": statistics.median(mm_times),
        "project_one_row_s": statistics.median(one_row),
        "project_one_row_cached_s": statistics.median(one_row_cached),
    }
    print(f"  projection: A is {m} x {p} ({projection['matrix_mib']:.0f} MiB) in "
          f"{projection['blocks']} blocks of {projection['block_rows']} rows; regenerating all "
          f"blocks {projection['regenerate_all_blocks_s'] * 1e3:.0f} ms per project() call; "
          f"matmul with a cached A for chunk {chunk} ({projection['matmul_cached_rows']} rows) "
          f"{projection['matmul_cached_s'] * 1e3:.0f} ms; one row (test gradient) "
          f"{projection['project_one_row_s'] * 1e3:.0f} ms vs "
          f"{projection['project_one_row_cached_s'] * 1e3:.1f} ms cached", flush=True)
    return projection


# ---- part B: IIF per test sample -------------------------------------------------------------
class StageTimer:
    """Accumulates wall-clock seconds per stage through wrappers installed on the engine."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(key, time.perf_counter() - start)

        return wrapper

    def wrap_generator(self, key: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Iterator[Any]:
            it = fn(*a, **kw)
            while True:
                start = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self.add(key, time.perf_counter() - start)
                    return
                self.add(key, time.perf_counter() - start)
                yield item

        return wrapper


@contextlib.contextmanager
def instrumented(timer: StageTimer, method: IntegratedInfluence) -> Iterator[None]:
    """Wrap the stages IIF calls, restoring the originals afterwards."""
    patches = [
        (Engine, "unlearn", "unlearning", False),
        (iif.engine.engine, "path_models", "path epochs", True),
        (Engine, "step_features", "features u, psi", False),
        (Engine, "fit_curvature", "curvature", False),
        (Engine, "loss_features", "test gradients", False),
        (iif.engine.features, "per_sample_jacobians", "per-sample Jacobians", True),
        (method.projector, "project", "projection", False),
        (method.projector, "block", "block regeneration", False),
    ]
    saved = []
    for owner, name, key, is_gen in patches:
        if not hasattr(owner, name):  # e.g. a kronecker projector regenerates no blocks
            continue
        original = getattr(owner, name)
        saved.append((owner, name, original, name in vars(owner)))
        wrap = timer.wrap_generator if is_gen else timer.wrap
        setattr(owner, name, wrap(key, original))
    try:
        yield
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


OTHER_STAGE = "other (scores, deltas, checks)"
TOP_STAGES = ["unlearning", "path epochs", "features u, psi", "curvature", "test gradients"]
NESTED_STAGES = ["per-sample Jacobians", "projection", "block regeneration"]


def bench_iif(args: argparse.Namespace) -> dict[str, Any]:
    x, y = mnist_subset("train", args.n_train, args.mnist_dir)
    xt_all, yt_all = load_mnist("test", root=args.mnist_dir)
    xt_all, yt_all = torch.from_numpy(xt_all), torch.from_numpy(yt_all)
    test_order = np.random.default_rng(SEED + 1).permutation(len(yt_all))[: args.n_test]
    xt, yt = xt_all[test_order], yt_all[test_order]

    recipe = Recipe(lr=0.01, momentum=0.9, batch_size=64, epochs=args.train_epochs)
    model = make_mlp()
    task = Task(model, "classification", recipe=recipe)
    start = time.perf_counter()
    losses = iif.train(task, (x, y), seed=SEED, progress=False)
    train_s = time.perf_counter() - start
    train_steps = args.train_epochs * -(-len(y) // recipe.batch_size)
    with torch.no_grad():
        model.eval()
        train_acc = float((model(x).argmax(1) == y).float().mean())
        test_acc = float((model(xt_all).argmax(1) == yt_all).float().mean())
    print(f"  training: {len(y)} samples, {args.train_epochs} epochs SGD (lr 0.01, momentum 0.9, "
          f"batch 64) in {train_s:.2f} s ({1e3 * train_s / train_steps:.1f} ms/step); final "
          f"loss {losses[-1]:.4f}, train acc {train_acc:.4f}, test acc (10k) {test_acc:.4f}",
          flush=True)

    method = IntegratedInfluence(
        task, (x, y), path=PathSettings(steps=args.steps),
        projection=ProjectionSettings(dim=args.proj_dim, structure=args.structure),
        progress=False,
    )
    timer = StageTimer()
    per_test = []
    with instrumented(timer, method):
        for s in range(len(yt)):
            timer.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            attr = method.attribute((xt[s : s + 1], yt[s : s + 1]))
            total = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            stages = dict(timer.totals)
            top = sum(stages.get(k, 0.0) for k in TOP_STAGES)
            stages[OTHER_STAGE] = total - top
            per_test.append({
                "test_index": int(test_order[s]),
                "seconds": total,
                "cpu_seconds": cpu,
                "stages": stages,
                "calls": dict(timer.calls),
                "fallbacks": attr.info["fallbacks"],
                "completeness_gap": float(attr.completeness["gap"][0]),
                "max_rss_mib": max_rss_mib(),
            })
            print(f"  test sample {s} (index {int(test_order[s])}): {total:.1f} s "
                  f"(CPU/wall {cpu / total:.2f}), "
                  f"completeness gap {per_test[-1]['completeness_gap']:.3f}, "
                  f"fallback {bool(attr.info['fallbacks'])}", flush=True)
    seconds = [r["seconds"] for r in per_test]
    keys = [k for k in TOP_STAGES + [OTHER_STAGE] + NESTED_STAGES if k in per_test[0]["stages"]]
    mean_stages = {k: statistics.fmean(r["stages"].get(k, 0.0) for r in per_test) for k in keys}
    return {
        "n_train": len(y), "n_test": len(yt), "steps": args.steps, "proj_dim": args.proj_dim,
        "structure": args.structure,
        "chunk_size": method.chunk_size, "curvature": method.curvature.to_dict(),
        "baseline": method.baseline.to_dict(),
        "train_seconds": train_s, "train_epochs": args.train_epochs,
        "train_ms_per_step": 1e3 * train_s / train_steps,
        "train_losses": losses, "train_acc": train_acc, "test_acc": test_acc,
        "seconds_per_test_median": statistics.median(seconds),
        "seconds_per_test_mean": statistics.fmean(seconds),
        "cpu_over_wall": sum(r["cpu_seconds"] for r in per_test) / sum(seconds),
        "stages_mean": mean_stages, "per_test": per_test,
    }


# ---- report ----------------------------------------------------------------------------------
def print_summary(res: dict[str, Any]) -> None:
    info = res["machine"]
    print("\n== summary ==")
    print(f"{info['date_utc']} UTC | {info['cpu_model']} | {info['logical_cpus']} CPUs | torch "
          f"{info['torch']} | threads {info['torch_threads']} | load "
          f"{info['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}")
    if "grads" in res:
        g = res["grads"]
        print(f"\nA. gradient engine, MLP 784-128-64-10 (M = {g['num_params']}), "
              f"n = {g['n']}, P = {g['proj_dim']}")
        print(f"{'path':<36}{'chunk':>6}{'ms':>10}{'samples/s':>12}{'GFLOP/s':>10}")
        for r in g["rows"]:
            gf = r["grad_gflops"] if r["grad_gflops"] else r["total_gflops"]
            print(f"{r['name']:<36}{r['chunk']:>6}{r['seconds_median'] * 1e3:>10.1f}"
                  f"{r['samples_per_s']:>12.0f}{gf:>10.2f}")
    if "iif" in res:
        b = res["iif"]
        print(f"\nB. IIF, N = {b['n_train']}, K = {b['steps']}, P = {b['proj_dim']} "
              f"({b['structure']}), "
              f"chunk {b['chunk_size']}, {b['n_test']} test samples; training "
              f"{b['train_seconds']:.2f} s (test acc {b['test_acc']:.4f})")
        print(f"seconds per test sample: median {b['seconds_per_test_median']:.2f}, "
              f"mean {b['seconds_per_test_mean']:.2f} (process CPU / wall "
              f"{b['cpu_over_wall']:.2f})")
        total = b["seconds_per_test_mean"]
        for k, v in b["stages_mean"].items():
            nested = k in NESTED_STAGES
            label = ("  (nested) " if nested else "") + k
            print(f"  {label:<40}{v:>9.2f} s{100 * v / total:>7.1f} %")
    print(f"\npeak RSS {res['max_rss_mib']:.0f} MiB (ru_maxrss); "
          f"RSS at start {res['rss_start_mib']:.0f} MiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--mnist-dir", default=None, help="folder with the MNIST IDX .gz files")
    ap.add_argument("--json", default=None, metavar="PATH", help="write all results here")
    ap.add_argument("--n-grad", type=int, default=None, help="samples for part A")
    ap.add_argument("--chunks", type=int, nargs="+", default=None, help="chunk sizes, part A")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, part A")
    ap.add_argument("--n-train", type=int, default=None, help="training samples, part B")
    ap.add_argument("--n-test", type=int, default=None, help="test samples timed, part B")
    ap.add_argument("--train-epochs", type=int, default=None, help="training epochs, part B")
    ap.add_argument("--steps", type=int, default=5, help="K path steps (default 5)")
    ap.add_argument("--proj-dim", type=int, default=256, help="projection dim P (default 256)")
    ap.add_argument("--structure", default="dense", choices=["dense", "kronecker"],
                    help="projection structure of part B (default dense)")
    ap.add_argument("--skip-grads", action="store_true", help="skip part A")
    ap.add_argument("--skip-iif", action="store_true", help="skip part B")
    args = ap.parse_args(argv)
    quick = {"n_grad": 128, "chunks": [64], "repeats": 1, "n_train": 256, "n_test": 1,
             "train_epochs": 2}
    full = {"n_grad": 512, "chunks": [64, 128, 256], "repeats": 3, "n_train": 5000,
            "n_test": 3, "train_epochs": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rss_start = rss_mib()
    res: dict[str, Any] = {"machine": machine_info(args.threads),
                           "args": {k: v for k, v in vars(args).items()},
                           "rss_start_mib": rss_start}
    info = res["machine"]
    print(f"torch {info['torch']}, threads {torch.get_num_threads()} (interop "
          f"{info['torch_interop_threads']}), {info['cpu_model']}, {info['logical_cpus']} CPUs, "
          f"load {info['loadavg_start'][0]:.2f}", flush=True)
    if not args.skip_grads:
        print("A. per-sample gradient throughput", flush=True)
        x, y = mnist_subset("train", args.n_grad, args.mnist_dir)
        start = time.perf_counter()
        res["grads"] = bench_grads(args, x, y)
        res["grads"]["wall_seconds"] = time.perf_counter() - start
        res["grads"]["max_rss_mib"] = max_rss_mib()
    if not args.skip_iif:
        print("B. IIF time per test sample", flush=True)
        res["loadavg_before_iif"] = list(os.getloadavg())
        start = time.perf_counter()
        res["iif"] = bench_iif(args)
        res["iif"]["wall_seconds"] = time.perf_counter() - start
    res["loadavg_end"] = list(os.getloadavg())
    res["max_rss_mib"] = max_rss_mib()
    print_summary(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
