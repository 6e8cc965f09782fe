"""Figure 1 of the paper: a sinc kernel regression where LOO and IF see no role for a point.

A kernel regression ``f(x) = sum_j theta_j sinc((x - c_j) / width)`` (linear in its
parameters, so least squares and every attribution have closed forms) is fitted to noisy 1-d
samples of a smooth curve. A training point A sits in a cluster with two neighbours, and its
target is what the model fitted *without* A predicts there: the model fits A perfectly, and
removing A changes nothing. A test point B lies near A, off the curve.

- LOO: ``L_test(theta*) - L_test(theta_{-A}) = 0`` (theta_{-A} = theta*).
- IF: ``2 r_B h_A e_A = 0``, because A's residual ``e_A`` is zero.
- IIF: the baseline unlearns B (the least-squares fit in which B enters with weight -1, the
  paper's lambda = 1 with a summed training loss, ``lam = N`` in our mean convention); A's
  baseline target moves with the curve near B, so A's path from baseline to label is long and
  its score ``2 h_A rbar (y_A - ybar_A)`` is not zero.

The figure has three panels like the paper's: the data and the model; the LOO view (the model
without A is the model); the IIF baseline model and the target path from the baseline targets
to the labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iif.methods.integrated.linear import (
    linear_delta,
    linear_fit,
    linear_iif,
    linear_unlearning_baseline,
)
from iif_paper.experiments.base import ExperimentResult, Table, check_scale, ensure_dir, save_figure
from iif_paper.experiments.linear_regression import influence_scores, loo_scores

NAME = "fig1"
TITLE = "Figure 1: LOO and IF give a perfectly fitted neighbour no contribution; IIF does not"
FIGURE = "fig1.png"
METHODS = ("IF", "LOO", "IIF")
COLUMNS = ("score_A", "rank_A", "share_A", "sum")

# The paper states that removing A leaves the model unchanged and that the influence function
# gives A no contribution (section 2.2); it gives no number for IIF.
PAPER: Table = {
    "IF": {"score_A": 0.0, "rank_A": None, "share_A": None, "sum": None},
    "LOO": {"score_A": 0.0, "rank_A": None, "share_A": None, "sum": None},
    "IIF": {"score_A": None, "rank_A": None, "share_A": None, "sum": None},
}


@dataclass(frozen=True)
class ToySettings:
    """The toy problem: sinc features, data, the cluster around A and the test point B."""

    centres: tuple[float, float, float] = (-6.0, 6.0, 13.0)  # linspace(start, stop, count)
    width: float = 1.0
    n_scattered: int = 30  # a jittered grid on [-6, 6], those within gap of x_A dropped
    jitter: float = 0.15
    gap: float = 0.45
    noise: float = 0.15
    x_a: float = 1.0
    x_neighbours: tuple[float, float] = (0.6, 1.4)
    x_b: float = 1.3
    b_offset: float = -0.6  # y_B = g(x_B) + b_offset
    paper_lambda: float = 1.0  # lam = paper_lambda * N (L_train a sum in the paper's Eq. 12)


def truth(x: np.ndarray) -> np.ndarray:
    """The curve the samples are drawn from."""
    return 2.0 * np.sinc(np.asarray(x, dtype=np.float64) / 3.0)


def features(x: np.ndarray, settings: ToySettings) -> np.ndarray:
    """Sinc kernel features (n, p): ``sinc((x - c_j) / width)``, ``sinc(u) = sin(pi u)/(pi u)``."""
    start, stop, count = settings.centres
    centres = np.linspace(start, stop, int(count))
    return np.sinc((np.asarray(x, dtype=np.float64)[:, None] - centres[None]) / settings.width)


@dataclass
class Toy:
    """The data of the figure; A is the last training sample, its neighbours the two before."""

    x: np.ndarray
    y: np.ndarray
    x_b: float
    y_b: float
    settings: ToySettings

    @property
    def a(self) -> int:
        return len(self.x) - 1

    @property
    def neighbours(self) -> list[int]:
        return [len(self.x) - 3, len(self.x) - 2]

    def design(self) -> np.ndarray:
        return features(self.x, self.settings)

    def test_design(self) -> np.ndarray:
        return features(np.array([self.x_b]), self.settings)


def make_toy(settings: ToySettings, seed: int = 0) -> Toy:
    """Scattered noisy samples, the cluster, A on the fit of the others, and B."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-6.0, 6.0, settings.n_scattered)
    x = x + rng.uniform(-settings.jitter, settings.jitter, x.size)
    x = x[np.abs(x - settings.x_a) > settings.gap]
    x_other = np.concatenate([x, settings.x_neighbours])
    y_other = truth(x_other) + settings.noise * rng.normal(size=x_other.size)
    theta = linear_fit(features(x_other, settings), y_other)
    y_a = float((features(np.array([settings.x_a]), settings) @ theta).item())
    x_all = np.concatenate([x_other, [settings.x_a]])
    y_all = np.concatenate([y_other, [y_a]])
    y_b = float(truth(np.array([settings.x_b]))[0] + settings.b_offset)
    return Toy(x_all, y_all, settings.x_b, y_b, settings)


def attribute(toy: Toy) -> dict[str, Any]:
    """Scores of every training sample on B under IF, LOO and IIF, with the baseline."""
    X, Xb = toy.design(), toy.test_design()
    y, yb = toy.y, np.array([toy.y_b])
    n = len(y)
    leverage = float((Xb @ np.linalg.solve(X.T @ X, Xb.T)).item())
    lam = toy.settings.paper_lambda * n
    note = None
    if lam <= n * leverage:  # no minimiser at the paper's lambda: take twice the threshold
        note = (f"lam = {lam:g} has no minimiser (threshold N x leverage = {n * leverage:.3g});"
                f" used twice the threshold")
        lam = 2.0 * n * leverage
    theta_base = linear_unlearning_baseline(X, y, Xb[0], toy.y_b, lam)  # (p, 1)
    ybar = (X @ theta_base)[None]  # (1, N, 1)
    scores = {
        "IF": influence_scores(X, y, Xb, yb)[0],
        "LOO": loo_scores(X, y, Xb, yb)[0],
        "IIF": linear_iif(X, y, Xb, yb, ybar)[0],
    }
    theta_star = linear_fit(X, y)
    delta = float(linear_delta(X, y, Xb, yb, ybar)[0])
    return {
        "scores": scores,
        "theta_star": theta_star[:, 0],
        "theta_base": theta_base[:, 0],
        "theta_minus_a": linear_fit(np.delete(X, toy.a, 0), np.delete(y, toy.a))[:, 0],
        "baseline_targets": ybar[0, :, 0],
        "lam": lam,
        "lam_note": note,
        "leverage_b": leverage,
        "delta": delta,
        "residual_a": float(y[toy.a] - X[toy.a] @ theta_star[:, 0]),
        "test_loss": float((Xb @ theta_star[:, 0] - toy.y_b).item() ** 2),
        "baseline_test_loss": float((Xb @ theta_base[:, 0] - toy.y_b).item() ** 2),
    }


def summarise(scores: np.ndarray, a: int) -> dict[str, float]:
    """A's score, its rank by magnitude (1 = largest), its share of the total magnitude, and
    the sum of all scores."""
    mags = np.abs(scores)
    total = float(mags.sum())
    rank = int(1 + np.sum(mags > mags[a]))
    return {"score_A": float(scores[a]), "rank_A": rank,
            "share_A": float(mags[a] / total) if total > 0 else math.nan,
            "sum": float(scores.sum())}


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Compute the toy's attributions, draw ``fig1.png`` and write ``fig1.json``/``fig1.md``.

    The toy is small and exact, so both scales run the same computation; ``seed`` draws the
    scattered samples. ``progress`` is accepted for the common signature and unused.
    """
    check_scale(scale)
    start = time.perf_counter()
    settings = ToySettings()
    toy = make_toy(settings, seed)
    att = attribute(toy)
    a = toy.a
    results: Table = {m: summarise(att["scores"][m], a) for m in METHODS}
    out = ensure_dir(out_dir)
    save_figure(draw(toy, att), out / FIGURE)

    n = len(toy.y)
    neighbour_scores = {m: [float(att["scores"][m][i]) for i in toy.neighbours]
                        for m in METHODS}
    gap = abs(results["IIF"]["sum"] - att["delta"]) / max(abs(att["delta"]), 1e-300)
    notes = [
        f"A's residual under the fitted model is {att['residual_a']:.1e}; the model fitted "
        f"without A differs from it by {np.abs(att['theta_minus_a'] - att['theta_star']).max():.1e}"
        " (max over parameters).",
        f"IIF completeness: sum of scores {results['IIF']['sum']:+.4f}, "
        f"L_test(θ*) − L_test(θ') = {att['delta']:+.4f} (relative gap {gap:.1e}).",
        "Scores of A's two neighbours: " + "; ".join(
            f"{m} {neighbour_scores[m][0]:+.3g}, {neighbour_scores[m][1]:+.3g}" for m in METHODS)
        + ".",
    ]
    if att["lam_note"]:
        notes.append(att["lam_note"])
    result = ExperimentResult(
        name=NAME,
        scale=scale,
        title=TITLE,
        settings={
            "seed": int(seed),
            "toy": asdict(settings),
            "n_train": n,
            "n_features": int(toy.design().shape[1]),
            "x_A": float(toy.x[a]), "y_A": float(toy.y[a]),
            "x_B": toy.x_b, "y_B": toy.y_b,
            "lam": att["lam"],
            "leverage_B": att["leverage_b"],
            "test_loss": att["test_loss"],
            "baseline_test_loss": att["baseline_test_loss"],
            "scale_note": "the toy is exact and small: smoke and full run the same computation",
        },
        results=results,
        paper=PAPER,
        protocol=_protocol(toy, att),
        differences=_differences(results, n),
        notes=notes,
        figures=[FIGURE],
        columns=list(COLUMNS),
    )
    result.seconds = time.perf_counter() - start
    return result.write(out)


def _protocol(toy: Toy, att: dict[str, Any]) -> str:
    s = toy.settings
    start, stop, count = s.centres
    return f"""
Kernel regression f(x) = Σⱼ θⱼ sinc((x − cⱼ)/{s.width:g}) with {int(count)} centres cⱼ evenly
spaced on [{start:g}, {stop:g}] (sinc(u) = sin(πu)/(πu)), least squares without ridge and
without intercept, fitted to N = {len(toy.y)} samples of y = 2 sinc(x/3) + noise (std
{s.noise:g}). Training point **A** (x = {s.x_a:g}) sits between two neighbours (x =
{s.x_neighbours[0]:g}, {s.x_neighbours[1]:g}); its target is the prediction of the model
fitted without it, so the model fits A exactly and removing A changes nothing. Test point
**B** (x = {s.x_b:g}) lies {abs(s.b_offset):g} {'above' if s.b_offset > 0 else 'below'} the
true curve. Scores of every training sample for
B's squared error, in the project's sign convention (negative: including the sample lowers B's
loss):

- **IF**: −(1/N) g_Bᵀ H⁻¹ g_i, exact Hessian (closed form).
- **LOO**: L_B(θ*) − L_B(θ₋ᵢ), exact refits.
- **IIF**: closed form, exact integral; baseline the exact minimiser of L_train − L_B/lam
  with lam = {att['lam']:g} (the paper's λ = 1 with a summed training loss: B enters the fit
  with weight −1; B's leverage is {att['leverage_b']:.3f} < 1, so the minimiser exists).

Columns: A's score, its rank by magnitude among the N samples (1 = largest), its share of the
total magnitude Σ|score|, and the sum of all scores (for IIF it equals
L_B(θ*) − L_B(θ') exactly).
"""


def _differences(results: Table, n: int) -> str:
    iif, if_, loo = results["IIF"], results["IF"], results["LOO"]
    tiny = 1e-9
    parts = []
    if abs(if_["score_A"]) < tiny and abs(loo["score_A"]) < tiny:
        parts.append(f"As the paper describes, LOO and IF give A no contribution "
                     f"(|LOO(A)| = {abs(loo['score_A']):.1e}, |IF(A)| = "
                     f"{abs(if_['score_A']):.1e}: zero up to rounding).")
    else:
        parts.append(f"Unlike the paper's description, LOO(A) = {loo['score_A']:.3g} and "
                     f"IF(A) = {if_['score_A']:.3g} are not zero.")
    if abs(iif["score_A"]) > 1e3 * tiny:
        kind = "a proponent of B" if iif["score_A"] < 0 else "an opponent of B"
        parts.append(f"IIF gives A {iif['score_A']:+.3g}, {kind}, ranked {iif['rank_A']} of "
                     f"{n} by magnitude ({100 * iif['share_A']:.0f}% of Σ|IIF|), as the paper's "
                     f"right panel suggests.")
    else:
        parts.append(f"IIF also gives A (almost) nothing ({iif['score_A']:.3g}), contrary to "
                     f"the paper.")
    parts.append("The paper gives no numbers for this figure, so only these qualitative "
                 "statements can be compared; our data are a reconstruction of its setting, "
                 "not its exact points.")
    return " ".join(parts)


def draw(toy: Toy, att: dict[str, Any]) -> Any:
    """The three-panel figure (a matplotlib ``Figure`` on the Agg canvas)."""
    from matplotlib.figure import Figure

    s = toy.settings
    grid = np.linspace(-6.5, 6.5, 600)
    phi = features(grid, s)
    f_star = phi @ att["theta_star"]
    f_base = phi @ att["theta_base"]
    f_loo = phi @ att["theta_minus_a"]
    a, nb = toy.a, toy.neighbours
    others = [i for i in range(len(toy.x)) if i != a and i not in nb]
    scores = att["scores"]
    ylim = (min(toy.y.min(), f_base.min(), toy.y_b) - 0.4,
            max(toy.y.max(), f_base.max(), toy.y_b) + 0.5)

    fig = Figure(figsize=(16, 4.8))
    axes = fig.subplots(1, 3, sharey=True)

    def points(ax, fitted: bool = True) -> None:
        ax.scatter(toy.x[others], toy.y[others], s=22, color="0.25", zorder=3,
                   label="training samples")
        ax.scatter(toy.x[nb], toy.y[nb], s=40, marker="^", color="tab:purple", zorder=4,
                   label="A's neighbours")
        ax.scatter([toy.x[a]], [toy.y[a]], s=90, marker="*", color="tab:orange",
                   edgecolor="black", linewidth=0.6, zorder=5, label="A")
        ax.scatter([toy.x_b], [toy.y_b], s=110, facecolor="none", edgecolor="red",
                   linewidth=2.0, zorder=5, label="test sample B")
        ax.annotate("A", (toy.x[a], toy.y[a]), xytext=(-4, 10), textcoords="offset points",
                    fontsize=11, fontweight="bold", color="tab:orange")
        ax.annotate("B", (toy.x_b, toy.y_b), xytext=(8, 4), textcoords="offset points",
                    fontsize=11, fontweight="bold", color="red")
        if fitted:
            ax.plot(grid, f_star, color="tab:blue", linewidth=2.0, label="f(x)", zorder=2)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_ylim(*ylim)
        ax.set_xlabel("x")
        ax.grid(alpha=0.25)

    ax = axes[0]
    ax.plot(grid, truth(grid), color="0.6", linestyle=":", linewidth=1.2, label="true curve")
    points(ax)
    ax.set_ylabel("y")
    ax.set_title("Sinc kernel regression", fontsize=12, fontweight="bold")

    ax = axes[1]
    points(ax)
    ax.plot(grid, f_loo, color="red", linestyle="--", linewidth=1.8, label="LOO f(x): without A")
    ax.vlines(toy.x_b, float((toy.test_design() @ att["theta_star"]).item()), toy.y_b,
              color="red", linewidth=1.0, linestyle=":")
    ax.set_title("Leave-one-out: removing A changes nothing", fontsize=12, fontweight="bold")
    ax.text(0.02, 0.97, f"LOO(A) = {scores['LOO'][a]:.1e}\nIF(A)   = {scores['IF'][a]:.1e}",
            transform=ax.transAxes, va="top", ha="left", fontsize=10, family="monospace",
            bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})

    ax = axes[2]
    for t in (0.25, 0.5, 0.75):
        theta_t = t * att["theta_star"] + (1 - t) * att["theta_base"]  # linear in t
        ax.plot(grid, phi @ theta_t, color="tab:green", alpha=0.25, linewidth=1.0)
    ax.plot(grid, f_base, color="tab:green", linestyle="--", linewidth=1.8,
            label="baseline f(x; θ′): B unlearned")
    ybar = att["baseline_targets"]
    ax.scatter(toy.x, ybar, s=24, facecolor="none", edgecolor="tab:green", zorder=3,
               label="baseline targets ȳᵢ")
    for i in range(len(toy.x)):
        if abs(toy.y[i] - ybar[i]) < 1e-3:
            continue
        color, width = ("tab:orange", 1.8) if i == a else ("0.45", 0.8)
        ax.annotate("", xy=(toy.x[i], toy.y[i]), xytext=(toy.x[i], ybar[i]),
                    arrowprops={"arrowstyle": "->", "color": color, "linewidth": width},
                    zorder=2)
    points(ax)
    ax.set_title("IIF: baseline and target path ȳᵢ → yᵢ", fontsize=12, fontweight="bold")
    rank = int(1 + np.sum(np.abs(scores["IIF"]) > abs(scores["IIF"][a])))
    ax.text(0.02, 0.97, f"IIF(A) = {scores['IIF'][a]:+.3f}\n(rank {rank} of {len(toy.x)} "
            f"by |score|)", transform=ax.transAxes, va="top", ha="left", fontsize=10,
            family="monospace",
            bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})
    handles: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
