"""iif: Integrated Influence and peer data-attribution methods for PyTorch models.

Sign convention for every score: positive = including the training sample raises the test
loss (an opponent); negative = it lowers it (a proponent).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (PEP 562), not with ``iif``
    from iif.attribution import Attribution
    from iif.baseline import BaselineSettings
    from iif.curvature import CGSettings, CurvatureSettings
    from iif.errors import CurvatureError, InputError
    from iif.methods.influence import InfluenceFunction
    from iif.methods.integrated import IntegratedInfluence
    from iif.methods.tracin import TracIn
    from iif.methods.trak import TRAK
    from iif.projection import ProjectionSettings
    from iif.target_path import PathSettings
    from iif.task import Recipe, Task
    from iif.training import train, train_cached, train_ensemble

# public name -> the module that defines it; ``import iif`` stays light (no torch), so the
# command line answers --help and --version at once
_EXPORTS = {
    "Attribution": "iif.attribution",
    "BaselineSettings": "iif.baseline",
    "CGSettings": "iif.curvature",
    "CurvatureSettings": "iif.curvature",
    "CurvatureError": "iif.errors",
    "InputError": "iif.errors",
    "InfluenceFunction": "iif.methods.influence",
    "IntegratedInfluence": "iif.methods.integrated",
    "TracIn": "iif.methods.tracin",
    "TRAK": "iif.methods.trak",
    "PathSettings": "iif.target_path",
    "ProjectionSettings": "iif.projection",
    "Recipe": "iif.task",
    "Task": "iif.task",
    "train": "iif.training",
    "train_cached": "iif.training",
    "train_ensemble": "iif.training",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iif' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "BaselineSettings",
    "CGSettings",
    "CurvatureError",
    "CurvatureSettings",
    "InfluenceFunction",
    "InputError",
    "IntegratedInfluence",
    "PathSettings",
    "ProjectionSettings",
    "Recipe",
    "TRAK",
    "Task",
    "TracIn",
    "train",
    "train_cached",
    "train_ensemble",
]
