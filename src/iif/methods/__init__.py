"""The attribution methods: estimators composed of the engine's operations.

- ``base``: what every method shares: ensembles, settings, sharding, fitted state, the
  declarations the store and torchrun read.
- ``estimator``: test features . solve(training features), the kernel of IF, TracIn and TRAK.
- ``influence``: influence functions, ``-(1/N) g_test^T C^-1 g_i`` (exact, projected, CG).
- ``integrated/``: Integrated Influence with its baseline and target path.
- ``tracin/``: TracIn with its checkpoints.
- ``trak/``: TRAK with its model-output functions.

Imports: the ground floor, ``iif.task``, ``iif.engine`` and ``iif.results``; never the views,
the runs or ``iif.evaluation``. What belongs to one method lives in its folder; what any method
needs belongs in the engine.
"""

from iif.methods.base import AttributionMethod
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated.integrated import IntegratedInfluence
from iif.methods.tracin.tracin import TracIn
from iif.methods.trak.trak import TRAK

__all__ = ["AttributionMethod", "InfluenceFunction", "IntegratedInfluence", "TRAK", "TracIn"]
