"""Table 1 of the paper: LDS of IIF, IF and TracIn on linear regression at three noise levels.

Settings (sigma_n, sigma_s) = (0.1, 1), (1, 1), (1, 0.1): the standard deviations of the
Gaussian target noise of the training and the test samples. The protocol is
:mod:`iif_paper.experiments.linear_regression`.
"""

from __future__ import annotations

from pathlib import Path

from iif_paper.experiments.base import ExperimentResult, Table
from iif_paper.experiments.linear_regression import Noise, run_table

NAME = "table1"
TITLE = "Table 1: LDS on linear regression at three noise levels"

# (sigma_n, sigma_s): noise standard deviations of training and test targets
SETTINGS = ((0.1, 1.0), (1.0, 1.0), (1.0, 0.1))
COLUMNS = {f"sigma_n={sn:g},sigma_s={ss:g}": (Noise("gaussian", sn), Noise("gaussian", ss))
           for sn, ss in SETTINGS}
_C = list(COLUMNS)

# Table 1 of the paper (LDS averaged over 100 trials); it reports no LOO or datamodel numbers.
PAPER: Table = {
    "IIF": dict(zip(_C, (0.859, 0.744, 0.768), strict=True)),
    "IF": dict(zip(_C, (0.856, 0.634, 0.423), strict=True)),
    "TracIn": dict(zip(_C, (0.815, 0.607, 0.405), strict=True)),
    "LOO": dict.fromkeys(_C),
    "datamodel": dict.fromkeys(_C),
}


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Run Table 1 at ``scale`` and write ``table1.json`` and ``table1.md`` into ``out_dir``."""
    return run_table(
        name=NAME,
        title=TITLE,
        columns=COLUMNS,
        paper=PAPER,
        column_text="Gaussian noise; columns give the standard deviations σ_n of the training "
                    "and σ_s of the test noise",
        out_dir=out_dir,
        scale=scale,
        seed=seed,
        progress=progress,
        notes=["The paper calls σ_n a standard deviation and σ_s the test noise's "
               "'variance'; both are used as standard deviations here."],
    )
