"""What the user supplies: the task (model, loss, training recipe), its data and what a score
explains.

- ``data``: tensors, Datasets and DataLoaders as the library reads them; ``Data``, the validated
  samples every other part passes around; streamed inputs read on demand.
- ``inputs``: ``Inputs``, the several inputs of a sample (positional and keyword tensors) that
  reach the model as ``model(*args, **kwargs)``.
- ``measurements``: what a score explains (test loss, ``LogProb``, ``Margin``, ``Logit``, a
  function of the outputs).
- ``task``: ``Task`` and ``Recipe``, validated at the boundary.
- ``job``: a task function named from outside Python (``MODULE:FUNCTION``), as ``iif attribute``
  and the views load it.

Imports: the ground floor (``iif.errors``, ``iif.io``, ``iif.progress``, ``iif.validation``)
only; inside, ``inputs`` <- ``data`` <- ``measurements`` <- ``task`` <- ``job``.
"""

from iif.task.data import Data, Streamed
from iif.task.inputs import Inputs
from iif.task.measurements import FunctionMeasurement, Logit, LogProb, Margin, TestLoss
from iif.task.task import IGNORE, KINDS, Recipe, Task

__all__ = ["IGNORE", "KINDS", "Data", "FunctionMeasurement", "Inputs", "LogProb", "Logit",
           "Margin", "Recipe", "Streamed", "Task", "TestLoss"]
