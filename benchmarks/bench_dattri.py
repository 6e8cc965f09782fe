"""iif against dattri 0.3.0 on the same task, side by side in one run: time and agreement.

Task: MLP 784-128-64-10 (float32) trained 5 epochs with SGD (lr 0.01, momentum 0.9) on seeded
MNIST training images; seeded MNIST test images are attributed. For each method both
libraries get the same model, checkpoints, projection dimension and damping; the table gives
wall-clock seconds (building any cache included), the ratio dattri / iif, and the Spearman
correlation of the two score matrices (dattri's scores are oriented "positive = helps the test
sample", so they are negated to our convention first).

Needs the optional benchmark extra: ``pip install -e .[bench]`` (dattri 0.3.0; torch stays
at the pinned version).

Usage::

    python benchmarks/bench_dattri.py [--threads 2] [--quick] [--n-train 2000] [--n-test 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import iif
from iif import CGSettings, CurvatureSettings, ProjectionSettings
from iif.evaluation import spearman_columns
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif_paper.data import load_mnist

SEED = 0


def make_mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def data(n_train: int, n_test: int):
    x, y = load_mnist("train")
    order = np.random.default_rng(SEED).permutation(len(y))[:n_train]
    xt, yt = load_mnist("test")
    torder = np.random.default_rng(SEED + 1).permutation(len(yt))[:n_test]
    return (torch.from_numpy(x[order]), torch.from_numpy(y[order])), (
        torch.from_numpy(xt[torder]), torch.from_numpy(yt[torder]))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Mean over test samples of the Spearman correlation of our scores with -theirs."""
    return float(np.nanmean(spearman_columns(ours.T, -theirs.T)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--methods", default="trak,tracin,if-cg",
                    help="comma-separated subset of trak,tracin,if-cg")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    n_train = args.n_train or (300 if args.quick else 2000)
    n_test = args.n_test or (10 if args.quick else 50)
    torch.set_num_threads(args.threads)
    try:
        from dattri.algorithm.influence_function import IFAttributorCG
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask
    except ImportError:
        print("dattri is not installed: pip install -e .[bench]", file=sys.stderr)
        return []

    bench = Bench.prepare(args, n_train, n_test)
    methods = set(args.methods.split(","))
    # dattri's TRAK takes its training features from loss_func and its test features from
    # target_func: both must be the margin (the output function) for TRAK's estimator
    dattri_task = AttributionTask(loss_func=bench.margin, model=bench.model,
                                  checkpoints=bench.final, target_func=bench.margin)
    cg_task = AttributionTask(loss_func=bench.loss_func, model=bench.model,
                              checkpoints=bench.final)
    if "trak" in methods:
        compare_trak(bench, dattri_task, TRAKAttributor)
    ckpt_states = [{**c.state.params, **c.state.buffers} for c in bench.checkpoints]
    tracin_task = AttributionTask(loss_func=bench.loss_func, model=bench.model,
                                  checkpoints=ckpt_states)
    if "tracin" in methods:
        compare_tracin(bench, tracin_task, TracInAttributor)
    if "if-cg" in methods:
        compare_if_cg(bench, cg_task, IFAttributorCG)
    print_table(bench.rows)
    return bench.rows


@dataclass
class Bench:
    """The trained model, its data and checkpoints, shared by both libraries, and the rows
    compared so far."""

    args: argparse.Namespace
    task: iif.Task
    model: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    checkpoints: list
    final: dict[str, torch.Tensor]
    train_loader: DataLoader
    test_loader: DataLoader
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def prepare(cls, args: argparse.Namespace, n_train: int, n_test: int) -> Bench:
        """Train the MLP with checkpoints on ``n_train`` MNIST images (``n_test`` to
        attribute) and say what runs."""
        train, test = data(n_train, n_test)
        model = make_mlp()
        task = iif.Task(model, "classification", iif.Recipe(lr=0.01, momentum=0.9, epochs=5))
        checkpoints = train_with_checkpoints(task, train, seed=SEED, progress=False)
        final = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
              f"CPUs; MNIST {n_train} train / {n_test} test; MLP 784-128-64-10; P = "
              f"{args.proj_dim}; damping {args.damping}", flush=True)
        train_loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=False)
        test_loader = DataLoader(TensorDataset(*test), batch_size=64, shuffle=False)
        return cls(args, task, model, train, test, checkpoints, final, train_loader,
                   test_loader)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def proj(self) -> dict[str, ProjectionSettings]:
        dim = self.args.proj_dim
        return {"dense": ProjectionSettings(dim=dim, seed=SEED),
                "kronecker": ProjectionSettings(dim=dim, seed=SEED, structure="kronecker")}

    # dattri's functions of (parameters, batch)
    def loss_func(self, params, batch):
        x, y = batch
        out = torch.func.functional_call(self.model, params,
                                         x.unsqueeze(0) if x.ndim == 1 else x)
        return nn.functional.cross_entropy(out, y.view(-1))

    def margin(self, params, batch):  # TRAK's output function, as iif.TRAK uses it
        x, y = batch
        out = torch.func.functional_call(self.model, params,
                                         x.unsqueeze(0) if x.ndim == 1 else x)
        out = out.reshape(-1, out.shape[-1])
        y = y.view(-1)
        own = out.gather(1, y[:, None])[:, 0]
        others = out.masked_fill(torch.arange(out.shape[-1]) == y[:, None], -torch.inf)
        return (own - torch.logsumexp(others, -1)).sum()

    def correct_probability(self, params, batch):  # dattri 0.3.0 passes a parameter dict
        x, y = batch
        out = torch.func.functional_call(self.model, params, x.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(out, y.unsqueeze(0)))

    def compare(self, name: str, ours, theirs) -> None:
        """Time ``ours`` and ``theirs`` (each returning scores) and record their agreement."""
        our_scores, our_s = timed(ours)
        their_scores, their_s = timed(theirs)
        their_scores = np.asarray(their_scores.detach().cpu().numpy(), dtype=float).T
        self.rows.append({"method": name, "iif_s": our_s, "dattri_s": their_s,
                          "ratio": their_s / our_s,
                          "agreement": agreement(our_scores, their_scores)})
        r = self.rows[-1]
        print(f"  {name:<44} iif {r['iif_s']:8.2f} s  dattri {r['dattri_s']:8.2f} s  "
              f"dattri/iif {r['ratio']:6.1f}x  Spearman {r['agreement']:+.3f}", flush=True)


def compare_trak(bench: Bench, dattri_task: Any, attributor_cls: type) -> None:
    """iif's TRAK (dense and Kronecker projection) against dattri's, after the agreement
    two projection seeds of iif's own TRAK reach."""
    args, task, train, test = bench.args, bench.task, bench.train, bench.test

    def dattri_trak():
        attributor = attributor_cls(task=dattri_task,
                                    correct_probability_func=bench.correct_probability,
                                    projector_kwargs={"proj_dim": args.proj_dim, "device": "cpu"},
                                    device="cpu",
                                    # dattri divides gradients by sqrt(M) first: the same
                                    # damping on its scale is damping / M
                                    regularization=args.damping / bench.num_params)
        attributor.cache(bench.train_loader)
        return attributor.attribute(bench.test_loader)

    seeds = [iif.TRAK(task, train, projection=ProjectionSettings(dim=args.proj_dim, seed=s),
                      damping=args.damping, progress=False).attribute(test).scores
             for s in (0, 1)]
    print(f"  iif TRAK, projection seed 0 against seed 1: Spearman "
          f"{agreement(seeds[0], -seeds[1]):+.3f}", flush=True)
    for kind, settings in bench.proj.items():
        bench.compare(f"TRAK, 1 model, P={args.proj_dim} ({kind})",
                      lambda s=settings: iif.TRAK(task, train, projection=s,
                                                  damping=args.damping,
                                                  progress=False).attribute(test).scores,
                      dattri_trak)


def compare_tracin(bench: Bench, tracin_task: Any, attributor_cls: type) -> None:
    """iif's TracIn on the training checkpoints (dense and Kronecker projection) against
    dattri's."""
    args, checkpoints = bench.args, bench.checkpoints

    def dattri_tracin():
        attributor = attributor_cls(task=tracin_task,
                                      weight_list=torch.tensor([c.lr for c in checkpoints]),
                                      normalized_grad=False,
                                      projector_kwargs={"proj_dim": args.proj_dim,
                                                        "device": "cpu"}, device="cpu")
        return attributor.attribute(bench.train_loader, bench.test_loader)

    for kind, settings in bench.proj.items():
        bench.compare(f"TracIn, {len(checkpoints)} checkpoints, P={args.proj_dim} ({kind})",
                      lambda s=settings: iif.TracIn(bench.task, bench.train,
                                                    checkpoints=checkpoints, projection=s,
                                                    progress=False
                                                    ).attribute(bench.test).scores,
                      dattri_tracin)


def compare_if_cg(bench: Bench, cg_task: Any, attributor_cls: type) -> None:
    """iif's influence function with the Hessian by conjugate gradients against dattri's, at
    the damping iif ends up using."""
    args = bench.args
    used = {}

    def our_if_cg():
        result = iif.InfluenceFunction(
            bench.task, bench.train, solver="cg", curvature=CurvatureSettings(
                kind="hessian", damping=args.damping),
            cg=CGSettings(max_iter=args.cg_iters, tol=1e-12), progress=False,
        ).attribute(bench.test)
        used["damping"] = result.info["solver"]["damping"]  # after any retry
        return result.scores

    def dattri_if_cg():  # the same damping as ours, after our retries
        attributor = attributor_cls(task=cg_task, device="cpu", max_iter=args.cg_iters,
                                    regularization=used["damping"])
        attributor.cache(bench.train_loader)
        return attributor.attribute(bench.train_loader, bench.test_loader)

    bench.compare(f"IF, Hessian, CG {args.cg_iters} iterations", our_if_cg, dattri_if_cg)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'method':<46}{'iif s':>9}{'dattri s':>10}{'dattri/iif':>12}{'Spearman':>10}")
    for r in rows:
        print(f"{r['method']:<46}{r['iif_s']:>9.2f}{r['dattri_s']:>10.2f}"
              f"{r['ratio']:>11.1f}x{r['agreement']:>+10.3f}")
    print("Spearman: mean over test samples of the rank correlation of iif's scores with "
          "dattri's (negated to iif's sign).")


if __name__ == "__main__":
    main()
