"""Sensitivity of Table 1 to the subset fraction alpha (not in the paper): 30 trials, M = 2,000.

Usage: .venv/bin/python docs/scripts/table1_fraction.py
"""

import time

from iif_paper.experiments.linear_regression import LinearProtocol, run_protocol
from iif_paper.experiments.table1 import COLUMNS

METHODS = ("IIF", "IF", "TracIn", "LOO", "datamodel")

start = time.time()
for fraction in (0.25, 0.5, 0.75):
    protocol = LinearProtocol(fraction=fraction, trials=30, n_subsets=2000, n_fit_subsets=2000)
    out = run_protocol(COLUMNS, protocol, seed=0)
    row = {m: " / ".join(f"{out.results[m][c]:.3f}" for c in COLUMNS) for m in METHODS}
    print(f"alpha={fraction}: " + "; ".join(f"{m} {v}" for m, v in row.items()), flush=True)
print(f"{time.time() - start:.0f} s")
