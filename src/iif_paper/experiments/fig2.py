"""Figure 2 of the paper: proponents and opponents of an MNIST "4" that resembles a "9".

IIF answers the two questions with two baselines (paper §3.2): proponents from the
``unlearn`` baseline (the model made less sure the image is a 4; the most negative scores
lower the test loss the most) and opponents from the ``reinforce`` baseline (the model made
surer; the most positive scores). The peers rank one set of scores both ways. Every method's
top 8 of each are drawn beside the test image, with labels and scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iif.engine.projection import ProjectionSettings
from iif.methods import IntegratedInfluence
from iif.methods.integrated.baseline import BaselineSettings
from iif.methods.integrated.target_path import PathSettings
from iif.methods.tracin.checkpoints import train_with_checkpoints
from iif.views.report import plot_rankings, top_entries
from iif_paper.experiments import mnist
from iif_paper.experiments.base import ExperimentResult, Table, begin

NAME = "fig2"
TITLE = "Figure 2: proponents and opponents of a 4 that resembles a 9"
K = 8
SIZES: dict[str, dict[str, Any]] = {
    "full": {"n_train": 5000, "epochs": mnist.EPOCHS, "checkpoints": 5, "steps": 5,
             "dim": 256, "trak_dim": 2048},
    "smoke": {"n_train": 200, "epochs": 3, "checkpoints": 3, "steps": 2, "dim": 32,
              "trak_dim": 64},
}
COLUMNS = ["proponents labelled 4", "opponents labelled 9"]


def pick_test_image(model, xt: np.ndarray, yt: np.ndarray, label: int = 4,
                    rival: int = 9) -> int:
    """The test image of class ``label`` the model finds most like ``rival`` (largest
    probability of the rival class)."""
    model.eval()
    with torch.no_grad():
        prob = torch.softmax(model(torch.as_tensor(xt)), -1).numpy()
    candidates = np.flatnonzero(yt == label)
    if candidates.size == 0:
        candidates = np.arange(len(yt))
    return int(candidates[np.argmax(prob[candidates, rival])])


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Run Figure 2 at ``scale``: writes ``fig2.png``, ``fig2.json`` and ``fig2.md``."""
    start, out, size = begin(out_dir, scale, SIZES)
    (x, y), (xt, yt) = mnist.draw(size["n_train"], 1000, seed)
    task = mnist.task(seed, size["epochs"])
    every = max(1, size["epochs"] // size["checkpoints"])
    checkpoints = train_with_checkpoints(task, (x, y), every=every, seed=seed,
                                         progress=progress)
    s = pick_test_image(task.model, xt, yt)
    test = (xt[s : s + 1], yt[s : s + 1])
    proj = ProjectionSettings(dim=size["dim"], seed=seed, structure="kronecker")
    common = {"seed": seed, "progress": progress}

    def iif_scores(direction: str) -> np.ndarray:
        method = IntegratedInfluence(
            task, (x, y), baseline=BaselineSettings(direction=direction, lam=0.5),
            path=PathSettings(steps=size["steps"]), projection=proj, **common)
        return method.attribute(test).scores[0]

    peers = mnist.methods(task, (x, y), size, checkpoints, seed, progress)
    del peers["IIF"]  # IIF runs twice below, with one baseline per question
    rankings: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, method in peers.items():
        row = method.attribute(test).scores[0]
        pro, opp = top_entries(row, y, K)
        rankings[name] = {"proponents": pro, "opponents": opp}
    rankings["IIF"] = {"proponents": top_entries(iif_scores("unlearn"), y, K)[0],
                       "opponents": top_entries(iif_scores("reinforce"), y, K)[1]}

    rows = [(f"{name} {kind}", rankings[name][kind])
            for name in ("IIF", "IF", "TracIn", "TRAK") for kind in ("proponents", "opponents")]
    plot_rankings(test[0][0], f"MNIST test image #{int(s)} (label {int(test[1][0])})", rows, x,
                  out / f"{NAME}.png", image_shape=(28, 28))
    results: Table = {
        name: {COLUMNS[0]: float(np.mean([e["label"] == 4 for e in r["proponents"]])),
               COLUMNS[1]: float(np.mean([e["label"] == 9 for e in r["opponents"]]))}
        for name, r in rankings.items()
    }
    paper: Table = {name: dict.fromkeys(COLUMNS) for name in results}
    paper["IIF"][COLUMNS[1]] = 1.0  # "all images in the opponents set are 9"
    differences = " ".join(
        f"{name}: {results[name][COLUMNS[0]]:.0%} of proponents are 4s, "
        f"{results[name][COLUMNS[1]]:.0%} of opponents are 9s." for name in results)
    result = ExperimentResult(
        name=NAME, scale=scale, title=TITLE,
        settings={**size, "seed": seed, "test_index": int(s), "k": K, "rankings": rankings},
        results=results, paper=paper, columns=COLUMNS, figures=[f"{NAME}.png"],
        protocol=(f"MLP of Table 2 trained on {size['n_train']} random MNIST images for "
                  f"{size['epochs']} epochs; the test image is the test 4 with the largest "
                  f"predicted probability of 9. IIF: unlearn baseline for proponents, "
                  f"reinforce baseline for opponents (lambda = 0.5, K = {size['steps']}); "
                  f"peers: the most negative and most positive of one score vector. The "
                  f"paper shows the figure only; the columns summarise it (the paper states "
                  f"that all of IIF's opponents are 9s)."),
        differences=differences, seconds=time.perf_counter() - start,
    )
    return result.write(out)
