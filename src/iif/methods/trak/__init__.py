"""TRAK and its model-output functions.

- ``outputs``: what TRAK differentiates: ``Margin``, ``Output`` or a user's ``ModelOutput``.
- ``trak``: ``TRAK``, projected output gradients and the ``Phi (Phi^T Phi + lambda I)^-1`` kernel.
"""

from iif.methods.trak.outputs import Margin, ModelOutput, Output
from iif.methods.trak.trak import TRAK

__all__ = ["TRAK", "Margin", "ModelOutput", "Output"]
