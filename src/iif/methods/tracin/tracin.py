"""TracIn (Pruthi et al. 2020, TracInCP): gradient products summed over training checkpoints.

For checkpoints theta_c with learning rates lr_c and per-sample loss gradients
``g_i(theta) = grad_theta l(f(x_i; theta), y_i)`` (the task's loss and targets, in eval mode):

    scores[s, i] = - sum_c lr_c * g_s(theta_c)^T g_i(theta_c)

in the project's sign convention: positive = including training sample i raises the loss of
test sample s (an opponent); negative = it lowers it (a proponent). This is minus the original
TracIn score. With a projection A (``ProjectionSettings(dim=P)``, one seeded A for every
checkpoint) the gradients are replaced by ``A^T g``.

Like TracInCP, the scores carry no 1/batch_size factor (nor one for the steps between two
checkpoints): an SGD step on a minibatch of size b moves the test loss by about
``-(lr / b) g_s^T g_i`` per sample, so the scores are that first-order change times b (and
times the number of steps the checkpoint stands for). The factor is the same for every pair,
so rankings and rank correlations (LDS) are unaffected, but the magnitudes are not loss
changes. With momentum or Adam the learning-rate weighting is the usual approximation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from iif.engine.functional import FunctionalModel
from iif.engine.projection import ProjectionSettings, Projector, make_projector
from iif.errors import InputError
from iif.methods.base import AttributionMethod
from iif.methods.estimator import KernelEstimator, identity, weighted_sum
from iif.methods.tracin.checkpoints import Checkpoint
from iif.progress import progress_bar
from iif.results.attribution import Attribution
from iif.results.runkey import file_digest, tensor_digest, text_digest
from iif.task.task import Data, Task


class TracIn(AttributionMethod):
    """TracIn attributions from the checkpoints of one training run.

    Args:
        task: the model (its architecture; the checkpoints supply the parameters), target
            kind and training recipe.
        train_data: ``(inputs, labels)`` the model was trained on.
        checkpoints: the run's checkpoints (non-empty), e.g. from
            :func:`iif.methods.tracin.checkpoints.train_with_checkpoints` or
            :func:`iif.methods.tracin.checkpoints.load_checkpoints`; or a list of such lists, one
            per independent training run: an ensemble, whose scores are the mean over the runs.
            Each checkpoint counts once in a run: one listed twice (the same file, or the same
            parameters and buffers) is refused.
        projection: optional seeded random projection of the gradients (default: exact).
        chunk_size, seed, progress, max_feature_bytes: see
            :class:`iif.methods.base.AttributionMethod`.

    Ensembles: every model of an ensemble has checkpoints of its own, so ``models=`` is not
    accepted; pass the runs' checkpoint lists as ``checkpoints=[run_1, run_2, ...]``.

    Memory: training gradients are computed and consumed ``chunk_size`` samples at a time for
    one checkpoint at a time; only the test gradients of the current checkpoint, (n_test, P),
    and the scores, (n_test, N), are held.
    """

    method = "tracin"

    def __init__(
        self,
        task: Task,
        train_data: Any,
        *,
        checkpoints: Sequence[Checkpoint] | None = None,
        projection: ProjectionSettings | None = None,
        **common: Any,
    ):
        if common.get("models") is not None:
            raise InputError(
                "TracIn does not take models=: each model of an ensemble needs the checkpoints "
                "of its own training run; pass checkpoints=[run_1, run_2, ...], one list per "
                "run (one TracIn per run, averaged)."
            )
        super().__init__(task, train_data, **common)
        if (isinstance(checkpoints, Sequence) and checkpoints
                and not isinstance(checkpoints[0], Checkpoint)
                and isinstance(checkpoints[0], Sequence)):
            self.runs = [_check_checkpoints(run) for run in checkpoints]
        else:
            self.runs = [_check_checkpoints(checkpoints)]
        self.checkpoints = self.runs[0]
        nested = len(self.runs) > 1
        for r, run in enumerate(self.runs):
            _refuse_duplicates(run, self.fmodel, f"checkpoints[{r}]" if nested else "checkpoints")
        self.projection = self._keyword("projection", projection, default=ProjectionSettings)
        self._reset()
        self._mark_built()

    def _make_projector(self, fmodel: FunctionalModel) -> Projector:
        return make_projector(fmodel.num_params, self.projection, self.task.device,
                              self.task.dtype, fmodel)

    # ---- public API ----------------------------------------------------------------------
    def attribute(self, test_data: Any) -> Attribution:
        """Scores (n_test, n_train): ``-sum_c lr_c g_test(theta_c)^T g_i(theta_c)``; positive =
        including the training sample raises the test loss."""
        return super().attribute(test_data)

    def self_influence(self, indices: Any = None) -> np.ndarray:
        """Self-influence ``-sum_c lr_c |g_i(theta_c)|^2`` of training samples (default all),
        shape (n,), projected gradients if a projection is set. Always <= 0; the most negative
        are the samples whose gradients stay large along training, often mislabelled ones."""
        return super().self_influence(indices)

    def _attribute(self, test: Data) -> Attribution:
        start = time.perf_counter()
        scores = weighted_sum(
            (ckpt.lr, est.products(est.test_features(test.x, test.targets)))
            for ckpt, est in self._estimators())
        info = {
            "checkpoints": len(self.checkpoints),
            "epochs": [c.epoch for c in self.checkpoints],
            "seconds": time.perf_counter() - start,
        }
        return Attribution(scores.cpu().numpy(), self.method, self.settings(), None, info)

    def _self_influence(self, idx: np.ndarray) -> np.ndarray:
        return weighted_sum((ckpt.lr, est.self_products(idx))
                            for ckpt, est in self._estimators()).cpu().numpy()

    def _settings(self) -> dict[str, Any]:
        runs = [[{"epoch": c.epoch, "lr": c.lr, "path": None if c.path is None else str(c.path)}
                 for c in run] for run in self.runs]
        return {
            "projection": self.projection.to_dict(),
            "projection_dim": self.projector.dim,  # the dimension used (see make_projector)
            "checkpoints": runs[0] if len(runs) == 1 else runs,
        }

    def key_parts(self) -> dict[str, str]:
        """The checkpoints' contents (file bytes or in-memory tensors), not their paths."""
        digests = []
        for run in self.runs:
            for c in run:
                if c.path is not None:
                    try:
                        digests.append(file_digest(c.path, "a checkpoint"))
                    except OSError as exc:
                        raise InputError(f"{c.describe()} cannot be read: {exc}") from None
                else:
                    digests.append(tensor_digest(list(c.state.params.values())
                                                 + list(c.state.buffers.values())))
        return {"checkpoints": text_digest(" ".join(digests))}

    def members(self) -> list[AttributionMethod]:
        """One TracIn per training run (self for one run)."""
        if self._members is None:
            self._members = [self] if len(self.runs) == 1 else [
                self._for_run(run) for run in self.runs]
        return self._members

    def _for_run(self, run: list[Checkpoint]) -> TracIn:
        member = copy.copy(self)
        member.runs, member.checkpoints, member._members = [run], run, [member]
        return member

    # ---- helpers -------------------------------------------------------------------------
    def _estimators(self) -> Iterator[tuple[Checkpoint, KernelEstimator]]:
        """Each checkpoint with its estimator: projected per-sample loss gradients at the
        checkpoint, recomputed chunk by chunk, and the identity solve."""
        for c in progress_bar(self.checkpoints, total=len(self.checkpoints),
                              desc="TracIn checkpoints", enable=self.progress):
            state = c.load(self.fmodel)
            yield c, KernelEstimator(self.engine, partial(self.engine.loss_features, state),
                                     identity,
                                     test_featurise=partial(self.engine.test_features, state))


def _refuse_duplicates(run: list[Checkpoint], fmodel: FunctionalModel, name: str) -> None:
    """Load every checkpoint of one run (a misfit one fails now, not halfway through) and
    refuse one listed twice: the same file (after resolving the path) or the same parameters
    and buffers, which would count twice in the sum. Runs of an ensemble may share one (a
    common start)."""
    files: dict[Path, int] = {}
    contents: dict[str, int] = {}
    for i, c in enumerate(run):
        state = c.load(fmodel)
        if c.path is not None:
            resolved = c.path.resolve()
            if resolved in files:
                j = files[resolved]
                raise InputError(f"{name}[{i}] ({c.describe()}) is the same file as {name}[{j}] "
                                 f"({run[j].describe()}); list each checkpoint once")
            files[resolved] = i
        digest = tensor_digest([*state.params.values(), *state.buffers.values()])
        if digest in contents:
            j = contents[digest]
            raise InputError(f"{name}[{i}] ({c.describe()}) holds the same parameters and buffers "
                             f"as {name}[{j}] ({run[j].describe()}); list each checkpoint once")
        contents[digest] = i


def _check_checkpoints(checkpoints: Sequence[Checkpoint] | None) -> list[Checkpoint]:
    if checkpoints is None:
        raise InputError(
            "TracIn needs checkpoints=[...] of the training run (see "
            "iif.methods.tracin.checkpoints.train_with_checkpoints and load_checkpoints)"
        )
    if isinstance(checkpoints, Checkpoint):
        checkpoints = [checkpoints]
    try:
        checkpoints = list(checkpoints)
    except TypeError as exc:
        raise InputError(
            f"checkpoints must be a list of Checkpoint, got {type(checkpoints).__name__}"
        ) from exc
    if not checkpoints:
        raise InputError("checkpoints is empty: TracIn needs at least one checkpoint")
    for i, c in enumerate(checkpoints):
        if not isinstance(c, Checkpoint):
            raise InputError(f"checkpoints[{i}] is a {type(c).__name__}, not a Checkpoint")
    return checkpoints
