"""Scores of every method, mode and model family on tiny seeded problems, saved to one ``.npz``
so that a refactor can be checked bit for bit: save before, save after, compare.

Cases (112 arrays): IntegratedInfluence at its defaults, with one test sample at a time, dense
and Kronecker projections, Gauss-Newton and Hessian curvature, a shared baseline, reinforce,
the loss objective, a dense path, contrast, a group, explicit baseline targets,
self-influence and an ensemble; InfluenceFunction exact, projected, CG, Gauss-Newton, Hessian,
self-influence, several dampings and a fitted folder; TRAK with and without a fitted folder;
TracIn with and without a projection; LDS ground truth; a regression MLP; a BatchNorm CNN; a
sequence language model with and without ``LogProb``; a ``Margin`` measurement. With each
result its completeness values. Only public names are used (``from iif import ...`` and
``iif.evaluation``), so the same script runs on both sides of a change of module paths
(public since the folder layout; its arrays equal those saved on the flat layout before it).

Usage::

    python benchmarks/score_snapshot.py save before.npz      # on the old tree
    python benchmarks/score_snapshot.py save after.npz       # on the new tree
    python benchmarks/score_snapshot.py compare before.npz after.npz

``compare`` exits 1 and names every array that is missing or differs in any bit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import iif
from iif import (
    TRAK,
    BaselineSettings,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    LogProb,
    Margin,
    PathSettings,
    ProjectionSettings,
    Recipe,
    Task,
    TracIn,
    train,
)
from iif.evaluation import RetrainSettings, ground_truth

Put = Callable[[str, Any], None]
IGNORE = -100  # a sequence label that carries no loss


def collector(out: dict[str, np.ndarray]) -> Put:
    """``put(name, value)``: an Attribution's scores and completeness, or an array."""

    def put(name: str, value: Any) -> None:
        if hasattr(value, "scores"):
            out[name] = np.asarray(value.scores)
            for key, v in (value.completeness or {}).items():
                out[f"{name}.completeness.{key}"] = np.asarray(v, dtype=float)
        else:
            out[name] = np.asarray(value)
        print(name, out[name].shape, flush=True)

    return put


def mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def classification(put: Put) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3))
    x = rng.normal(size=(60, 4))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(60, 3)), 1)
    xt = rng.normal(size=(4, 4))
    yt = np.argmax(xt @ w, 1)
    task = Task(mlp([4, 16, 3], 1), "classification", Recipe(lr=0.3, epochs=100, batch_size=20))
    train(task, (x, y), seed=0)
    d, t = (x, y), (xt, yt)
    iif_cases = {
        "default": {}, "tb1": {"test_batch": 1},
        "dense64": {"projection": ProjectionSettings(dim=64)},
        "kron32": {"projection": ProjectionSettings(dim=32, structure="kronecker")},
        "ggn": {"curvature": CurvatureSettings(kind="ggn")},
        "hessian": {"curvature": CurvatureSettings(kind="hessian")},
        "shared": {"baseline": BaselineSettings(mode="shared")},
        "reinforce": {"baseline": BaselineSettings(direction="reinforce")},
        "loss_obj": {"baseline": BaselineSettings(objective="loss", epochs=2)},
        "dense_path": {"path": PathSettings(steps=4, sparse=False)},
    }
    for name, kw in iif_cases.items():
        put(f"iif.{name}", IntegratedInfluence(task, d, **kw).attribute(t))
    m = IntegratedInfluence(task, d)
    put("iif.contrast", m.attribute(t, contrast="runner-up"))
    put("iif.group", m.attribute_group(t))
    put("iif.explicit", m.attribute(t, baseline_targets=np.full((60, 3), 1 / 3)))
    put("iif.self", m.self_influence(np.arange(10)))
    put("iif.ens", IntegratedInfluence(task, d, models=iif.train_ensemble(task, d, 2, seed=3))
        .attribute(t))
    influence(put, task, d, t)
    tracin(put, d, t)
    gt = ground_truth(task, d, t, RetrainSettings(n_subsets=6, batch_models=3, epochs=5))
    put("gt.losses", gt.losses)
    put("gt.subsets", gt.subsets)
    measured = Task(task.model, "classification", task.recipe, measurement=Margin())
    put("margin.iif", IntegratedInfluence(measured, d).attribute(t))


def influence(put: Put, task: Task, d: Any, t: Any) -> None:
    """InfluenceFunction and TRAK on the classification task."""
    p64, p32 = ProjectionSettings(dim=64), ProjectionSettings(dim=32)
    for solver in ("exact", "projected", "cg"):
        kw = {"projection": p64} if solver == "projected" else {}
        put(f"if.{solver}", InfluenceFunction(task, d, solver=solver, **kw).attribute(t))
    for kind in ("ggn", "hessian"):
        put(f"if.{kind}", InfluenceFunction(task, d, curvature=CurvatureSettings(kind=kind))
            .attribute(t))
    put("if.self", InfluenceFunction(task, d).self_influence())
    dampings = InfluenceFunction(task, d, solver="projected", projection=p32)
    put("if.dampings", np.stack([a.scores for a in dampings.attribute_dampings(t, [0.01, 0.1])]))
    put("trak", TRAK(task, d, projection=p64).attribute(t))
    put("trak.self", TRAK(task, d, projection=p64).self_influence())
    with tempfile.TemporaryDirectory() as folder:
        put("trak.fit", TRAK(task, d, projection=p64).fit(folder).attribute(t))
        put("trak.fit2", TRAK(task, d, projection=p64).fit(folder).attribute(t))
        put("if.fit", InfluenceFunction(task, d).fit(folder + "/if").attribute(t))


def tracin(put: Put, d: Any, t: Any) -> None:
    task = Task(mlp([4, 16, 3], 1), "classification", Recipe(lr=0.3, epochs=6, batch_size=20))
    cps = iif.train_with_checkpoints(task, d, epochs=6, every=2, seed=0)
    put("tracin", TracIn(task, d, checkpoints=cps).attribute(t))
    put("tracin.proj", TracIn(task, d, checkpoints=cps, projection=ProjectionSettings(dim=32))
        .attribute(t))
    put("tracin.self", TracIn(task, d, checkpoints=cps).self_influence())


def regression(put: Put) -> None:
    rng = np.random.default_rng(0)
    w = np.array([1.0, -1.0, 0.5])
    x = rng.normal(size=(50, 3))
    y = np.sin(x @ w)[:, None] + 0.1 * rng.normal(size=(50, 1))
    xt = rng.normal(size=(3, 3))
    t = (xt, np.sin(xt @ w)[:, None])
    task = Task(mlp([3, 8, 1], 0), "regression", Recipe(lr=0.1, epochs=100, batch_size=25))
    train(task, (x, y), seed=0)
    put("reg.iif", IntegratedInfluence(task, (x, y)).attribute(t))
    put("reg.iif.dense", IntegratedInfluence(task, (x, y), projection=ProjectionSettings(dim=32))
        .attribute(t))
    put("reg.if", InfluenceFunction(task, (x, y)).attribute(t))


def cnn(put: Put) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    task = Task(model, "classification", Recipe(lr=0.05, epochs=5, batch_size=10, momentum=0.9))
    train(task, (x, y), seed=0)
    d, t = (x, y), (x[:3], y[:3])
    kron, dense = (ProjectionSettings(dim=32, structure="kronecker"),
                   ProjectionSettings(dim=32))
    put("cnn.iif.kron", IntegratedInfluence(task, d, projection=kron).attribute(t))
    put("cnn.iif.dense", IntegratedInfluence(task, d, projection=dense).attribute(t))
    put("cnn.trak", TRAK(task, d, projection=dense).attribute(t))
    put("cnn.if", InfluenceFunction(task, d, solver="projected", projection=kron).attribute(t))


class TinyLM(nn.Module):
    """Token embedding, a causal running mean, a linear read-out: (n, T) -> (n, T, V)."""

    def __init__(self, vocab: int = 7, hidden: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = torch.tanh(self.emb(ids))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype, device=e.device)
        return self.out(e.cumsum(1) / steps[:, None])


def sequences(n: int, length: int, seed: int, vocab: int = 7) -> tuple[torch.Tensor, ...]:
    """A noisy counting language; the last label of every other sample ignored."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(length + 1)) % vocab
    noise = torch.rand(ids.shape, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(0, vocab, ids.shape, generator=g), ids)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[::2, -1] = IGNORE
    return x, y


def language_model(put: Put) -> None:
    torch.manual_seed(0)
    d, t = sequences(40, 3, 0), sequences(3, 3, 1)
    task = Task(TinyLM().double(), "sequence", Recipe(lr=0.5, epochs=20, batch_size=10))
    train(task, d, seed=0)
    kron = ProjectionSettings(dim=32, structure="kronecker")
    put("lm.iif", IntegratedInfluence(task, d).attribute(t))
    put("lm.iif.kron", IntegratedInfluence(task, d, projection=kron).attribute(t))
    put("lm.if", InfluenceFunction(task, d).attribute(t))
    put("lm.trak", TRAK(task, d, projection=ProjectionSettings(dim=32)).attribute(t))
    measured = Task(task.model, "sequence", task.recipe, measurement=LogProb())
    put("lm.iif.logprob", IntegratedInfluence(measured, d).attribute(t))
    put("lm.if.logprob", InfluenceFunction(measured, d).attribute(t))


def save(path: str) -> None:
    torch.set_num_threads(1)
    out: dict[str, np.ndarray] = {}
    put = collector(out)
    for case in (classification, regression, cnn, language_model):
        case(put)
    np.savez(path, **out)
    print(f"saved {len(out)} arrays to {path}")


def compare(before: str, after: str) -> int:
    a, b = np.load(before), np.load(after)
    missing = [k for k in a.files if k not in b.files]
    differ = [k for k in a.files if k in b.files and not (
        a[k].shape == b[k].shape and np.array_equal(a[k], b[k], equal_nan=True))]
    print(f"{len(a.files)} arrays; missing: {missing}; differ: {differ}")
    return 1 if missing or differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("save").add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    if args.command == "save":
        save(args.path)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
