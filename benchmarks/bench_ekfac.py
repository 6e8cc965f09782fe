"""iif's EK-FAC and K-FAC influence functions against Kronfluence 1.0.1 on the same trained model.

Task: ``digits`` of ``quality_tasks.py`` (MLP 64-128-64-10 trained by the task, its cached LDS
ground truth; even subsets tune, odd subsets report). Every row attributes the first
``--tests`` test samples to the 1,000 training samples with the test loss as measurement:

- iif: the exact empirical Fisher (the default ``InfluenceFunction``), EK-FAC and K-FAC at the
  default ratio 0.3, at ratio 0.1 (Kronfluence's heuristic, ``0.1 x`` the mean eigenvalue of
  each layer) and at one absolute damping D for every layer;
- Kronfluence: EK-FAC and K-FAC of the empirical Fisher (``use_empirical_fisher=True``) and of
  its default true Fisher (labels sampled from the model), each with its heuristic damping
  (``damping_factor=None``) and with D; the empirical EK-FAC also at its default
  ``damping_factor=1e-8``, and with its heuristic in float64 (what is left of the difference
  to iif is then rounding).

D is the absolute damping with the best LDS R5 of iif's EK-FAC on the tuning half (``--damping``
sets it instead). Kronfluence's scores are ``g_test^T (C + delta)^{-1} g_i`` (positive = the
training sample lowers the test loss); they are converted to iif's convention
``-(1/N) g_test^T (C + delta)^{-1} g_i`` by multiplying by ``-1/N``. The factor fitted by least
squares against each row's iif twin (same kind and damping) is printed after the table.

Columns: seconds to fit the curvature and to score (Kronfluence rows of the same factors share
one fit), LDS R1 / R5 on both halves, the median over test samples of the Spearman and Pearson
correlations with iif's EK-FAC at its default ratio, and the median relative difference
``|s - s_twin| / |s_twin|`` to the iif row of the same kind and damping.

Needs the optional benchmark extra: ``pip install -e .[bench] torch==2.13.0`` (kronfluence
1.0.1; the torch pin keeps its torchvision requirement from moving torch). Kronfluence writes
its factors and scores under ``.cache/kronfluence/``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_ekfac.py [--threads 1] [--tests 200]
        [--damping D] [--fisher-seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

import iif  # noqa: E402
from iif import CurvatureSettings, InfluenceFunction  # noqa: E402
from iif.evaluation import spearman_columns  # noqa: E402

OUTPUT = Path(__file__).resolve().parent.parent / ".cache" / "kronfluence"
# absolute dampings tried for D (the per-layer dampings at ratio 0.3 are 1e-5 to 1e-4)
DAMPING_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
KRONFLUENCE_DEFAULT_DAMPING = 1e-8  # ScoreArguments' default damping_factor
REFERENCE = "iif EK-FAC, ratio 0.3 (default)"


@dataclass
class Row:
    """One configuration's scores in iif's convention and how they were made."""

    name: str
    library: str
    scores: np.ndarray  # (n_test, N)
    fit_s: float
    score_s: float
    twin: str | None = None  # the iif row of the same kind and damping
    raw: np.ndarray | None = None  # Kronfluence's own scores, before the conversion
    same_matrix: bool = False  # approximates the twin's matrix (the empirical Fisher)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    """The trained digits model, its data and ground truth restricted to the test samples."""

    qt: Any
    gt: Any
    test: tuple[np.ndarray, np.ndarray]

    @property
    def n_train(self) -> int:
        return self.qt.n_train()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---- iif -----------------------------------------------------------------------------------
def iif_row(bench: Bench, name: str, curvature: CurvatureSettings,
            twin: str | None = None) -> Row:
    """Fit (training gradients and curvature) and score, timed apart."""
    qt = bench.qt

    def fit() -> InfluenceFunction:
        return InfluenceFunction(qt.task, qt.train, curvature=curvature, progress=False).fit()

    method, fit_s = timed(fit)
    result, score_s = timed(lambda: method.attribute(bench.test))
    return Row(name, "iif", np.asarray(result.scores, dtype=float), fit_s, score_s, twin)


def tune_damping(bench: Bench) -> tuple[float, dict[float, float]]:
    """The absolute damping of ``DAMPING_GRID`` with the best LDS R5 of iif's EK-FAC on the
    tuning half, and every value's R5."""
    method = InfluenceFunction(bench.qt.task, bench.qt.train,
                               curvature=CurvatureSettings(kind="ekfac"), progress=False)
    results = method.attribute_dampings(bench.test, DAMPING_GRID)
    r5 = {d: qtasks.lds_scores(bench.gt, r.scores, "tune")["r5"]
          for d, r in zip(DAMPING_GRID, results, strict=True)}
    return max(r5, key=r5.__getitem__), r5


def iif_rows(bench: Bench, damping: float) -> list[Row]:
    rows = [iif_row(bench, "iif IF, exact empirical Fisher, ratio 0.3 (default)",
                    CurvatureSettings())]
    for label, kind in (("EK-FAC", "ekfac"), ("K-FAC", "kfac")):
        rows.append(iif_row(bench, f"iif {label}, ratio 0.3 (default)",
                            CurvatureSettings(kind=kind)))
    for label, kind in (("EK-FAC", "ekfac"), ("K-FAC", "kfac")):
        rows.append(iif_row(bench, f"iif {label}, ratio 0.1",
                            CurvatureSettings(kind=kind, default_damping_ratio=0.1)))
        rows.append(iif_row(bench, f"iif {label}, damping {damping:g}",
                            CurvatureSettings(kind=kind, damping=damping)))
    return rows


# ---- Kronfluence ---------------------------------------------------------------------------
def kronfluence_task() -> Any:
    """A Kronfluence ``Task``: the training loss is the summed cross-entropy (per-sample
    gradients are those of each sample's loss, as iif's), with labels drawn from the model's
    softmax when Kronfluence asks for the true Fisher; the measurement is the test loss."""
    from kronfluence.task import Task

    class SummedCrossEntropy(Task):
        def compute_train_loss(self, batch: Any, model: torch.nn.Module,
                               sample: bool = False) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits, dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return SummedCrossEntropy()


@dataclass
class KronfluenceRun:
    """One Kronfluence ``Analyzer`` on a copy of the model, with the data as its datasets."""

    analyzer: Any
    train: TensorDataset
    test: TensorDataset

    @classmethod
    def make(cls, bench: Bench) -> KronfluenceRun:
        from kronfluence.analyzer import Analyzer, prepare_model

        # Kronfluence wraps the model's layers in place: it gets a copy
        task = kronfluence_task()
        model = prepare_model(copy.deepcopy(bench.qt.task.model), task)
        analyzer = Analyzer("digits", model, task, cpu=True, disable_tqdm=True,
                            output_dir=str(OUTPUT), log_level=logging.WARNING)
        x, y = bench.qt.train
        return cls(analyzer, TensorDataset(torch.as_tensor(x), torch.as_tensor(y)),
                   TensorDataset(*(torch.as_tensor(t) for t in bench.test)))

    def fit(self, factors: str, strategy: str, empirical: bool, seed: int,
            dtype: torch.dtype) -> float:
        """Fit the factors (float32 by default, or all in ``dtype``); the seconds taken."""
        from kronfluence.arguments import FactorArguments

        wide = {} if dtype == torch.float32 else {
            "activation_covariance_dtype": dtype, "gradient_covariance_dtype": dtype,
            "per_sample_gradient_dtype": dtype, "lambda_dtype": dtype}
        args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical, **wide)
        torch.manual_seed(seed)  # the true Fisher's sampled labels
        _, seconds = timed(lambda: self.analyzer.fit_all_factors(
            factors, self.train, per_device_batch_size=256, factor_args=args,
            overwrite_output_dir=True))
        return seconds

    def score(self, factors: str, damping: float | None, dtype: torch.dtype
              ) -> tuple[np.ndarray, float]:
        """Kronfluence's pairwise scores (n_test, N) at ``damping`` (None: its heuristic)."""
        from kronfluence.arguments import ScoreArguments

        wide = {} if dtype == torch.float32 else {
            "per_sample_gradient_dtype": dtype, "precondition_dtype": dtype,
            "score_dtype": dtype}
        args = ScoreArguments(damping_factor=damping, **wide)
        name = f"{factors}-{damping}"

        def run() -> np.ndarray:
            self.analyzer.compute_pairwise_scores(
                name, factors, self.test, self.train,
                per_device_query_batch_size=len(self.test), per_device_train_batch_size=500,
                score_args=args, overwrite_output_dir=True)
            return self.analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()

        return timed(run)


# (label, strategy, empirical Fisher, dtype, [(how, damping)]) of one factor fit
Fit = tuple[str, str, bool, torch.dtype, list[tuple[str, float | None]]]


def kronfluence_fits(damping: float) -> list[Fit]:
    """(label, strategy, empirical Fisher, dtype, [(how, damping)]) of each factor fit."""
    fixed = f"damping {damping:g}"
    both = [("heuristic 0.1 x mean", None), (fixed, damping)]
    return [
        ("EK-FAC", "ekfac", True, torch.float32,
         [*both, (f"damping {KRONFLUENCE_DEFAULT_DAMPING:g} (its default)",
                  KRONFLUENCE_DEFAULT_DAMPING)]),
        ("EK-FAC", "ekfac", True, torch.float64, both[:1]),
        ("K-FAC", "kfac", True, torch.float32, both),
        ("EK-FAC", "ekfac", False, torch.float32, both),
        ("K-FAC", "kfac", False, torch.float32, both),
    ]


def kronfluence_rows(bench: Bench, damping: float, seed: int) -> list[Row]:
    """Kronfluence's rows: one factor fit per strategy, Fisher and precision, then one score
    per damping, converted to iif's sign and scale."""
    run = KronfluenceRun.make(bench)
    twins = {None: "ratio 0.1", damping: f"damping {damping:g}"}
    rows = []
    for label, strategy, empirical, dtype, dampings in kronfluence_fits(damping):
        fisher = "empirical Fisher" if empirical else f"true Fisher (seed {seed})"
        wide = "" if dtype == torch.float32 else ", float64"
        factors = (f"{strategy}-{'empirical' if empirical else f'true{seed}'}"
                   f"{'-float64' if wide else ''}")
        fit_s = run.fit(factors, strategy, empirical, seed, dtype)
        for how, value in dampings:
            raw, score_s = run.score(factors, value, dtype)
            twin = twins.get(value)
            rows.append(Row(f"Kronfluence {label}, {fisher}, {how}{wide}", "Kronfluence",
                            -raw / bench.n_train, fit_s, score_s,
                            None if twin is None else f"iif {label}, {twin}", raw,
                            same_matrix=empirical))
    return rows


# ---- comparison ----------------------------------------------------------------------------
def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` with the same row of ``b``."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def compare(rows: list[Row], gt: Any, n_train: int) -> None:
    """Fill each row's LDS, its agreement with the reference and its gap to its twin."""
    by_name = {r.name: r for r in rows}
    ref = by_name[REFERENCE].scores
    for r in rows:
        for half in ("tune", "report"):
            lds = qtasks.lds_scores(gt, r.scores, half)
            r.stats.update({f"{k}_{half}": v for k, v in lds.items()})
        r.stats["spearman"] = float(np.nanmedian(spearman_columns(r.scores.T, ref.T)))
        r.stats["pearson"] = float(np.nanmedian(pearson_rows(r.scores, ref)))
        twin = by_name.get(r.twin) if r.twin else None
        if twin is not None:
            gap = (np.linalg.norm(r.scores - twin.scores, axis=1)
                   / np.linalg.norm(twin.scores, axis=1))
            r.stats["twin_rel_diff"] = float(np.median(gap))
            r.stats["twin_rel_diff_max"] = float(gap.max())
            r.stats["twin_spearman"] = float(np.nanmedian(spearman_columns(r.scores.T,
                                                                           twin.scores.T)))
        if twin is not None and r.raw is not None and r.same_matrix:
            # least-squares factor c in iif = c x Kronfluence; expected -1/N
            c = float((twin.scores * r.raw).sum() / (r.raw * r.raw).sum())
            r.stats["fitted_factor_times_n"] = c * n_train


def print_table(rows: list[Row]) -> None:
    print("\n| row | fit s | score s | R1 tune | R5 tune | R1 report | R5 report | "
          "Spearman vs iif EK-FAC | Pearson vs iif EK-FAC | rel. diff to iif twin |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r.stats
        diff = s.get("twin_rel_diff")
        print(f"| {r.name} | {r.fit_s:.2f} | {r.score_s:.2f} | {s['r1_tune']:.3f} | "
              f"{s['r5_tune']:.3f} | {s['r1_report']:.3f} | {s['r5_report']:.3f} | "
              f"{s['spearman']:.4f} | {s['pearson']:.4f} | "
              f"{'' if diff is None else f'{diff:.1e}'} |")


def versions() -> dict[str, str]:
    import kronfluence

    return {"iif": iif.__version__, "kronfluence": kronfluence.__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tests", type=int, default=200, help="first n test samples")
    ap.add_argument("--damping", type=float, default=None,
                    help="the absolute damping D (default: tuned on the tuning half)")
    ap.add_argument("--fisher-seed", type=int, default=qtasks.SEED,
                    help="seed of the labels Kronfluence samples for the true Fisher")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        info = versions()
    except ImportError:
        print("kronfluence is not installed: pip install -e .[bench] torch==2.13.0",
              file=sys.stderr)
        return {}
    # Kronfluence's GradScaler calls warn on every fit and score
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"kronfluence\.")
    qt = qtasks.TASKS["digits"]()
    idx = np.arange(min(args.tests, qt.n_test()))
    gt = qtasks.subset_truth(qtasks.truth(qt, progress=False), idx)
    bench = Bench(qt, gt, qt.test_rows(idx))
    info.update(threads=torch.get_num_threads(), tests=int(idx.size), n_train=bench.n_train)
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    if args.damping is None:
        damping, grid = tune_damping(bench)
        print("D tuned on the tuning half (iif EK-FAC, R5): "
              + ", ".join(f"{d:g}: {v:.3f}" for d, v in grid.items()) + f" -> D = {damping:g}",
              flush=True)
    else:
        damping, grid = args.damping, {}
    rows = iif_rows(bench, damping) + kronfluence_rows(bench, damping, args.fisher_seed)
    compare(rows, gt, bench.n_train)
    print_table(rows)
    print("\nKronfluence scores x (-1/N) are iif's; least-squares factor x N against the twin:")
    for r in rows:
        if "fitted_factor_times_n" in r.stats:
            print(f"  {r.name}: {r.stats['fitted_factor_times_n']:+.6f}")
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s on {info['threads']} thread(s)")
    report = {**info, "damping": damping, "damping_grid_r5": {str(k): v for k, v in grid.items()},
              "seconds": total,
              "rows": [{"name": r.name, "library": r.library, "twin": r.twin, "fit_s": r.fit_s,
                        "score_s": r.score_s, **r.stats} for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
