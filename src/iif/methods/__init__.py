"""Attribution methods, each a thin composition of the engine's parts."""

from iif.methods.integrated import IntegratedInfluence

__all__ = ["IntegratedInfluence"]
