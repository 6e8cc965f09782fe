"""How unlearning baselines end on the digits quality task: fallbacks, truncations, baselines
that did not move the test loss (by 1e-3), and where the test loss ends, for the old settings
and the current ones, on the first ``--tests`` test samples (docs/quality.md, "Baseline").

Usage::

    python benchmarks/bench_baselines.py [--tests 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks as qtasks  # noqa: E402

from iif import BaselineSettings  # noqa: E402
from iif.engine.engine import Budget, Engine  # noqa: E402
from iif.engine.functional import FunctionalModel  # noqa: E402
from iif.methods.integrated.baseline import unlearned_baselines  # noqa: E402
from iif.results.diagnostics import MOVE_THRESHOLD  # noqa: E402

SETTINGS = {
    "loss objective, lam 0.5, 5 epochs, chance stop (old default)": BaselineSettings(
        objective="loss", lam=0.5, epochs=5, stop_test_loss="chance"),
    "complement, lam 0.5, 5 epochs, chance stop": BaselineSettings(
        objective="complement", lam=0.5, epochs=5, stop_test_loss="chance"),
    "complement, lam 1, 1 epoch, no stop (default)": BaselineSettings(),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    qt = qtasks.digits_task()
    task = qt.task
    train = task.validate(qt.train)
    test = task.validate((qt.test[0][: args.tests], qt.test[1][: args.tests]))
    fmodel = FunctionalModel(task.model)
    state = fmodel.state()
    engine = Engine.bind(task, train, task.model, Budget())

    def losses(s):
        return task.sample_loss(fmodel.outputs(s, test.x), test.targets).double().numpy()

    before = losses(state)
    print(f"{args.tests} digits test samples, {args.threads} thread(s); test loss at theta*: "
          f"median {np.median(before):.2g}")
    print("| settings | fallbacks | truncated | not moved | test loss after: median | max |"
          " seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, settings in SETTINGS.items():
        start = time.perf_counter()
        bases = unlearned_baselines(engine, [test.subset([j]) for j in range(len(test))], settings,
                               torch.Generator().manual_seed(0))
        after = np.array([losses(b.state)[j] for j, b in enumerate(bases)])
        unmoved = int(np.sum(np.abs(after - before) < MOVE_THRESHOLD))
        print(f"| {name} | {sum(b.fell_back for b in bases)} | "
              f"{sum(b.truncated for b in bases)} | {unmoved} | {np.median(after):.2f} | "
              f"{after.max():.1f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
