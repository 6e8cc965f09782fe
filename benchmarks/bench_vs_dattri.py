"""IIF against dattri 0.3.0's TRAK-10, IF-CG and TracIn on the same models: time and peak memory.

Two data settings, run one after the other (``--data`` picks one):

- ``digits``: scikit-learn's 8x8 digits, 1,000 train / 200 test, MLP 64-128-64-10 trained 20
  epochs;
- ``mnist``: seeded MNIST subsets, 5,000 train / 500 test, MLP 784-128-64-10 trained 5 epochs;

both with SGD (lr 0.01, momentum 0.9, batch 64) and checkpoints every fifth of training. Model 0
(the checkpointed run) is the model every method attributes; TRAK-10 adds models 1-9, trained
with the same recipe from their own seeds (``iif.train_ensemble``), and TracIn takes the 5
checkpoints of model 0's run.

Rows: IIF (per-test unlearning baselines, K = 5, Kronecker projection P = 256; with ``--dense``
also the dense projection), dattri's ``TRAKAttributor`` over the 10 models, ``IFAttributorCG``
and ``TracInAttributor``. Each runs in its own child process on the same saved models and data,
with the same thread count, so that its peak resident memory is its own; timings include
building any cache, after an untimed warm-up run of the same method on 64 training samples
and 1 test sample (a fresh process's one-off start-up work is nobody's per-method cost).
Methods whose cost is per test sample (IIF, dattri's IF-CG) attribute the first
``--per-test`` test samples (digits: all 200, MNIST: 32, one full stacked batch of IIF's
default ``test_batch="auto"``, where the installed iif has that setting) and their time is
extrapolated to all test samples (marked *). ``dattri / iif`` divides each row's time for all
test samples by IIF's (Kronecker) one; the last line gives the target ratio, dattri TRAK-10
over IIF (>= 1: IIF is no slower).

dattri's settings: P = 512 (its default) for TRAK and TracIn, TRAK damping 0.01 (on iif's
scale: dattri gets 0.01 / M, see ``prepare``), CG with 10 iterations (dattri runs all of them:
it ignores ``tol``) and damping 1.0. Loaders: TRAK and TracIn 500 training samples per batch
and all test samples in one batch; IF-CG caches the whole training set as one batch (its
Hessian) and attributes 1,000 training by 5 test samples per batch, re-running the CG solve
for every such pair.

Needs the optional benchmark extra: ``pip install -e .[bench]`` (dattri 0.3.0).

Usage::

    python benchmarks/bench_vs_dattri.py [--threads 2] [--data digits|mnist] [--quick] [--dense]
        [--per-test N] [--test-batch B|auto] [--only iif,dattri-trak] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_methods import load_saved, load_task_data, recipe, rss_mib, save_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 0
TRAK_MODELS = 10
CHECKPOINTS = 5
WARMUP_TRAIN = 64  # training samples of the untimed warm-up run in each child

Split = tuple[np.ndarray, np.ndarray]  # (inputs, labels)


@dataclass(frozen=True)
class Setting:
    """One data setting: sizes, model input width and training length."""

    name: str
    n_train: int
    n_test: int
    in_dim: int
    epochs: int
    per_test: int  # test samples timed for per-test methods
    dense_per_test: int  # the same for IIF with the dense projection

    @property
    def every(self) -> int:
        return max(1, self.epochs // CHECKPOINTS)


SETTINGS = {
    "digits": Setting("digits", 1000, 200, 64, epochs=20, per_test=200, dense_per_test=20),
    "mnist": Setting("mnist", 5000, 500, 784, epochs=5, per_test=32, dense_per_test=3),
}
QUICK = {
    "digits": {"n_train": 200, "n_test": 10, "epochs": 5, "per_test": 2, "dense_per_test": 1},
    "mnist": {"n_train": 300, "n_test": 10, "epochs": 5, "per_test": 2, "dense_per_test": 1},
}

ALL = ["iif", "iif-dense", "dattri-trak", "dattri-if-cg", "dattri-tracin"]


def peak_mib() -> float:
    """Peak resident memory of this process in MiB, from its own address space (VmHWM).

    Not ``ru_maxrss``: a spawned child starts with its parent's peak there (Linux carries the
    pre-exec peak over ``exec``), so a child of a parent that held 1 GiB reports >= 1 GiB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Set this process's peak resident memory (VmHWM) to its current resident memory, so
    that a warm-up run does not count (Linux >= 4.0; False where not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_mlp(in_dim: int, seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def load_data(setting: Setting, mnist_dir: str | None) -> tuple[Split, Split]:
    if setting.name == "digits":
        from iif_paper.data import load_digits

        return load_digits(n_train=setting.n_train, n_test=setting.n_test, seed=SEED)
    return load_task_data(setting.n_train, setting.n_test, mnist_dir)


def test_batch_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if int(value) < 1:
        raise argparse.ArgumentTypeError("--test-batch must be >= 1 or 'auto'")
    return int(value)


def accepts_test_batch() -> bool:
    import iif

    return "test_batch" in inspect.signature(iif.IntegratedInfluence).parameters


# ---- dattri's side ---------------------------------------------------------------------------
class DattriFunctions:
    """The functions dattri's tasks call, in ``torch.func`` style with a parameter dict.

    TRAK's estimator needs the margin as the function of *both* its training features (dattri
    takes them from ``loss_func``) and its test features (``target_func``), as bench_dattri.py
    found; IF and TracIn take the loss.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # per-sample calls (vmap over a batch) get one sample without its batch dimension
        out = torch.func.functional_call(self.model, params, x.unsqueeze(0) if x.ndim == 1
                                         else x)
        return out.reshape(-1, out.shape[-1])

    def loss(self, params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]
             ) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self._logits(params, x), y.view(-1))

    def margin(self, params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]
               ) -> torch.Tensor:
        x, y = batch
        out = self._logits(params, x)
        y = y.view(-1)
        own = out.gather(1, y[:, None])[:, 0]
        others = out.masked_fill(torch.arange(out.shape[-1]) == y[:, None], -torch.inf)
        return (own - torch.logsumexp(others, -1)).sum()

    def correct_probability(self, params: dict[str, torch.Tensor],
                            batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        out = torch.func.functional_call(self.model, params, x.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(out, y.unsqueeze(0)))


def loader(x: np.ndarray, y: np.ndarray, batch: int) -> DataLoader:
    # dattri writes scores by batch position: the order must be fixed
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                      batch_size=batch, shuffle=False)


def checkpoint_dicts(work: Path) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """TracIn's checkpoints as flat state dicts (what dattri loads) and their learning rates."""
    from iif.methods.tracin.checkpoints import load_checkpoints

    ckpts = load_checkpoints(work / "checkpoints")
    states = []
    for c in ckpts:
        raw = torch.load(c.path, weights_only=True)
        states.append({**raw["params"], **raw["buffers"]})
    return states, [c.lr for c in ckpts]


# ---- the child -------------------------------------------------------------------------------
def prepare(name: str, model: nn.Module, work: Path, train: Split, test: Split,
            args: argparse.Namespace, info: dict[str, Any]) -> Callable[[], np.ndarray]:
    """Everything up to the timed call (imports, files); the callable returns (n_test, N)
    scores in dattri's or iif's own orientation, and notes what it used in ``info``."""
    if name in ("iif", "iif-dense"):
        import iif
        from iif import PathSettings, ProjectionSettings

        task = iif.Task(model, "classification", recipe(args.setting.epochs))
        structure = "kronecker" if name == "iif" else "dense"
        extra = ({"test_batch": args.test_batch}
                 if args.test_batch is not None and accepts_test_batch() else {})

        def run_iif() -> np.ndarray:
            method = iif.IntegratedInfluence(
                task, train, path=PathSettings(steps=args.steps),
                projection=ProjectionSettings(dim=args.proj_dim, structure=structure),
                progress=False, **extra)
            result = method.attribute(test)
            info["test_batch"] = result.settings.get("test_batch", "not a setting")
            info["fallbacks"] = result.info.get("fallbacks")
            return result.scores

        return run_iif

    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    fns = DattriFunctions(model)
    num_params = sum(p.numel() for p in model.parameters())
    train_loader = loader(*train, args.dattri_batch)
    # one batch: TracIn recomputes the test gradients for every training batch
    test_loader = loader(*test, len(test[1]))
    if name == "dattri-trak":
        models = [torch.load(work / "ensemble" / f"model_{k}.pt", weights_only=True)
                  for k in range(args.trak_models)]
        dattri_task = AttributionTask(loss_func=fns.margin, model=model, checkpoints=models,
                                      target_func=fns.margin)

        def run_trak() -> np.ndarray:
            attributor = TRAKAttributor(
                task=dattri_task, correct_probability_func=fns.correct_probability,
                projector_kwargs={"proj_dim": args.trak_dim, "device": "cpu"}, device="cpu",
                # dattri divides gradients by sqrt(M) first: the same damping on its scale is
                # damping / M
                regularization=args.damping / num_params)
            attributor.cache(train_loader)
            return attributor.attribute(test_loader).detach().numpy().T

        return run_trak
    if name == "dattri-if-cg":
        final = torch.load(work / "model.pt", weights_only=True)
        dattri_task = AttributionTask(loss_func=fns.loss, model=model, checkpoints=final)
        # the CG solve sums one inverse-Hessian product per batch of the cached loader: the
        # whole training set in one batch makes it the mean-loss Hessian's
        full_loader = loader(*train, len(train[1]))
        # the solve is re-run for every pair of training and test batches: large training
        # batches cut the repeats (each holds its per-sample gradients); the CG is vmapped
        # over a test batch, whose memory grows with it (about 0.3 GiB per MNIST test sample)
        cg_train_loader = loader(*train, args.cg_train_batch)
        cg_test_loader = loader(*test, args.cg_test_batch)

        def run_if_cg() -> np.ndarray:
            attributor = IFAttributorCG(task=dattri_task, device="cpu", max_iter=args.cg_iters,
                                        regularization=args.cg_damping)
            attributor.cache(full_loader)
            return attributor.attribute(cg_train_loader, cg_test_loader).detach().numpy().T

        return run_if_cg
    if name == "dattri-tracin":
        states, lrs = checkpoint_dicts(work)
        dattri_task = AttributionTask(loss_func=fns.loss, model=model, checkpoints=states)

        def run_tracin() -> np.ndarray:
            attributor = TracInAttributor(
                task=dattri_task, weight_list=torch.tensor(lrs), normalized_grad=False,
                projector_kwargs={"proj_dim": args.tracin_dim, "device": "cpu"}, device="cpu")
            return attributor.attribute(train_loader, test_loader).detach().numpy().T

        return run_tracin
    raise ValueError(f"unknown method {name!r}")


def timed_tests(name: str, args: argparse.Namespace) -> int:
    """How many test samples the method attributes (the first ones)."""
    s = args.setting
    if name == "iif-dense":
        return min(s.dense_per_test, s.n_test)
    if name in ("iif", "dattri-if-cg") or (name == "dattri-tracin" and args.tracin_per_test):
        return min(s.per_test, s.n_test)
    return s.n_test


def child(name: str, workdir: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        rss_start = rss_mib()  # torch imported, nothing loaded
        torch.set_num_threads(args.threads)
        work = Path(workdir)
        train, test = load_saved(work)
        n_test = timed_tests(name, args)
        test = (test[0][:n_test], test[1][:n_test])
        model = make_mlp(args.setting.in_dim)
        model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
        # untimed warm-up on a small problem: torch's one-off start-up work in a fresh process
        # (about 1 s for the first functorch call) is not the method's cost
        small = WARMUP_TRAIN
        prepare(name, model, work, (train[0][:small], train[1][:small]),
                (test[0][:1], test[1][:1]), args, {})()
        info: dict[str, Any] = {}
        run = prepare(name, model, work, train, test, args, info)
        info["peak_reset"] = reset_peak()
        rss_before = rss_mib()
        start = time.perf_counter()
        scores = run()
        seconds = time.perf_counter() - start
        np.save(work / f"scores_{name}.npy", np.asarray(scores, dtype=np.float64))
        queue.put({"name": name, "seconds": seconds, "n_test": n_test,
                   "rss_start_mib": rss_start, "rss_before_mib": rss_before,
                   "peak_mib": peak_mib(), **info,
                   "scores_shape": list(np.shape(scores))})
    except Exception as exc:  # reported in the table, the other methods still run
        queue.put({"name": name, "error": f"{type(exc).__name__}: {exc}"})


# ---- the parent ------------------------------------------------------------------------------
def spawn(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a fresh process and return what it put on the queue,
    or an error when the process died without answering (e.g. killed when out of memory)."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    channel = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, channel))
    proc.start()
    while True:
        try:
            res = channel.get(timeout=5)
            break
        except queue_mod.Empty:
            if proc.is_alive():
                continue
            try:  # a result sent just before the exit may still be in the pipe
                res = channel.get(timeout=1)
            except queue_mod.Empty:
                res = {"error": f"the child process exited with code {proc.exitcode} "
                                f"without a result (a negative code is a signal: -9 is "
                                f"usually the out-of-memory killer)"}
            break
    proc.join()
    return res


def describe(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """The table's method and settings columns."""
    return {
        "iif": ("IIF", f"per-test, K={args.steps}, Kronecker P={args.proj_dim}"),
        "iif-dense": ("IIF", f"per-test, K={args.steps}, dense P={args.proj_dim}"),
        "dattri-trak": (f"dattri TRAK-{args.trak_models}",
                        f"{args.trak_models} models, P={args.trak_dim}, damping {args.damping:g}"),
        "dattri-if-cg": ("dattri IF-CG",
                         f"Hessian, {args.cg_iters} it., damping {args.cg_damping:g}"),
        "dattri-tracin": ("dattri TracIn", f"{CHECKPOINTS} checkpoints, P={args.tracin_dim}"),
    }[name]


def agreement(reference: np.ndarray, scores: np.ndarray, flip: bool) -> float:
    """Mean Spearman correlation over the test samples both have; dattri's scores are negated
    to iif's sign (positive = raises the test loss)."""
    from iif.evaluation import spearman_columns

    n = min(len(reference), len(scores))
    theirs = -scores[:n] if flip else scores[:n]
    return float(np.nanmean(spearman_columns(reference[:n].T, theirs.T)))


def prepare_models(setting: Setting, work: Path, args: argparse.Namespace) -> float:
    """Train model 0 with checkpoints and models 1.. for TRAK; returns the seconds taken."""
    import iif
    from iif.methods.tracin.checkpoints import train_with_checkpoints

    train, test = load_data(setting, args.mnist_dir)
    save_data(work, train, test)
    model = make_mlp(setting.in_dim)
    task = iif.Task(model, "classification", recipe(setting.epochs))
    start = time.perf_counter()
    train_with_checkpoints(task, train, every=setting.every, seed=SEED,
                           directory=work / "checkpoints", progress=False)
    torch.save(model.state_dict(), work / "model.pt")
    (work / "ensemble").mkdir()
    torch.save(model.state_dict(), work / "ensemble" / "model_0.pt")
    if args.trak_models > 1:
        others = iif.train_ensemble(task, train, args.trak_models - 1, seed=SEED + 1,
                                    progress=False)
        for k, member in enumerate(others, start=1):
            torch.save(member.state_dict(), work / "ensemble" / f"model_{k}.pt")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model.eval()
        acc = float((model(torch.from_numpy(test[0])).argmax(1)
                     == torch.from_numpy(test[1])).float().mean())
    print(f"training: model 0 with {CHECKPOINTS} checkpoints and {args.trak_models - 1} more "
          f"models in {seconds:.1f} s; model 0 test accuracy {acc:.3f}", flush=True)
    return seconds


def run_setting(setting: Setting, names: list[str], args: argparse.Namespace
                ) -> dict[str, Any]:
    args = argparse.Namespace(**{**vars(args), "setting": setting})
    m = sum(p.numel() for p in make_mlp(setting.in_dim).parameters())
    print(f"\n== {setting.name}: {setting.n_train} train / {setting.n_test} test, MLP "
          f"{setting.in_dim}-128-64-10 (M = {m:,}), {setting.epochs} epochs ==", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_seconds = prepare_models(setting, work, args)
        for name in names:
            res = {"name": name, **spawn(child, name, tmp, args)}
            res["method"], res["settings"] = describe(name, args)
            if "test_batch" in res:
                res["settings"] += f", test_batch {res['test_batch']}"
            if "error" not in res and name != "iif" and (work / "scores_iif.npy").is_file():
                res["spearman_vs_iif"] = agreement(np.load(work / "scores_iif.npy"),
                                                   np.load(work / f"scores_{name}.npy"),
                                                   flip=name.startswith("dattri"))
            results.append(res)
            if "error" in res:
                print(f"  {name}: FAILED {res['error']}", flush=True)
            else:
                fallbacks = (f", {res['fallbacks']} unlearning fallbacks"
                             if res.get("fallbacks") is not None else "")
                print(f"  {name}: {res['seconds']:.1f} s for {res['n_test']} test samples, "
                      f"peak {res['peak_mib']:.0f} MiB{fallbacks}", flush=True)
    for r in results:
        if "error" not in r:
            r["seconds_all"] = r["seconds"] / r["n_test"] * setting.n_test
    base = next((r for r in results if r["name"] == "iif" and "error" not in r), None)
    for r in results:
        if base is not None and "error" not in r:
            r["ratio_vs_iif"] = r["seconds_all"] / base["seconds_all"]
    print_table(setting, results, args)
    trak = next((r for r in results if r["name"] == "dattri-trak" and "ratio_vs_iif" in r), None)
    target = None if trak is None else trak["ratio_vs_iif"]
    if target is not None:
        verdict = "met: IIF is no slower" if target >= 1 else "NOT met: IIF is slower"
        print(f"target on {setting.name} (IIF no slower than dattri's TRAK-{args.trak_models}): "
              f"dattri TRAK-{args.trak_models} / IIF = {target:.2f}x, {verdict}")
    return {"setting": asdict(setting), "train_seconds": train_seconds, "results": results,
            "trak_over_iif": target}


def print_table(setting: Setting, results: list[dict[str, Any]],
                args: argparse.Namespace) -> None:
    all_label = f"all {setting.n_test} (s)"
    print(f"\n{'method':<16} {'settings':<48} {'timed':>6} {'seconds':>9} {'s / test':>9} "
          f"{all_label:>13} {'peak MiB':>9} {'start':>6} {'before':>7} {'dattri/iif':>11} "
          f"{'Spearman':>9}")
    for r in results:
        head = f"{r['method']:<16} {r['settings']:<48}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        mark = "*" if r["n_test"] < setting.n_test else " "
        ratio = f"{r['ratio_vs_iif']:.2f}x" if "ratio_vs_iif" in r else "-"
        rho = f"{r['spearman_vs_iif']:+.3f}" if "spearman_vs_iif" in r else "-"
        print(f"{head} {r['n_test']:>6} {r['seconds']:>9.2f} "
              f"{r['seconds'] / r['n_test']:>9.3f} {r['seconds_all']:>12.1f}{mark} "
              f"{r['peak_mib']:>9.0f} {r['rss_start_mib']:>6.0f} {r['rss_before_mib']:>7.0f} "
              f"{ratio:>11} {rho:>9}")
    print("* extrapolated from the timed test samples (the method's cost is per test sample)")
    print("peak MiB: the child's peak resident memory (VmHWM, reset after the warm-up), "
          "including torch and the data; "
          "start: its resident memory on entry (torch imported), before: when the timed call "
          "began (data, model and library loaded, warm-up run). dattri/iif: time for all test "
          "samples over IIF's (Kronecker). Spearman: mean rank correlation with IIF's scores "
          "over the test samples both timed (dattri's negated to iif's sign).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--data", choices=list(SETTINGS), default=None,
                    help="one data setting (default: digits, then mnist)")
    ap.add_argument("--mnist-dir", default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(ALL))
    ap.add_argument("--dense", action="store_true",
                    help="also IIF with the dense projection")
    ap.add_argument("--per-test", type=int, default=None,
                    help="test samples timed for IIF and IF-CG (default: digits all, mnist 32)")
    ap.add_argument("--dense-per-test", type=int, default=None,
                    help="test samples timed for dense IIF (default: digits 20, mnist 3)")
    ap.add_argument("--tracin-per-test", action="store_true",
                    help="time dattri's TracIn on --per-test samples too and extrapolate")
    ap.add_argument("--test-batch", type=test_batch_arg, default=None,
                    help="IntegratedInfluence(test_batch=...) where the constructor takes it")
    ap.add_argument("--steps", type=int, default=5, help="IIF path steps K")
    ap.add_argument("--proj-dim", type=int, default=256, help="IIF projection P")
    ap.add_argument("--trak-models", type=int, default=TRAK_MODELS)
    ap.add_argument("--trak-dim", type=int, default=512, help="dattri TRAK projection")
    ap.add_argument("--tracin-dim", type=int, default=512, help="dattri TracIn projection")
    ap.add_argument("--damping", type=float, default=1e-2, help="TRAK damping (iif's scale)")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--cg-damping", type=float, default=1.0,
                    help="IF-CG damping (where iif's Hessian solve was positive definite in "
                         "bench_dattri.py)")
    ap.add_argument("--dattri-batch", type=int, default=500,
                    help="training samples per batch of dattri's TRAK and TracIn loaders")
    ap.add_argument("--cg-train-batch", type=int, default=1000,
                    help="training samples per batch of dattri's IF-CG (a solve per batch)")
    ap.add_argument("--cg-test-batch", type=int, default=5,
                    help="test samples per batch of dattri's IF-CG (vmapped solve)")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.trak_models = min(args.trak_models, 3)
        args.cg_iters = min(args.cg_iters, 3)
    return args


def settings_for(args: argparse.Namespace) -> list[Setting]:
    chosen = [args.data] if args.data else list(SETTINGS)
    out = []
    for key in chosen:
        s = SETTINGS[key]
        if args.quick:
            s = replace(s, **QUICK[key])
        if args.per_test is not None:
            s = replace(s, per_test=args.per_test)
        if args.dense_per_test is not None:
            s = replace(s, dense_per_test=args.dense_per_test)
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import dattri  # noqa: F401
    except ImportError:
        print("dattri is not installed: pip install -e .[bench]", file=sys.stderr)
        return {}
    os.environ["TQDM_DISABLE"] = "1"  # dattri's progress bars, in the children
    names = ALL if args.only is None else args.only.split(",")
    if not args.dense and args.only is None:
        names = [n for n in names if n != "iif-dense"]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {ALL}")
    test_batch = ("not given" if args.test_batch is None else
                  f"{args.test_batch} (passed)" if accepts_test_batch() else
                  f"{args.test_batch} (ignored: IntegratedInfluence does not take it)")
    machine = {"torch": torch.__version__, "dattri": importlib.metadata.version("dattri"),
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_start": os.getloadavg()[0]}
    print(f"torch {machine['torch']}, dattri {machine['dattri']}, {machine['threads']} threads, "
          f"{machine['cpus']} CPUs, load {machine['load_start']:.2f}; IIF test_batch: "
          f"{test_batch}\ndattri loaders: TRAK and TracIn {args.dattri_batch} training samples "
          f"per batch, the test samples in one batch; IF-CG {args.cg_train_batch} training and "
          f"{args.cg_test_batch} test samples per batch (a CG solve per pair), the whole "
          f"training set cached as one batch", flush=True)
    out: dict[str, Any] = {"machine": machine,
                           "args": {k: v for k, v in vars(args).items()}, "settings": {}}
    for setting in settings_for(args):
        out["settings"][setting.name] = run_setting(setting, names, args)
    out["machine"]["load_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
