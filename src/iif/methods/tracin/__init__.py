"""TracIn over training checkpoints.

- ``checkpoints``: training that records checkpoints (memory or ``weights_only`` files).
- ``tracin``: ``TracIn``, ``-sum_c lr_c g_test(theta_c)^T g_i(theta_c)``.
"""

from iif.methods.tracin.checkpoints import Checkpoint, train_with_checkpoints
from iif.methods.tracin.tracin import TracIn

__all__ = ["Checkpoint", "TracIn", "train_with_checkpoints"]
