"""Evaluation built in: LDS against retrained models, mislabel detection, datamodel ceiling."""

from iif.evaluation.metrics import (
    LDSResult,
    auc,
    lds,
    random_subsets,
    spearman_columns,
    subset_predictions,
)

__all__ = ["LDSResult", "auc", "lds", "random_subsets", "spearman_columns",
           "subset_predictions"]
