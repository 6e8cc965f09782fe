"""Attribution methods, each a thin composition of the engine's parts."""

from iif.methods.base import AttributionMethod
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated import IntegratedInfluence
from iif.methods.tracin import TracIn
from iif.methods.trak import TRAK

__all__ = ["AttributionMethod", "InfluenceFunction", "IntegratedInfluence", "TRAK", "TracIn"]
