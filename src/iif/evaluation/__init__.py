"""Evaluation built in: LDS against retrained models, mislabel detection, datamodel ceiling.

- ``metrics``: LDS with its standard error, column Spearman, rank AUC, random subsets.
- ``retrain``: the LDS ground truth, many models retrained at once on the engine, cached.
- ``datamodel``: the linear datamodel that bounds what an additive attribution can reach.
- ``mislabel``: label flipping, mislabel AUC and the detection curve.

Imports: the ground floor, ``iif.task``, ``iif.engine`` and ``iif.results``; it sits beside the
methods and judges any scores, so it imports none of them.
"""

from iif.evaluation.datamodel import datamodel_lds, fit_datamodel, ridge_grid
from iif.evaluation.metrics import (
    LDSResult,
    auc,
    lds,
    random_subsets,
    spearman_columns,
    subset_predictions,
)
from iif.evaluation.mislabel import detection_curve, flip_labels, mislabel_auc
from iif.evaluation.retrain import (
    GroundTruth,
    RetrainDiverged,
    RetrainSettings,
    cache_key,
    ground_truth,
    model_seed,
    train_batch,
    train_one,
)

__all__ = [
    "GroundTruth",
    "LDSResult",
    "RetrainDiverged",
    "RetrainSettings",
    "auc",
    "cache_key",
    "datamodel_lds",
    "detection_curve",
    "fit_datamodel",
    "flip_labels",
    "ground_truth",
    "lds",
    "mislabel_auc",
    "model_seed",
    "random_subsets",
    "ridge_grid",
    "spearman_columns",
    "subset_predictions",
    "train_batch",
    "train_one",
]
