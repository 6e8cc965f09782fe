"""Attribution quality of every method on held-out ground truth: LDS R1 and R5.

Tasks, ground truth and the tuning / report split are defined in ``quality_tasks.py``: 100
random half-size subsets with 5 retrained models each (1 for ``lm`` and ``textcls``, whose
tables give R1 only); even subsets tune, odd subsets report.
Each configuration's scores are cached under ``.cache/quality/<task>/scores/`` (``.npy``
without pickle, keyed by the configuration's name, the ground truth and the test samples), so
a table can be rebuilt without recomputing what did not change. The key does not hold the
library's defaults: after changing them, rerun the rows that use them with ``--refresh``.

Usage::

    python benchmarks/bench_quality.py --task digits [--threads 2] [--only iif,if-ggn]
        [--half report] [--tests 200] [--json out.json]
    python benchmarks/bench_quality.py --task digits --sweep damping --half tune
    python benchmarks/bench_quality.py --task cnn --subsets 4 --repeats 1 --tests 5 \
        --only if,trak-1 --threads 1     # a smoke run on a small ground truth

Tasks: ``digits``, ``mnist`` (MLPs), ``cnn`` (a residual BatchNorm CNN on MNIST), ``lm`` (the
fortunes language model, prompt -> completion) and ``textcls`` (a BERT classifier fed
dictionary batches). ``--subsets`` / ``--repeats`` replace the task's ground-truth size (cached
apart). A configuration that cannot run on a task is a table row saying why.

``--sweep NAME`` runs the tuning grids (``SWEEPS``) on the tuning half; the default run prints
the table of ``CONFIGS`` (each method at its chosen settings) on the report half.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

from iif import (  # noqa: E402
    TRAK,
    BaselineSettings,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    PathSettings,
    ProjectionSettings,
    TracIn,
    train_ensemble,
)

Runner = Callable[["qtasks.QualityTask", np.ndarray], tuple[np.ndarray, dict[str, Any]]]


# ---- methods -----------------------------------------------------------------------------------
def run_iif(**options: Any) -> Runner:
    """IIF with the given settings dataclasses (defaults for the rest)."""
    models = options.pop("models", 1)

    def run(qt, test_idx):
        members = None
        if models > 1:
            members = _ensemble(qt, models)
        method = IntegratedInfluence(qt.task, qt.train, models=members, progress=False,
                                     **options)
        res = method.attribute(qt.test_rows(test_idx))
        gap = res.completeness["gap"] if res.completeness is not None else None
        info = {"median_gap": None if gap is None else float(np.nanmedian(gap)),
                "fallbacks": _count(res.info, "fallbacks"),
                "truncated": _count(res.info, "truncated"),
                "flags": {k: len(v) for k, v in res.info.get("flags", {}).items()}}
        return res.scores, info
    return run


def run_if(**options: Any) -> Runner:
    def run(qt, test_idx):
        method = InfluenceFunction(qt.task, qt.train, progress=False, **options)
        return method.attribute(qt.test_rows(test_idx)).scores, {}
    return run


RATIOS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FEATURE_BYTES = 8 << 30  # the feature budget of the unprojected K-FAC / EK-FAC IIF rows
# the sweeps below ran before the default damping of Gauss-Newton and Hessian curvatures
# averaged over N instead of N x d eigenvalues: their "if-ggn-d<r>" ratio r then equals
# r / d under today's rule (d = 10 outputs), which run_if_ratio("ggn", ...) now uses
_SWEPT: dict[tuple[str, str, tuple[int, ...]], list[np.ndarray]] = {}


def run_if_ratio(kind: str, ratio: float, ggn_rank: int | str | None = None) -> Runner:
    """IF at one damping ratio; all ratios of a kind come from one featurisation
    (``InfluenceFunction.attribute_dampings``)."""
    def run(qt, test_idx):
        key = (qt.name, f"{kind}{ggn_rank}", tuple(test_idx.tolist()))
        if key not in _SWEPT:
            method = InfluenceFunction(qt.task, qt.train, progress=False,
                                       curvature=CurvatureSettings(kind=kind,
                                                                   ggn_rank=ggn_rank))
            _SWEPT[key] = [r.scores for r in method.attribute_dampings(
                qt.test_rows(test_idx), RATIOS, relative=True)]
        return _SWEPT[key][RATIOS.index(ratio)], {}
    return run


def run_trak(models: int = 10, **options: Any) -> Runner:
    def run(qt, test_idx):
        members = _ensemble(qt, models, subset="half")
        method = TRAK(qt.task, qt.train, models=members, progress=False, **options)
        return method.attribute(qt.test_rows(test_idx)).scores, {}
    return run


def run_tracin(checkpoints: int = 10, **options: Any) -> Runner:
    def run(qt, test_idx):
        from iif.methods.tracin.checkpoints import train_with_checkpoints

        # the task's model trained again from its initialisation, checkpoints kept
        task = dataclasses.replace(qt.task, model=qt.make_model(qtasks.SEED))
        every = max(1, qt.task.recipe.epochs // checkpoints)
        ckpts = train_with_checkpoints(task, qt.train, every=every, seed=qtasks.SEED,
                                       progress=False)
        task.model.eval()
        method = TracIn(task, qt.train, checkpoints=ckpts, progress=False, **options)
        return method.attribute(qt.test_rows(test_idx)).scores, {}
    return run


def _count(info: dict[str, Any], key: str) -> int:
    if key in info:
        return int(info[key])
    return sum(int(m.get(key, 0)) for m in info.get("members", []))


_ENSEMBLES: dict[tuple[str, int, str], list] = {}


def _ensemble(qt, n: int, subset: str = "full") -> list:
    key = (qt.name, n, subset)
    if key not in _ENSEMBLES:
        _ENSEMBLES[key] = train_ensemble(qt.task, qt.train, n, subset=subset,
                                         seed=qtasks.SEED + 1, progress=False)
    return _ENSEMBLES[key]


# ---- configurations ----------------------------------------------------------------------------
def configs() -> dict[str, tuple[Runner, dict[str, Any]]]:
    """The report table: each method at the settings chosen on the tuning half."""
    return {
        "iif": (run_iif(), {}),
        "iif-10": (run_iif(models=10), {}),
        "if": (run_if(), {}),
        "if-fisher-d0.3": (run_if_ratio("fisher", 0.3), {}),
        # the full Gauss-Newton matrix at its best ratio on the tuning half
        "if-ggn-full-d0.3": (run_if_ratio("ggn", 0.3), {}),
        "trak-10": (run_trak(10), {}),
        "trak-10-P512": (run_trak(10, projection=ProjectionSettings(dim=512)), {}),
        "tracin-40": (run_tracin(40), {}),
        # Kronecker-factored curvatures from the layer hooks (no projection)
        # IIF solves K-FAC / EK-FAC on unprojected path features, (N, M) per step: the MNIST
        # MLP's take 2.0 GiB each, past the default feature budget (this machine has 24 GiB)
        "iif-kfac": (run_iif(curvature=CurvatureSettings(kind="kfac"),
                             max_feature_bytes=FEATURE_BYTES), {}),
        "iif-ekfac": (run_iif(curvature=CurvatureSettings(kind="ekfac"),
                              max_feature_bytes=FEATURE_BYTES), {}),
        "if-kfac": (run_if(curvature=CurvatureSettings(kind="kfac")), {}),
        "if-ekfac": (run_if(curvature=CurvatureSettings(kind="ekfac")), {}),
    }


def extras() -> dict[str, tuple[Runner, dict[str, Any]]]:
    """Cheaper configurations for large models and smoke runs, chosen with ``--only``."""
    kron = ProjectionSettings(dim=1024, structure="kronecker")
    return {
        "trak-1": (run_trak(1), {}),
        "trak-10-kron1024": (run_trak(10, projection=kron), {}),
        "if-kron1024": (run_if(solver="projected", projection=kron), {}),
        "iif-kron1024": (run_iif(projection=kron), {}),
        "tracin-5": (run_tracin(5), {}),
    }


def sweeps() -> dict[str, dict[str, tuple[Runner, dict[str, Any]]]]:
    """Tuning grids, each evaluated on the tuning half only."""
    out: dict[str, dict[str, tuple[Runner, dict[str, Any]]]] = {}
    out["if-damping"] = {
        f"if-{kind}-d{ratio:g}": (run_if_ratio(kind, ratio), {})
        for kind in ("fisher", "ggn") for ratio in RATIOS
    }
    # IIF's curvature: the default Fisher, K-FAC and EK-FAC, fitted at each path model or
    # once at theta*
    out["iif-curvature"] = {
        f"iif-{kind}-{fit}": (run_iif(curvature=CurvatureSettings(kind=kind, path_fit=fit)), {})
        for kind in ("fisher", "kfac", "ekfac") for fit in ("each", "once")}
    out["if-ggn-full"] = {f"if-ggn-full-d{ratio:g}": (run_if_ratio("ggn", ratio), {})
                          for ratio in (0.1, 0.3, 1.0)}
    out["iif-grid"] = {
        f"iif-d{ratio:g}-K{k}-{'sparse' if sp else 'dense'}-stop{stop}": (run_iif(
            curvature=CurvatureSettings(default_damping_ratio=ratio),
            path=PathSettings(steps=k, sparse=sp),
            baseline=BaselineSettings(stop_test_loss=stop)), {})
        for ratio in (0.3, 1.0) for k in (1, 3, 5) for sp in (True, False)
        for stop in ("chance", 0.5)
    }
    out["iif-grid2"] = {
        f"iif-d0.3-K{k}-e{e}-{'sparse' if sp else 'dense'}-stop{stop}": (run_iif(
            curvature=CurvatureSettings(default_damping_ratio=0.3),
            path=PathSettings(steps=k, epochs=e, sparse=sp),
            baseline=BaselineSettings(stop_test_loss=stop)), {})
        for sp in (False, True) for stop in (0.1, 0.02) for k in (1, 3) for e in (1, 3)
    }
    out["iif-grid3"] = {
        f"iif-d0.3-K3-{'sparse' if sp else 'dense'}-nostop-lam{lam:g}-e{ep}": (run_iif(
            curvature=CurvatureSettings(default_damping_ratio=0.3),
            path=PathSettings(steps=3, sparse=sp),
            baseline=BaselineSettings(stop_test_loss=None, lam=lam, epochs=ep)), {})
        for sp in (True, False) for lam in (2.0, 20.0) for ep in (1, 3)
    }
    out["iif-grid4"] = {
        f"iif-d0.3-K3-sparse-nostop-lam{lam:g}-e{ep}": (run_iif(
            curvature=CurvatureSettings(default_damping_ratio=0.3),
            path=PathSettings(steps=3, sparse=True),
            baseline=BaselineSettings(stop_test_loss=None, lam=lam, epochs=ep)), {})
        for lam in (0.1, 0.25, 0.5, 1.0) for ep in (1, 3)
    }
    out["iif-grid5"] = {
        f"iif-d{ratio:g}-K{k}-e{e}-sparse-nostop-lam1": (run_iif(
            curvature=CurvatureSettings(default_damping_ratio=ratio),
            path=PathSettings(steps=k, epochs=e, sparse=True),
            baseline=BaselineSettings(stop_test_loss=None, lam=1.0, epochs=1)), {})
        for ratio in (0.3, 1.0) for k in (1, 3, 5) for e in (1, 3)
    }
    out["if-ggn-rank"] = {
        f"if-ggn{rank}-d{ratio:g}": (run_if_ratio("ggn", ratio, rank), {})
        for rank in (1, 2) for ratio in RATIOS
    }
    out["iif-ggn"] = {
        f"iif-ggn{rank}-d{ratio:g}": (run_iif(
            curvature=CurvatureSettings(kind="ggn", ggn_rank=rank, default_damping_ratio=ratio)),
            {}) for rank in (1, 2, 3) for ratio in (0.1, 0.3, 1.0)
    }
    out["iif-ggn-path"] = {
        f"iif-ggn1-d0.3-K{k}-{'sparse' if sp else 'dense'}-lam{lam:g}": (run_iif(
            curvature=CurvatureSettings(kind="ggn", ggn_rank=1, default_damping_ratio=0.3),
            path=PathSettings(steps=k, sparse=sp), baseline=BaselineSettings(lam=lam)), {})
        for k in (1, 3, 5) for sp in (True, False) for lam in (0.5, 1.0, 2.0)
        if (sp or lam == 1.0) and (k == 3 or lam == 1.0)
    }
    out["if-ggn-factored"] = {
        f"if-ggn{rank}-factored-d{ratio:g}": (run_if(curvature=CurvatureSettings(
            kind="ggn", ggn_rank=rank, default_damping_ratio=ratio)), {})
        for rank in (1, 2, 3) for ratio in (0.3, 1.0)
    }
    out["iif-ggn-curvature"] = {
        "iif-fisher-d0.3": (run_iif(curvature=CurvatureSettings(kind="fisher")), {}),
        "iif-ggn1-d0.3": (run_iif(curvature=CurvatureSettings(kind="ggn", ggn_rank=1)), {}),
        "iif-ggn1-d1": (run_iif(curvature=CurvatureSettings(kind="ggn", ggn_rank=1,
                                                            default_damping_ratio=1.0)), {}),
        "iif-ggn2-d0.3": (run_iif(curvature=CurvatureSettings(kind="ggn", ggn_rank=2)), {}),
    }
    out["iif-damping"] = {
        f"iif-d{ratio:g}": (run_iif(curvature=CurvatureSettings(default_damping_ratio=ratio)),
                            {}) for ratio in (0.01, 0.03, 0.1, 0.3, 1.0)
    }
    out["iif-path"] = {
        f"iif-K{k}-e{e}-{'sparse' if sp else 'dense'}": (
            run_iif(path=PathSettings(steps=k, epochs=e, sparse=sp)), {})
        for k in (1, 3, 5) for e in (1,) for sp in (True, False)
    }
    out["iif-baseline"] = {
        f"iif-{obj}-lam{lam:g}-e{ep}": (run_iif(baseline=BaselineSettings(
            objective=obj, lam=lam, epochs=ep)), {})
        for obj in ("complement", "loss") for lam in (0.5, 2.0) for ep in (1, 5)
    }
    out["trak"] = {
        f"trak-10-P{dim}-d{ratio}": (run_trak(10, projection=ProjectionSettings(dim=dim),
                                             damping=ratio), {})
        for dim in (512, 2048, 8192) for ratio in (None, 0.0)
    }
    out["tracin"] = {f"tracin-{c}": (run_tracin(c), {}) for c in (5, 10, 20, 40)}
    out["iif-projection"] = {
        f"iif-{st}-P{p}": (run_iif(projection=ProjectionSettings(dim=p, structure=st)), {})
        for st in ("kronecker", "dense") for p in (256, 1024)
    }
    return out


# ---- running and caching -----------------------------------------------------------------------
def test_indices(qt, n_tests: int | None) -> np.ndarray:
    n = qt.n_test()
    return np.arange(n if n_tests is None else min(n, n_tests))


def evaluate(qt, gt, name: str, runner: Runner, test_idx: np.ndarray, half: str,
             refresh: bool = False) -> dict[str, Any]:
    folder = qtasks.CACHE / qt.name / "scores"
    folder.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{name}|{gt.key}|{test_idx.tolist()}".encode()).hexdigest()[:12]
    npy, meta = folder / f"{name}-{tag}.npy", folder / f"{name}-{tag}.json"
    full = np.arange(qt.n_test())
    whole = hashlib.sha256(f"{name}|{gt.key}|{full.tolist()}".encode()).hexdigest()[:12]
    if npy.exists() and meta.exists() and not refresh:
        scores = np.load(npy, allow_pickle=False)
        info = json.loads(meta.read_text())
    elif (folder / f"{name}-{whole}.npy").exists() and not refresh:
        # the scores of every test sample were computed before: take these rows
        scores = np.load(folder / f"{name}-{whole}.npy", allow_pickle=False)[test_idx]
        info = json.loads((folder / f"{name}-{whole}.json").read_text())
    else:
        start = time.perf_counter()
        try:
            scores, info = runner(qt, test_idx)
        except Exception as exc:  # noqa: BLE001  # a method that cannot run is a row
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return {"name": name, "seconds": time.perf_counter() - start,
                    "threads": torch.get_num_threads(),
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             f" (at {Path(where.filename).name}:{where.lineno})"}
        info = {**info, "seconds": time.perf_counter() - start,
                "threads": torch.get_num_threads()}
        np.save(npy, np.asarray(scores), allow_pickle=False)
        meta.write_text(json.dumps(info))
    sub_gt = qtasks.subset_truth(gt, test_idx)
    return {"name": name, **qtasks.lds_scores(sub_gt, scores, half), **info}


def print_table(rows: list[dict[str, Any]], half: str, repeats: int = qtasks.REPEATS) -> None:
    """A Markdown table: LDS R1 and, with several models per subset, the LDS against their
    mean (the rows' ``r5`` entries, whatever ``repeats`` is)."""
    # one model per subset: R1 is the whole ground truth, printed once
    mean_col = f" LDS R{repeats} ({half}) |" if repeats > 1 else ""
    print(f"\n| configuration | LDS R1 ({half}) |{mean_col} seconds | threads | median gap | "
          f"fallbacks |")
    print("|---|---:|" + ("---:|" if repeats > 1 else "") + "---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | cannot run: {r['error']} |{' |' if repeats > 1 else ''} "
                  f"{r['seconds']:.1f} | {r['threads']} | | |")
            continue
        gap = r.get("median_gap")
        mean = f" {r['r5']:.3f} ± {r['r5_se']:.3f} |" if repeats > 1 else ""
        print(f"| {r['name']} | {r['r1']:.3f} ± {r['r1_se']:.3f} |{mean} {r['seconds']:.1f} | "
              f"{r['threads']} | {'' if gap is None else f'{gap:.3f}'} | "
              f"{r.get('fallbacks', '')} |")


def select(sweep: str | None, only: str | None) -> dict[str, tuple[Runner, dict[str, Any]]]:
    """The configurations to run: a sweep's or the report table's, narrowed by ``only``
    (which may also name the configurations of :func:`extras`)."""
    table = sweeps()[sweep] if sweep else configs()
    if not only:
        return table
    pool = {**extras(), **table}
    unknown = [k for k in only.split(",") if k not in pool]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {sorted(pool)}")
    return {k: pool[k] for k in only.split(",")}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(qtasks.TASKS), default="digits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--sweep", default=None, help="a tuning grid (runs on the tuning half)")
    p.add_argument("--half", choices=("tune", "report"), default=None)
    p.add_argument("--tests", type=int, default=None, help="first n test samples only")
    p.add_argument("--refresh", action="store_true", help="recompute cached scores")
    p.add_argument("--subsets", type=int, default=None,
                   help="ground-truth subsets (default: the task's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="retrained models per subset (default: the task's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    half = args.half or ("tune" if args.sweep else "report")
    table = select(args.sweep, args.only)
    qt = qtasks.TASKS[args.task]()
    print(f"task {qt.name}: {qt.info}", flush=True)
    gt = qtasks.truth(qt, n_subsets=args.subsets, repeats=args.repeats)
    idx = test_indices(qt, args.tests)
    repeats = gt.settings.repeats
    print(f"task {qt.name}: {qt.n_train()} train, {idx.size} test samples, "
          f"{gt.subsets.shape[0]} subsets x {repeats} retrains; half {half}; "
          f"{args.threads} threads", flush=True)
    rows = []
    for name, (runner, _) in table.items():
        rows.append(evaluate(qt, gt, name, runner, idx, half, args.refresh))
        r = rows[-1]
        if "error" in r:
            print(f"{name}: cannot run: {r['error']}", flush=True)
        else:
            mean = f"  R{repeats} {r['r5']:.3f}" if repeats > 1 else ""
            print(f"{name}: R1 {r['r1']:.3f}{mean}  ({r['seconds']:.1f} s)", flush=True)
    print_table(rows, half, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
