"""iif: Integrated Influence and peer data-attribution methods for PyTorch models.

Sign convention for every score: positive = including the training sample raises the test
loss (an opponent); negative = it lowers it (a proponent).

The parts, each a folder (data flows down this list; each imports only from those above it):
``task`` (what the user supplies) -> ``engine`` (gradients, features, training and solves on
B >= 1 model copies) -> ``results`` (Attribution, run key, stores) -> ``methods`` (the
estimators) and ``evaluation`` (LDS, AUC) -> ``views`` (text, pictures, HTML) and ``runs``
(command line, task files, torchrun). ``errors``, ``io``, ``progress``, ``validation`` and
``version`` are the ground floor every part uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from iif.version import __version__

if TYPE_CHECKING:  # the names below are imported on first use (PEP 562), not with ``iif``
    from iif.engine.curvature import CGSettings, CurvatureSettings
    from iif.engine.projection import ProjectionSettings
    from iif.engine.training import train, train_ensemble
    from iif.errors import CurvatureError, InputError
    from iif.methods.influence import InfluenceFunction
    from iif.methods.integrated.baseline import BaselineSettings
    from iif.methods.integrated.integrated import IntegratedInfluence
    from iif.methods.integrated.target_path import PathSettings
    from iif.methods.tracin.checkpoints import train_with_checkpoints
    from iif.methods.tracin.tracin import TracIn
    from iif.methods.trak.trak import TRAK
    from iif.results.attribution import Attribution
    from iif.results.trained import train_cached
    from iif.task.data import Streamed
    from iif.task.measurements import FunctionMeasurement, Logit, LogProb, Margin, TestLoss
    from iif.task.sequences import causal_lm_labels, completions
    from iif.task.task import Recipe, Task

# public name -> the module that defines it; ``import iif`` stays light (no torch), so the
# command line answers --help and --version at once
_EXPORTS = {
    "Attribution": "iif.results.attribution",
    "BaselineSettings": "iif.methods.integrated.baseline",
    "CGSettings": "iif.engine.curvature",
    "CurvatureError": "iif.errors",
    "CurvatureSettings": "iif.engine.curvature",
    "FunctionMeasurement": "iif.task.measurements",
    "InfluenceFunction": "iif.methods.influence",
    "InputError": "iif.errors",
    "IntegratedInfluence": "iif.methods.integrated.integrated",
    "LogProb": "iif.task.measurements",
    "Logit": "iif.task.measurements",
    "Margin": "iif.task.measurements",
    "PathSettings": "iif.methods.integrated.target_path",
    "ProjectionSettings": "iif.engine.projection",
    "Recipe": "iif.task.task",
    "Streamed": "iif.task.data",
    "TRAK": "iif.methods.trak.trak",
    "Task": "iif.task.task",
    "TestLoss": "iif.task.measurements",
    "TracIn": "iif.methods.tracin.tracin",
    "train": "iif.engine.training",
    "train_cached": "iif.results.trained",
    "train_ensemble": "iif.engine.training",
    "train_with_checkpoints": "iif.methods.tracin.checkpoints",
    "causal_lm_labels": "iif.task.sequences",
    "completions": "iif.task.sequences",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iif' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "Attribution",
    "BaselineSettings",
    "causal_lm_labels",
    "completions",
    "CGSettings",
    "CurvatureError",
    "CurvatureSettings",
    "FunctionMeasurement",
    "InfluenceFunction",
    "InputError",
    "IntegratedInfluence",
    "Logit",
    "LogProb",
    "Margin",
    "PathSettings",
    "ProjectionSettings",
    "Recipe",
    "Streamed",
    "Task",
    "TestLoss",
    "TracIn",
    "train",
    "train_cached",
    "train_ensemble",
    "train_with_checkpoints",
    "TRAK",
    "__version__",
]
