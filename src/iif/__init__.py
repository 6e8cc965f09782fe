"""iif: Integrated Influence and peer data-attribution methods for PyTorch models.

Sign convention for every score: positive = including the training sample raises the test
loss (an opponent); negative = it lowers it (a proponent).
"""

from iif.attribution import Attribution
from iif.baseline import BaselineSettings
from iif.curvature import CGSettings, CurvatureSettings
from iif.errors import CurvatureError, InputError
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated import IntegratedInfluence
from iif.methods.tracin import TracIn
from iif.methods.trak import TRAK
from iif.path import PathSettings
from iif.projection import ProjectionSettings
from iif.task import Recipe, Task
from iif.training import train, train_ensemble

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
    "train_ensemble",
]
