"""Dense against Kronecker-factored projection of a small CNN's per-sample gradients.

The CNN of Table 3 (two 3x3 convolutions with pooling and a linear head, M = 20,490); u and psi
of n random 28x28 inputs at P = 256, the Kronecker fast path taking its convolutions through
their input patches. Prints milliseconds per call (median of 3 after a warm-up) and the ratio.

Usage::

    python benchmarks/bench_conv.py [--threads 2] [--n 256] [--chunk 64] [--dim 256]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_engine import timed

from iif.engine.features import step_features
from iif.engine.functional import FunctionalModel
from iif.engine.projection import ProjectionSettings, make_projector
from iif.task.task import Recipe, Task
from iif_paper.experiments.table3 import cnn


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cnn(0).eval()
    task = Task(model, "classification", Recipe())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 1, 28, 28, generator=gen)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (args.n,), generator=gen), 10).float()
    print(f"torch {torch.__version__}, {args.threads} threads; CNN with M = "
          f"{fmodel.num_params}, n = {args.n}, chunk {args.chunk}")
    out = {}
    for structure in ("dense", "kronecker"):
        projector = make_projector(fmodel.num_params, ProjectionSettings(
            dim=args.dim, structure=structure), "cpu", torch.float32, fmodel)

        def run(projector=projector) -> None:
            step_features(fmodel, state, x, y, 0.5 * y, task, projector, args.chunk)

        out[structure] = statistics.median(timed(run, repeats=3)) * 1e3
        print(f"  {structure:<9} P = {projector.dim:>4}: {out[structure]:8.1f} ms")
    print(f"  ratio dense / kronecker: {out['dense'] / out['kronecker']:.1f}x")
    return out


if __name__ == "__main__":
    main()
