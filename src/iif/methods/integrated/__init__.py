"""Integrated Influence (paper Algorithm 1) and what belongs to it alone.

- ``baseline``: unlearning baselines theta' (Eq. 12-13), the unlearning objective, per-sample
  self-influence baselines.
- ``target_path``: the target path rho(t_k) (Eq. 14-15) and the path models (Eq. 16), trained
  on the engine.
- ``integrated``: ``IntegratedInfluence``: baseline builders and one integration loop.
- ``linear``: the closed form for linear least squares (a test oracle).
"""

from iif.methods.integrated.baseline import BaselineSettings
from iif.methods.integrated.integrated import IntegratedInfluence
from iif.methods.integrated.target_path import PathSettings

__all__ = ["BaselineSettings", "IntegratedInfluence", "PathSettings"]
