"""Integrated Influence (paper Algorithm 1, DESIGN §2), composed from the engine's parts:

baseline -> target path -> path models -> features (u, psi, gamma) -> curvature solve ->
``I^(k)(i) = -(1/N) gamma^T C^{-1} psi_i`` accumulated over k = K..1.

Scores follow the project's sign convention: positive = including training sample i raises
the test loss. ``sum_i I(i)`` approximates ``L_test(theta*) - L_test(theta')`` (completeness),
reported per test sample with every result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from iif.engine.budget import MAX_COPIES
from iif.engine.curvature import KRONECKER_KINDS, CurvatureSettings, unprojected_only
from iif.engine.features import Bar
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.linalg import SOLVE_DTYPE, Solver, rows_times
from iif.engine.projection import IdentityProjector, ProjectionSettings, Projector, make_projector
from iif.engine.stacked import StackedState
from iif.engine.training import seeded
from iif.errors import InputError
from iif.methods.base import AttributionMethod, completeness_gap
from iif.methods.integrated.baseline import (
    Baseline,
    BaselineSettings,
    self_baseline_targets,
    unlearned_baselines,
)
from iif.methods.integrated.target_path import PathSettings, TargetPath, path_models
from iif.progress import progress_bar
from iif.results.attribution import Attribution
from iif.results.diagnostics import log_flags, trust_flags
from iif.task.data import take
from iif.task.task import Data, Task
from iif.validation import Limits

log = logging.getLogger(__name__)

# How each test sample's baseline ended (see iif.methods.integrated.baseline): reported in ``info``.
SOUND, TRUNCATED, FALLBACK = "sound", "truncated", "fallback"


def _report(solvers: list[Solver]) -> list[tuple[float, int]]:
    return [(s.damping, s.retries) for s in solvers]


def _status(base: Baseline) -> str:
    return FALLBACK if base.fell_back else TRUNCATED if base.truncated else SOUND


@dataclass
class Deltas:
    """The changes of the measurement (the test loss by default) that IIF's scores are
    compared with, per test sample: ``unlearn`` = m(theta*) - m(theta'), theta' the baseline
    model; ``path`` = m(theta*) - m(theta_0), theta_0 the model the target path ends at
    (trained from theta_1 on the baseline targets), NaN where the path trains no models."""

    unlearn: np.ndarray
    path: np.ndarray

    def mean(self) -> Deltas:
        """One row: the means (a group's baseline explains the group's mean loss)."""
        return Deltas(np.array([self.unlearn.mean()]), np.array([self.path.mean()]))

    def completeness(self, total: np.ndarray) -> dict[str, np.ndarray]:
        """``{"sum", "delta", "gap", "delta_path", "gap_path"}`` of scores summing to
        ``total`` per row: the gap against each change (:func:`completeness_gap`)."""
        return {"sum": total, "delta": self.unlearn,
                "gap": completeness_gap(total, self.unlearn),
                "delta_path": self.path, "gap_path": completeness_gap(total, self.path)}


@dataclass
class _PathResult:
    scores: np.ndarray  # (n_test, N)
    dampings: list[float]
    retries: int
    last_state: ModelState  # theta_1
    # theta_0 of each copy: the path's far end, trained from theta_1 on the baseline targets
    # (what the scores add up to); empty when the path trains no models (epochs = 0)
    path_end: list[ModelState] = dataclasses.field(default_factory=list)


class IntegratedInfluence(AttributionMethod):
    """Integrated Influence attributions for a trained model.

    Args:
        task: the model (in its trained state: theta*), target kind and training recipe.
        train_data: the data the model was trained on: ``(inputs, labels)``, a Dataset or a
            DataLoader (:mod:`iif.task.data`).
        baseline, path, projection, curvature: settings of each stage (defaults: a per-test
            unlearning baseline, one epoch with lam = 1; K = 3 one-epoch path models with
            sparse targets (per token for sequences); no projection; a damped empirical
            Fisher).
        test_batch: per-test baselines for this many test samples are trained together as
            stacked model copies sharing the minibatch order (``iif.engine.stacked``); the scores
            equal those of one test sample at a time. ``"auto"``: up to 32, as memory allows.
        models, chunk_size, seed, progress, max_feature_bytes: see
            :class:`iif.methods.base.AttributionMethod` (``models`` makes an ensemble).
    """

    method = "iif"
    KEYWORD_LIMITS: ClassVar[dict[str, Limits]] = {"test_batch": Limits(ge=1)}

    def __init__(
        self,
        task: Task,
        train_data: Any,
        *,
        baseline: BaselineSettings | None = None,
        path: PathSettings | None = None,
        projection: ProjectionSettings | None = None,
        curvature: CurvatureSettings | None = None,
        test_batch: int | Literal["auto"] = "auto",
        **common: Any,
    ):
        super().__init__(task, train_data, **common)
        test_batch = self._keyword("test_batch", test_batch)
        if test_batch not in ("auto", 1) and not self.engine.stacking().training:
            raise InputError("test_batch > 1 trains stacked model copies, which needs the "
                             "recipe's built-in 'sgd', 'adam' or 'adamw' and no BatchNorm "
                             "with momentum=None (a cumulative average); such a task runs "
                             "with test_batch=1")
        self.test_batch = test_batch
        self.baseline = self._keyword("baseline", baseline, default=BaselineSettings)
        self.path = self._keyword("path", path, default=PathSettings)
        self.projection = self._keyword("projection", projection, default=ProjectionSettings)
        self.curvature = self._keyword("curvature", curvature, default=CurvatureSettings)
        self._reset()
        self._mark_built()

    def _reset(self) -> None:
        kind = self.curvature.kind
        if kind in KRONECKER_KINDS and self.projection.dim is not None:
            raise unprojected_only(kind)
        super()._reset()
        # theta*'s solver on the real targets (the first path step of every test batch, and
        # every step for path_fit="once") and its per-sample gradients u* (_star_weights)
        self._star_solver: Solver | None = None
        self._star_u: torch.Tensor | None = None

    def _make_projector(self, fmodel: FunctionalModel) -> Projector:
        return make_projector(fmodel.num_params, self.projection, self.task.device,
                              self.task.dtype, fmodel)

    # ---- public API ----------------------------------------------------------------------
    def attribute(self, test_data: Any, baseline_targets: Any = None,
                  contrast: Any = None) -> Attribution:
        """Scores (n_test, n_train) for the test samples.

        ``baseline_targets`` (optional): explicit baseline targets for every training sample,
        shape (n_train, d) (probabilities for classification, values for regression) or
        (n_train,) class labels; one shared path then serves all test samples, and theta'
        for completeness is a model trained on the baseline dataset from theta_1.

        ``contrast`` (classification): "why the predicted class A and not class B?" B is a
        class index, one per test sample, or ``"runner-up"`` for the model's second choice.
        Each test sample's baseline model is trained towards B on it (``L_train +
        L_test(x, B) / lam``, the reinforce recipe), and the scores attribute the margin
        ``log p_A - log p_B``: **positive = the training sample pushes towards A** (the
        opposite orientation to loss scores, where positive raises the loss). Completeness
        compares their sum with ``margin(theta*) - margin(theta')``; ``info["contrast"]``
        holds A and B per test sample.
        """
        return super().attribute(test_data, baseline_targets=baseline_targets,
                                 contrast=contrast)

    def attribute_group(self, test_data: Any) -> Attribution:
        """One attribution for a group of test samples: a single baseline unlearns the
        group's mean test loss, and the scores, shape (1, n_train), attribute that mean loss
        (positive = including the training sample raises it); completeness is the group's.
        A group of one gives that sample's per-test scores."""
        self._validate_settings()
        test = self.validate_test(test_data)
        with self.engine.budget.spill():
            parts = [m._group(test) for m in self.members()]
        result = parts[0] if len(parts) == 1 else self._combine(parts)
        result.info["ensemble_size"] = len(parts)
        return result

    def _group(self, test: Data) -> Attribution:
        start = time.perf_counter()
        res, deltas, status = self._run(shared_baseline(self, test), len(test))
        scores = res.scores.mean(axis=0, keepdims=True)  # the gradient of a mean is the mean
        total = scores.sum(axis=1)
        fell_back, truncated = status[0] == FALLBACK, status[0] == TRUNCATED
        info = {"baseline_mode": "group", "group_size": len(test),
                "fallbacks": int(fell_back), "truncated": int(truncated),
                "fallback_tests": [0] if fell_back else [],
                "truncated_tests": [0] if truncated else [],
                "damping": res.dampings, "damping_retries": res.retries,
                "seconds": time.perf_counter() - start, "path_fit": self._path_fit()}
        completeness = deltas.mean().completeness(total)
        info["flags"] = trust_flags(completeness, info)  # row 0: the group
        log_flags(log, info["flags"], completeness, noun="group")
        return Attribution(scores, self.method, self.settings(), completeness, info)

    @contextlib.contextmanager
    def _per_test_generators(self) -> Iterator[tuple[torch.Generator, torch.Generator]]:
        """The global RNG (dropout) seeded, and the minibatch generators of the unlearning
        and of the path epochs, the same for every test sample."""
        with seeded(self.seed, self.task.device):
            yield (torch.Generator().manual_seed(self.seed),
                   torch.Generator().manual_seed(self.seed + 1))

    def _builder(self, test: Data, baseline_targets: Any, contrast: Any
                 ) -> tuple[str, Builder, dict[str, Any]]:
        """The mode's name, its baseline builder and what it adds to ``info``."""
        if contrast is not None:
            if baseline_targets is not None or self.baseline.mode == "shared":
                raise InputError("contrast uses one baseline per test sample: it does not "
                                 "combine with baseline_targets or a shared baseline")
            toward_b, margin, a, b = self._contrast(test, contrast)
            return "per-test contrast", contrast_baselines(self, toward_b, margin), {
                "contrast": {"A": a.tolist(), "B": b.tolist(),
                             "scores": "margin log p_A - log p_B; positive = pushes towards A"}}
        if baseline_targets is not None:
            return "explicit", explicit_baseline(self, test, baseline_targets), {}
        if self.baseline.mode == "shared":
            return "shared", shared_baseline(self, test, self.progress), {}
        return "per-test", per_test_baselines(self, test), {}

    def _attribute(self, test: Data, baseline_targets: Any = None,
                   contrast: Any = None) -> Attribution:
        start = time.perf_counter()
        mode, builder, extra_info = self._builder(test, baseline_targets, contrast)
        res, deltas, status = self._run(builder, len(test))
        total = res.scores.sum(axis=1)
        info = {
            "baseline_mode": mode,
            "fallbacks": int(np.sum(status == FALLBACK)),
            "fallback_tests": [int(i) for i in np.flatnonzero(status == FALLBACK)],
            "truncated": int(np.sum(status == TRUNCATED)),
            "truncated_tests": [int(i) for i in np.flatnonzero(status == TRUNCATED)],
            "damping": res.dampings,
            "damping_retries": res.retries,
            "seconds": time.perf_counter() - start,
            "path_fit": self._path_fit(),
            **extra_info,
        }
        completeness = deltas.completeness(total)
        # which test samples' answers cannot be trusted, and one warning naming them
        info["flags"] = trust_flags(completeness, info)
        log_flags(log, info["flags"], completeness)
        return Attribution(res.scores, self.method, self.settings(), completeness, info)

    def self_influence(self, indices: Any = None) -> np.ndarray:
        """Self-influence I_i(i) of training samples (default all), shape (n,).

        Uses per-sample baselines ``theta'_i = theta* + eta grad l_i`` (paper 3.3) and one
        shared path; each sample's own loss is the test loss. Mislabelled samples tend to
        have the most negative self-influence.
        """
        return super().self_influence(indices)

    def _self_influence(self, idx: np.ndarray) -> np.ndarray:
        res, _, _ = self._run(self_baselines(self, idx), idx.size)
        return res.scores

    def _settings(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.to_dict(),
            "path": self.path.to_dict(),
            "projection": self.projection.to_dict(),
            "projection_dim": self.projector.dim,  # the dimension used (see make_projector)
            "curvature": self.curvature.to_dict(),
            "test_batch": self.test_batch,
        }

    # ---- baseline modes (the builders are below the class) ----------------------------
    def _contrast(self, test: Data, contrast: Any) -> tuple[Data, Data, np.ndarray, np.ndarray]:
        """For "A and not B": the test samples with one-hot B targets (what the baselines are
        trained towards) and with targets e_B - e_A, whose soft cross-entropy is the margin
        ``log p_A - log p_B``; and A, B per test sample."""
        if self.task.kind != "classification" or self.task.loss is not None:
            raise InputError("contrast explains a class margin: it needs a classification "
                             "task with the built-in cross-entropy")
        n_cls = self.train.targets.shape[1]
        logits = self.engine.outputs(self.state, test.x)
        order = torch.argsort(logits, dim=1, descending=True)
        a = order[:, 0]
        if isinstance(contrast, str):
            if contrast != "runner-up":
                raise InputError(f"contrast must be a class index, one per test sample, or "
                                 f"'runner-up'; got {contrast!r}")
            b = order[:, 1]
        else:
            values = np.asarray(contrast)
            if values.ndim > 1 or not np.issubdtype(values.dtype, np.integer):
                raise InputError(f"contrast classes must be integers, got {contrast!r}")
            values = np.broadcast_to(values, (len(test),)) if values.ndim == 0 else values
            if values.shape != (len(test),):
                raise InputError(f"contrast needs one class per test sample ({len(test)}), "
                                 f"got {values.shape[0]}")
            if values.min() < 0 or values.max() >= n_cls:
                raise InputError(f"contrast classes out of range: found [{values.min()}, "
                                 f"{values.max()}], expected 0..{n_cls - 1}")
            b = torch.as_tensor(np.array(values), device=a.device).long()
        same = torch.nonzero(a == b).flatten().tolist()
        if same:
            raise InputError(f"contrast class equals the predicted class for test sample(s) "
                             f"{same[:5]}: 'why A and not A' has no answer")
        eye = torch.eye(n_cls, dtype=test.targets.dtype, device=test.targets.device)
        toward_b = Data(test.x, b, eye[b])
        margin = Data(test.x, a, eye[b] - eye[a])
        return toward_b, margin, a.cpu().numpy(), b.cpu().numpy()

    def store_chunk(self, n_test: int) -> int:
        """A batch of stacked test samples; all of them for a shared baseline."""
        if self.baseline.mode == "shared":
            return n_test
        return max(1, self._test_batch(n_test))

    def scores_test_set_as_one(self) -> bool:
        return self.baseline.mode == "shared"

    def shards_training_set(self) -> bool:
        """A shared baseline's path models serve every test sample."""
        return self.baseline.mode == "shared"

    def _test_batch(self, n_test: int) -> int:
        """Test samples per stacked batch: the setting, or for "auto" as many copies as the
        engine's budget allows (:meth:`~iif.engine.engine.Engine.copies_that_fit`) at what each copy
        adds: parameters, gradients and optimizer state, path targets, and its (N, P)
        features u and psi."""
        if self.test_batch != "auto":
            return min(int(self.test_batch), n_test)
        if not self.engine.stacking().training:
            return 1
        size = self.train.targets.element_size()
        if self._use_factored():
            # no (N, P) features, but each copy's rows of the shared first step, its paired
            # products and the factors of its own solves: measured at about 0.23 GiB per
            # copy on the MNIST MLP at N = 5,000, 3 float64 layer factors; 4 leaves room
            widths = sum(layer.in_features + 1 + layer.out_features
                         for layer in self.engine.linear_layers() or [])
            features = 4 * len(self.train) * widths * 8 // size
        else:
            features = 2 * len(self.train) * self.projector.dim
        per_copy = size * (5 * self.engine.num_params + 3 * self.train.targets.numel()
                           + features)
        return self.engine.copies_that_fit(per_copy, min(MAX_COPIES, n_test))

    # ---- the integral --------------------------------------------------------------------
    def _run(self, batches: Builder, n_test: int
             ) -> tuple[_PathResult, Deltas, np.ndarray]:
        """Every batch of a baseline builder through the integration loop: scores (n_test,
        N) (or (n_test,) for paired batches), the measurement's changes to theta' and to
        theta_0 (:class:`Deltas`) and the baselines' status per row."""
        scores: np.ndarray | None = None
        deltas = np.zeros(n_test)
        path_deltas = np.full(n_test, np.nan)
        status = np.full(n_test, SOUND, dtype=object)
        dampings: list[float] = []
        retries = 0
        for batch in batches:
            res = self._integrate(batch)
            if scores is None:
                scores = np.zeros((n_test, *res.scores.shape[1:]))
            scores[batch.rows] = res.scores
            primes = (res.path_end or [res.last_state]) if batch.end_is_baseline else \
                batch.theta_prime(res.last_state)
            self._deltas_into(deltas, batch, primes)
            self._deltas_into(path_deltas, batch, res.path_end)
            if batch.status is not None:
                status[batch.rows] = batch.status
            dampings += res.dampings
            retries += res.retries
        res = _PathResult(scores, dampings, retries, self.state)
        return res, Deltas(deltas, path_deltas), status

    def _deltas_into(self, deltas: np.ndarray, batch: BaselineBatch,
                     models: list[ModelState]) -> None:
        """``deltas[rows]`` = m(theta*) - m(model) of the batch's rows: one model for every
        row, or one per row (none: left as they are)."""
        if len(models) == 1:
            deltas[batch.rows] = self._delta(batch.test, models[0])
        elif models:
            for j, (row, model) in enumerate(zip(batch.rows, models, strict=True)):
                deltas[row] = self._delta(batch.test.subset([j]), model)[0]

    def _integrate(self, batch: BaselineBatch) -> _PathResult:
        """Scores along the paths of B model copies from theta* to the baseline targets
        ``batch.ybar`` (B, N, d): (n_test, N), one copy explaining every test sample or B =
        n_test copies, copy b test sample b; (n_test,) for ``batch.pairs``."""
        copies = len(batch.ybar)
        ybar = batch.ybar[0] if copies == 1 else batch.ybar
        path = TargetPath(self.task, self.train.targets, ybar, self.path.steps, self.path.sparse)
        start = self.state if copies == 1 else StackedState.repeat(self.state, copies)
        shape = (len(batch.test),) if batch.pairs is not None else \
            (len(batch.test), len(self.train))
        scores = torch.zeros(shape, dtype=SOLVE_DTYPE, device=self.task.device)
        # (damping, retries) of every solve: the solvers themselves hold their factors and
        # kernels (an N x N matrix per copy and step), so they are not kept
        used: list[tuple[float, int]] = []
        state = start
        steps = path_models(self.engine.fit, start, self.engine.train.x, path, self.path,
                            batch.generator)
        for k, state in progress_bar(steps, total=path.steps, desc="IIF path steps",
                                     enable=self.progress):
            if batch.pairs is not None:
                used += _report([self._paired_step(state, batch, path(k), path(k - 1), k,
                                                   scores)])
            else:
                used += self._step(state, batch.test, path(k), path(k - 1), k, scores)
        if self.sharding is not None and copies == 1 and batch.pairs is None:
            scores = self.engine.reduce(scores)  # every process filled its own columns
        end = [] if batch.pairs is not None else \
            self._path_end(state, path, batch.generator, batch.end_is_baseline)
        return _PathResult(scores.cpu().numpy(), [d for d, _ in used],
                           sum(r for _, r in used), state, end)

    def _path_end(self, last: ModelState | StackedState, path: TargetPath,
                  generator: torch.Generator, needed: bool = False) -> list[ModelState]:
        """theta_0 of each copy: the path's next model, trained from theta_1 on the baseline
        targets ``path(0)`` as every path model is trained (same epochs, learning rate and
        minibatch order). The scores of the K steps add up to m(theta*) - m(theta_0) to first
        order. None when the path trains no models (epochs = 0: every point is theta*) or
        ``measure_end`` is off and the end is not ``needed`` (as theta')."""
        if self.path.epochs == 0 or not (self.path.measure_end or needed):
            return []
        results = self.engine.fit(last, self.engine.train.x, path(0), epochs=self.path.epochs,
                                  lr=self.path.lr, batch_size=self.path.batch_size,
                                  generator=generator)
        return [r.state for r in results]

    def _paired_step(self, state: ModelState, batch: BaselineBatch, rho: torch.Tensor,
                     rho_prev: torch.Tensor, k: int, scores: torch.Tensor) -> Solver:
        """Path step k scoring test row j against training sample ``batch.pairs[j]`` only,
        in chunks (self-influence: I_i(i) without the (n, N) matrix)."""
        _, psi, solver = self._features(state, rho, rho_prev, k)
        grads = self.engine.loss_features(state, batch.test.x, batch.test.targets)
        chunk = self.engine.budget.chunk_size
        for lo in range(0, len(batch.test), chunk):
            hi = lo + chunk
            sol = solver.solve(grads[lo:hi].T)  # (P, c)
            rows = psi[batch.pairs[lo:hi]].to(SOLVE_DTYPE)
            scores[lo:hi] -= (rows * sol.T).sum(1).to(scores.device) / len(self.train)
        return solver

    def _step(self, state: ModelState | StackedState, test: Data, rho: torch.Tensor,
              rho_prev: torch.Tensor, k: int, scores: torch.Tensor) -> list[tuple[float, int]]:
        """Path step k of B copies: subtract I^(k) = (1/N) gamma^T C^{-1} psi_i from
        ``scores`` in place; returns (damping, retries) of the solves. One copy (a ModelState)
        explains every test sample; B copies (a StackedState, ``rho`` (B, N, d)) one each:
        at k = K all still theta* (one featurisation), later in B-wide products when the
        Kronecker fast path applies, else copy by copy."""
        if isinstance(state, ModelState):
            return _report([self._copy_step(state, test, rho, rho_prev, k, scores)])
        if k == self.path.steps:
            return _report([self._theta_star_step(test, rho[0], rho_prev, k, scores)])
        if self._stackable(len(state)):
            return _report(self._vmapped_step(state, test, rho, rho_prev, scores))
        return [(s.damping, s.retries) for s in
                (self._copy_step(member, test.subset([b]), rho[b], rho_prev[b], k,
                                 scores[b : b + 1])
                 for b, member in enumerate(state.members()))]

    def _factored_applies(self) -> bool:
        # exact gradients: no projection, or one at least as wide as the model (make_projector)
        return self.engine.factored_applies(isinstance(self.projector, IdentityProjector),
                                            self.curvature.kind)

    def _use_factored(self) -> bool:
        # the factored steps fit their own solves at every path model
        return self.curvature.path_fit != "once" and self._factored_applies()

    def _factored_step(self, state: ModelState, test_x: torch.Tensor,
                       test_targets: torch.Tensor, rho: torch.Tensor,
                       rho_prev: torch.Tensor) -> tuple[torch.Tensor, Solver]:
        """I^(k) (n_test, N) from layer factors; ``rho_prev`` (B, N, d) pairs test b with
        path b (the shared first step of stacked paths)."""
        return self.engine.factored_step_scores(self.curvature, state, rho, rho_prev, test_x,
                                                test_targets)

    def _copy_step(self, state: ModelState, test: Data, rho: torch.Tensor,
                   rho_prev: torch.Tensor, k: int, scores: torch.Tensor) -> Solver:
        """One copy's path explaining every row of ``test`` (``scores`` (n_test, N), a view
        for one copy of many); under sharding, this process's training block."""
        if self._use_factored():
            step, solver = self._factored_step(state, test.x, test.targets, rho, rho_prev)
            scores += step.to(scores.device)
            return solver
        block = self.engine.train_block()
        _, psi, solver = self._features(state, rho, rho_prev, k,
                                        None if self.sharding is None else block)
        gamma = self.engine.test_features(state, test.x, test.targets)
        sol = solver.solve(gamma.T)  # (P, n_test)
        scores[:, block] -= rows_times(psi, sol).T / len(self.train)
        return solver

    def _theta_star_step(self, test: Data, rho: torch.Tensor, rho_prev: torch.Tensor, k: int,
                         scores: torch.Tensor) -> Solver:
        """Every copy is still theta* with the real targets ``rho``: one featurisation (the
        loss gradient and the B copies' psi from ``rho_prev`` (B, N, d)) and one curvature."""
        if self._use_factored():
            step, solver = self._factored_step(self.state, test.x, test.targets, rho, rho_prev)
            scores += step.to(scores.device)
            return solver
        _, psi, solver = self._features(self.state, rho, rho_prev, k)
        gamma = self.engine.test_features(self.state, test.x, test.targets)
        sol = solver.solve(gamma.T).to(SOLVE_DTYPE)  # (P, B)
        for b in range(len(test)):
            scores[b] -= rows_times(psi[:, b], sol[:, b : b + 1])[:, 0] / len(self.train)
        return solver

    def _vmapped_step(self, state: StackedState, test: Data, rho: torch.Tensor,
                      rho_prev: torch.Tensor, scores: torch.Tensor) -> list[Solver]:
        """Copy b at theta_k^b explains test sample b, features of all copies in B-wide
        products (the Kronecker fast path)."""
        n = len(self.train)
        u, psi = self.engine.step_features(state, self.train.x, rho, rho_prev, progress=False)
        gamma = self.engine.test_features(state, test.x[:, None], test.targets[:, None])
        solvers = ([self._theta_star_solver()] * len(state) if self._fits_once() else
                   self.engine.fit_curvature(self.curvature, state, self.train.x, rho, u))
        for b, solver in enumerate(solvers):
            scores[b] -= rows_times(psi[b], solver.solve(gamma[b].T))[:, 0] / n
        return solvers

    def _stackable(self, copies: int) -> bool:
        """Whether B copies' path features can be computed together: the engine's
        :meth:`~iif.engine.engine.Engine.stacks_path_features`."""
        return self.engine.stacks_path_features(copies)

    def _features(self, state: ModelState, rho: torch.Tensor, rho_prev: torch.Tensor, k: int,
                  part: slice | None = None):
        """Features u (N, P), psi (N, P), or (N, B, P) for B previous targets (B, N, d), and
        the curvature solver at path point k. ``part``: only these training samples'
        features, the curvature summed with the other processes' parts (``self.sharding``)."""
        x = self.train.x
        reduce = None
        if part is not None:
            x, rho, rho_prev = take(x, part), rho[part], rho_prev[part]
            reduce = self.engine.reduce
        first = k == self.path.steps  # theta* on the real targets, whatever the test sample
        weights = self._star_weights(rho, rho_prev) if first and part is None else None
        if weights is not None:
            u = self._theta_star_gradients(rho)
            psi = weights[..., None] * (u if weights.dim() == 1 else u[:, None])
        else:
            u, psi = self.engine.step_features(state, x, rho, rho_prev,
                                               progress=self.progress, desc=f"features k={k}")
        if self._star_solver is not None and (first or self._fits_once()):
            return u, psi, self._star_solver
        solver = self.engine.fit_curvature(self.curvature, state, x, rho, u, reduce=reduce)
        if first:  # theta*'s solver serves every test batch (and, fitted once, every step)
            self._star_solver = solver
        return u, psi, solver

    def _star_weights(self, rho: torch.Tensor, rho_prev: torch.Tensor) -> torch.Tensor | None:
        """w with ``rho - rho_prev = w * rho`` row by row ((N,) or (N, B) for B previous
        targets (B, N, d)), when the first step's psi is ``w_i u*_i``: the built-in
        cross-entropy is linear in its targets, so psi_i = grad l(x_i, rho_i - rho_prev_i) =
        w_i grad l(x_i, rho_i) = w_i u*_i, with u* the per-sample gradients at theta* on the
        real targets, the same for every test sample (kept: :meth:`_theta_star_gradients`).
        This holds for one-hot labels on sparse paths (only the true class moves), and for
        sequences whose tokens move together (one labelled position); None otherwise (dense
        paths, soft labels, longer sequences, a custom loss), or when u* does not fit the
        feature budget beside a step's features."""
        task = self.task
        if task.loss is not None or task.kind not in ("classification", "sequence"):
            return None
        n, p = len(self.train), self.projector.dim
        if not self.engine.budget.holds(3 * n * p * self.train.targets.element_size()):
            return None
        mass = rho.sum(-1)
        if not bool((mass > 0).all()):
            return None
        delta = rho - rho_prev  # (N, d) or (B, N, d)
        w = delta.sum(-1) / mass
        if not torch.equal(delta, w[..., None] * rho):
            return None
        return w if w.dim() == 1 else w.T

    def _theta_star_gradients(self, rho: torch.Tensor) -> torch.Tensor:
        """u*: the per-sample gradients (N, P) at theta* on the real targets ``rho``, computed
        at the first call and kept for every later test batch."""
        if self._star_u is None:
            self._star_u = self.engine.loss_features(
                self.state, self.train.x, rho,
                what=Bar(self.progress, f"features k={self.path.steps}"))
        return self._star_u

    def _path_fit(self) -> str:
        """What ``path_fit`` resolved to: "each" or "once" (reported in ``info``)."""
        return "once" if self._fits_once() else "each"

    def _fits_once(self) -> bool:
        """Whether theta*'s solver serves every path step (``CurvatureSettings.path_fit``)."""
        fit = self.curvature.path_fit
        return fit == "once" or (fit == "auto" and not self._factored_applies())

    def _theta_star_solver(self) -> Solver:
        """theta*'s solver on the real targets, fitted at the first path step (k = K) of the
        first test batch and shared by every later step and batch."""
        assert self._star_solver is not None, "the first path step fits it"
        return self._star_solver

    def _delta(self, test: Data, theta_prime: ModelState) -> np.ndarray:
        """m(theta*) - m(theta') per test sample: the change of the measurement (the test
        loss by default) that the scores add up to."""
        def losses(state: ModelState) -> torch.Tensor:
            return self.task.measure(self.engine.outputs(state, test.x), test.targets)

        return (losses(self.state) - losses(theta_prime)).double().cpu().numpy()

    def _baseline_targets(self, targets: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor)
                            else targets.detach())
        n, d = self.train.targets.shape
        if self.task.kind == "classification" and t.ndim == 1:
            if t.is_floating_point() or int(t.min()) < 0 or int(t.max()) >= d:
                raise InputError(f"baseline labels must be integers in 0..{d - 1}")
            t = torch.nn.functional.one_hot(t.long(), d)
        t = t.reshape(t.shape[0], -1) if t.ndim == 1 else t
        if tuple(t.shape) != (n, d):
            raise InputError(
                f"baseline targets must have shape ({n}, {d}) (or ({n},) labels), "
                f"got {tuple(t.shape)}"
            )
        t = t.to(self.task.device, self.task.dtype)
        if not bool(torch.isfinite(t).all()):
            raise InputError("baseline targets contain NaN or inf")
        return t


# ---- baseline builders -------------------------------------------------------------------
# Each IIF mode is a builder: it yields BaselineBatch-es, each one run of the integration
# loop (IntegratedInfluence._integrate), which knows nothing of modes. A builder may hold a
# context (the seeded global RNG) around its yield: the loop runs inside it.


@dataclass
class BaselineBatch:
    """What one run of the integration loop starts from and measures.

    ``ybar`` (B, N, d): the baseline targets of B >= 1 model copies, whose paths start at
    theta* (copy b = ybar[b]); ``test``: the samples and targets the scores are measured on
    (B = 1: one copy explains every row; else copy b row b); ``rows``: where they sit in the
    attributed test data; ``generator``: the path epochs' minibatch order; ``theta_prime``:
    given the loop's last state theta_1, the baseline models theta' for completeness (one
    shared by every row, or one per row); ``status``: how each row's baseline ended;
    ``pairs``: score row j against training sample ``pairs[j]`` only (self-influence), giving
    scores (n_test,) instead of (n_test, N); ``end_is_baseline``: theta' is the path's end
    theta_0 (``theta_prime`` is then not called), trained whatever
    ``PathSettings.measure_end`` says.
    """

    ybar: torch.Tensor
    test: Data
    rows: np.ndarray
    generator: torch.Generator
    theta_prime: Callable[[ModelState | StackedState], list[ModelState]] = lambda _: []
    status: np.ndarray | None = None
    pairs: torch.Tensor | None = None
    end_is_baseline: bool = False  # theta' is the path's end theta_0 (explicit targets)


Builder = Iterator[BaselineBatch]


def per_test_baselines(m: IntegratedInfluence, test: Data, unlearn: Data | None = None,
                       settings: BaselineSettings | None = None) -> Builder:
    """One unlearning baseline per test sample (the paper's), B = test_batch at a time as
    stacked copies. Every test sample sees the same minibatch orders, so the scores equal
    those of one test sample at a time. ``unlearn``: the samples with the targets their
    baselines are trained on, and ``settings`` how, when these differ from the scored ones
    and ``m.baseline`` (contrast)."""
    unlearn = test if unlearn is None else unlearn
    settings = m.baseline if settings is None else settings
    size = m._test_batch(len(test))
    batches = [np.arange(lo, min(lo + size, len(test))) for lo in range(0, len(test), size)]
    for rows in progress_bar(batches, total=len(test), desc="IIF test samples",
                             enable=m.progress, size=len):
        with m._per_test_generators() as (unlearn_gen, path_gen):
            bases = unlearned_baselines(m.engine, [unlearn.subset([r]) for r in rows], settings,
                                     unlearn_gen, rows=[[r] for r in rows])
            yield BaselineBatch(torch.stack([b.targets for b in bases]), test.subset(rows),
                                rows, path_gen, lambda _, bases=bases: [b.state for b in bases],
                                np.array([_status(b) for b in bases], dtype=object))


def contrast_baselines(m: IntegratedInfluence, toward_b: Data, margin: Data) -> Builder:
    """"Why A and not B": per-test baselines trained towards B (``toward_b``, the reinforce
    recipe), scoring the margin ``log p_A - log p_B`` (``margin``: see ``_contrast``)."""
    return per_test_baselines(m, margin, toward_b,
                              dataclasses.replace(m.baseline, direction="reinforce"))


def shared_baseline(m: IntegratedInfluence, test: Data, progress: bool | None = False
                    ) -> Builder:
    """One baseline unlearning the mean loss of ``test`` and its path, scoring every row,
    with the generators every per-test baseline uses (a shared baseline of one test sample
    is its per-test one)."""
    with m._per_test_generators() as (unlearn_gen, path_gen):
        (base,) = unlearned_baselines(m.engine, [test], m.baseline, unlearn_gen, progress,
                                   rows=[range(len(test))])
        yield BaselineBatch(base.targets[None], test, np.arange(len(test)), path_gen,
                            lambda _: [base.state],
                            np.full(len(test), _status(base), dtype=object))


def explicit_baseline(m: IntegratedInfluence, test: Data, targets: Any) -> Builder:
    """Explicit baseline targets of every training sample: one path for all test samples;
    theta' for completeness is the baseline dataset's model, continued from theta_1."""
    ybar = m._baseline_targets(targets)
    with seeded(m.seed, m.task.device):
        gen = torch.Generator().manual_seed(m.seed)

        # theta' is the baseline dataset's model: the path's end (theta_1 if it trains none)
        yield BaselineBatch(ybar[None], test, np.arange(len(test)), gen, end_is_baseline=True)


def self_baselines(m: IntegratedInfluence, idx: np.ndarray) -> Builder:
    """Self-influence: per-sample baselines ``theta'_i = theta* + eta grad l_i`` (paper 3.3)
    as one shared path; training sample i is its own test sample, scored against itself."""
    step = m.task.recipe.lr if m.baseline.self_step is None else m.baseline.self_step
    with seeded(m.seed, m.task.device):
        e = m.engine
        ybar = self_baseline_targets(e.task, e.fmodel, e.state, e.train, step,
                                     e.budget.chunk_size)
        gen = torch.Generator().manual_seed(m.seed)
        tidx = torch.as_tensor(idx, device=m.train.x.device)
        yield BaselineBatch(ybar[None], m.train.subset(tidx), np.arange(idx.size), gen,
                            pairs=tidx)
