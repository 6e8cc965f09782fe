"""The exactness table: every engine path that claims to be exact, on every model of the zoo in
tests/engine/test_exactness.py, against that file's independent reference (no torch.func,
float64): the relative error (Frobenius), or the one-line refusal.

    python benchmarks/exactness_table.py [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path[:0] = [str(TESTS / "engine"), str(TESTS)]
    import test_exactness as zoo  # the suite's models, paths and reference

    from iif.errors import InputError

    start = time.perf_counter()
    paths = list(zoo.PATHS)
    print(f"threads: {torch.get_num_threads()}; tolerance {zoo.TOLERANCE:.0e} relative")
    if args.markdown:
        print("| model | " + " | ".join(paths) + " |")
        print("|---|" + "---|" * len(paths))
    refusals = {}
    for name, build in zoo.ZOO.items():
        p = build()
        ref = zoo.Reference(p)
        cells = []
        for path in paths:
            run, expected = zoo.PATHS[path]
            try:
                got = run(p, ref.damping)
            except InputError as exc:
                refusals[name, path] = str(exc)
                cells.append("refused")
                continue
            cells.append(f"{zoo.relative_error(got, expected(ref)):.1e}")
        if args.markdown:
            print(f"| {name} | " + " | ".join(cells) + " |")
        else:
            print(f"{name:<22}" + " ".join(f"{c:>9}" for c in cells))
    for (name, path), line in refusals.items():
        print(f"refused: {name} / {path}: {line}")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
