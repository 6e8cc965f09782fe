"""Reproductions of the paper's tables and figures, one module per experiment.

Each module has ``NAME``, ``TITLE`` and ``run(out_dir, scale="smoke"|"full", seed=0,
progress=None) -> ExperimentResult``, which writes ``NAME.json``, ``NAME.md`` and any figures
into ``out_dir`` (:mod:`iif_paper.experiments.base` describes the files). Register a new experiment
with one line in ``EXPERIMENTS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

from iif.errors import InputError
from iif_paper.experiments.base import SCALES, ExperimentResult, check_scale


class _Registry(Mapping[str, ModuleType]):
    """Experiment name -> module, imported on first access: listing the names (``iif
    --help``) imports none of them."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._names:
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


EXPERIMENTS: Mapping[str, ModuleType] = _Registry(
    ("table1", "table4", "fig1", "table2", "table3", "fig2", "contrast", "lm"))

__all__ = ["EXPERIMENTS", "SCALES", "ExperimentResult", "get_experiment", "run_experiment"]


def get_experiment(name: str) -> ModuleType:
    """The experiment module registered as ``name``; an :class:`InputError` listing the valid
    names otherwise."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; valid names: "
                         f"{', '.join(EXPERIMENTS)} (or 'all')")
    return EXPERIMENTS[name]


def run_experiment(
    name: str,
    out_dir: str | Path,
    scale: str = "smoke",
    seed: int = 0,
    progress: bool | None = None,
) -> ExperimentResult:
    """Run the experiment ``name`` and write its files into ``out_dir``."""
    module = get_experiment(name)
    check_scale(scale)
    return module.run(out_dir, scale=scale, seed=seed, progress=progress)
