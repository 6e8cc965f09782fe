"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") on the engine's
per-sample Jacobians, projection and damped Gram solves, with ensembles over several models.

Per model m (at its trained parameters theta_m), with ``g(x) = grad_theta f(x; theta_m)`` the
parameter gradient of a scalar model-output function f and ``A`` the seeded projection:

- features ``phi_i = A^T g(x_i)`` (N, P) for the training set, ``phi_s`` for test samples;
- kernel ``K_m = (Phi_m^T D_m Phi_m + lambda I)^{-1}`` (P, P), never formed: a Cholesky or
  Woodbury solve in float64 (``iif.engine.curvature.gram_solver`` on ``iif.engine.linalg``);
- output-to-loss weights ``w_i = -dl_i/df_i`` (N,), TRAK's Q;
- test orientation ``c_s = -dl_s/df_s`` (regression) or 1 (classification).

The ensemble estimator averages the kernel part and the weights *separately* (TRAK, Eq. 10):
``tau(s, i) = [mean_m c_s,m phi_s,m^T K_m phi_i,m] * [mean_m w_i,m]`` and
``scores[s, i] = -tau(s, i)``: positive = including training sample i raises the loss of test
sample s, the project's sign convention. (TRAK's own tau > 0 means i raises the test margin.)

Derivation (one Gauss-Newton step on the linearised model). Linearise
``f(x; theta) ~ f(x; theta_m) + g(x)^T (theta - theta_m)`` and let the training objective be
``sum_j l(f_j, y_j)``. Dropping sample i and taking one Newton step from theta_m gives
``theta_{-i} - theta_m ~ H^{-1} grad_theta l_i = H^{-1} g_i l'_i`` with ``l'_i = dl_i/df_i`` and
the Gauss-Newton matrix ``H = sum_j l''_j g_j g_j^T = G^T D G``, ``D = diag(l''_j)``. Including
i therefore moves the test output by ``g_s^T H^{-1} g_i w_i`` (``w_i = -l'_i``), and the test
loss by ``l'_s`` times that, i.e. by ``-c_s g_s^T H^{-1} g_i w_i``. Projecting gives the
formula above, with damping ``lambda``. The training loss being a mean or a sum does not
matter: theta_{-i} minimises the same objective either way.

- Classification: f is the margin ``log p_y - log(1 - p_y) = z_y - logsumexp_{c != y} z_c``
  (computed from the logits z), for which cross-entropy is ``l = log(1 + exp(-f))``, so
  ``w_i = 1 / (1 + exp(f_i)) = 1 - p_{i,y_i}``. As in TRAK, ``D = diag(p(1 - p))`` is replaced
  by the identity and the test side is not weighted (``c_s = 1 - p_s > 0`` would rescale a
  test sample's scores without changing their order).
- Regression (one output): f is the output itself; ``D = diag(l''_j)`` is kept (the constant 2
  for the default squared error ``l = (f - y)^2``), so ``K = (2 Phi^T Phi + lambda I)^{-1}``,
  ``w_i = 2 (y_i - f_i)``, ``c_s = 2 (y_s - f_s)``. Without projection and with lambda -> 0 the
  score is then the first-order estimate of ``L_s(with i) - L_s(without i)`` (for least
  squares: the leave-one-out change without the leverage factor ``1 / (1 - h_ii)``).
  Multi-output regression is not supported.

Projection: ``ProjectionSettings(dim=P)`` (default P = 2048). When P >= M (the number of
parameters) or ``dim=None`` the gradients are used as they are (P = M): a random projection to
at least as many dimensions as parameters cannot add information, only noise and cost. The same
projection (seeded by ``ProjectionSettings.seed``) serves every model of an ensemble.

Damping: ``damping=None`` sets lambda to 0.1 (``DEFAULT_DAMPING_RATIO``) times the
mean eigenvalue of ``Phi^T D Phi`` over its rank bound ``min(N, P, M)``; an explicit
``damping >= 0`` is used as it is (TRAK's own default is 0, fine when N >> P). A kernel that
does not factor is retried with more damping, reported in ``info``.

One model: its scores are noisy on non-convex models (a small CNN: about a third of the top
proponents share the test sample's label, against four fifths for IIF), as TRAK's paper finds;
an ensemble of independently trained models (``models=[...]``) averages the noise out. A run
with one model says so once in the log and in ``info["note"]``.

Memory: training features ``Phi_m`` (N, P) are kept in the model's dtype, with the weights and
the solver, per model, so that repeated ``attribute`` calls reuse them; solves run in float64.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from iif.engine.curvature import CurvatureSettings, gram_solver
from iif.engine.functional import FunctionalModel
from iif.engine.linalg import SOLVE_DTYPE, Solver
from iif.engine.projection import IdentityProjector, ProjectionSettings, Projector, make_projector
from iif.errors import InputError
from iif.methods.base import AttributionMethod
from iif.methods.estimator import KernelEstimator, ensemble_scores
from iif.methods.trak.outputs import ModelOutput, check_output, default_output
from iif.results.attribution import Attribution
from iif.results.fitted import FittedState, load_solver, merged, solver_state
from iif.task.data import take
from iif.task.task import Data, Task
from iif.validation import Limits

DEFAULT_PROJECTION_DIM = 2048
# kept at the ratio it was tuned with; CurvatureSettings moved to 0.3 for IF and IIF
DEFAULT_DAMPING_RATIO = 0.1
ENSEMBLE_HINT = ("TRAK with one model is noisy on non-convex models; pass models=[...] of 5-10 "
                 "independently trained models (e.g. iif.train_ensemble(task, data, 5, "
                 "subset='half')) for an ensemble")

log = logging.getLogger(__name__)


@dataclass
class _TrainFeatures:
    """What one model keeps for the training set."""

    estimator: KernelEstimator  # Phi (N, P) in the model dtype, K = (Phi^T D Phi + lambda I)^-1
    weights: torch.Tensor  # (N,) float64: w_i = -dl_i/df_i
    orientation: torch.Tensor | None  # (N,) float64: c_i, or None for 1
    solver: Solver
    seconds: float


class TRAK(AttributionMethod):
    """TRAK attributions for a trained model or an ensemble of models.

    Args:
        task: the model (trained), target kind and recipe; classification or a sequence task
            with the default cross-entropy, or regression with a single output.
        train_data: ``(inputs, labels)`` the model was trained on.
        projection: ``ProjectionSettings``; default ``dim=2048``. ``dim=None`` or a dim at
            least the number of parameters uses the gradients unprojected.
        damping: lambda >= 0 added to ``Phi^T D Phi``; None: 0.1 x its mean eigenvalue.
        model_output: the model-output function (an :class:`iif.methods.trak.outputs.ModelOutput`);
            None: :class:`~iif.methods.trak.outputs.Margin` for classification (cross-entropy only),
            :class:`~iif.methods.trak.outputs.SequenceMargin` for a sequence task,
            :class:`~iif.methods.trak.outputs.Output` for single-output regression.
        models, chunk_size, seed, progress, max_feature_bytes: see
            :class:`iif.methods.base.AttributionMethod`. ``models`` (e.g. from
            ``iif.engine.training.train_ensemble(..., subset="half")``) makes the TRAK ensemble.
    """

    method = "trak"
    KEYWORD_LIMITS: ClassVar[dict[str, Limits]] = {"damping": Limits(ge=0)}

    def __init__(
        self,
        task: Task,
        train_data: Any,
        *,
        projection: ProjectionSettings | None = None,
        damping: float | None = None,
        model_output: ModelOutput | None = None,
        **common: Any,
    ):
        super().__init__(task, train_data, **common)
        if task.measurement is not None:
            raise InputError(f"TRAK explains its model-output function, not the task's "
                             f"measurement ({task.measurement.name!r}): give "
                             f"model_output=... (iif.methods.trak.outputs) and a task without a "
                             f"measurement")
        projection = self._keyword("projection", projection,
                                   default=lambda: ProjectionSettings(dim=DEFAULT_PROJECTION_DIM))
        self.projection = projection
        self.damping = self._keyword("damping", damping)
        self.model_output = (default_output(task, self.train.targets.shape[1])
                             if model_output is None else check_output(model_output))
        self._reset()
        self._mark_built()

    # ---- public API ----------------------------------------------------------------------
    def attribute(self, test_data: Any) -> Attribution:
        """Scores (n_test, n_train): ``-[mean_m c_s phi_s^T K_m phi_i] * [mean_m w_i]``;
        positive = including the training sample raises the test loss."""
        self._validate_settings()
        test = self.validate_test(test_data)
        start = time.perf_counter()
        members = self.members()
        scores = ensemble_scores([m._parts(test) for m in members])
        info = self._info(members)
        info["seconds"] = time.perf_counter() - start
        self._say_route(info)
        if len(members) == 1:
            info["note"] = ENSEMBLE_HINT
            self._hint_ensemble()
        return Attribution(scores, self.method, self.settings(), None, info)

    def self_influence(self, indices: Any = None) -> np.ndarray:
        """Self-influence of training samples (default all), shape (n,): the ensemble score of
        each sample on its own loss, ``-[mean_m c_i phi_i^T K_m phi_i] * [mean_m w_i]``. It is
        <= 0 for classification (and for one regression model); the most negative are samples
        the models fit only through themselves."""
        self._validate_settings()
        idx = self._indices(indices)
        members = self.members()
        if len(members) == 1:
            self._hint_ensemble()
        return ensemble_scores([m._self_parts(idx) for m in members])

    def _hint_ensemble(self) -> None:
        """Say once per method (not per chunk of a stored run) that one model is noisy."""
        if not getattr(self, "_hinted", False):
            self._hinted = True
            log.info(ENSEMBLE_HINT)

    # ---- one model ---------------------------------------------------------------------
    def _attribute(self, test: Data) -> Attribution:
        """This model alone (an ensemble of one)."""
        return Attribution(ensemble_scores([self._parts(test)]), self.method, self.settings(),
                           None, self._info([self]))

    def _self_influence(self, idx: np.ndarray) -> np.ndarray:
        return ensemble_scores([self._self_parts(idx)])

    def shards_training_set(self) -> bool:
        """The kernel and the training features serve every test sample."""
        return True

    def _make_projector(self, fmodel: FunctionalModel) -> Projector:
        dim, num_params = self.projection.dim, fmodel.num_params
        exact = dim is None or dim >= num_params
        return make_projector(num_params, ProjectionSettings(dim=None) if exact
                              else self.projection, self.task.device, self.task.dtype, fmodel)

    def _reset(self) -> None:
        super()._reset()
        self._cache: _TrainFeatures | None = None

    def _combine(self, parts: list[Attribution]) -> Attribution:
        """Not used: the ensemble estimator needs each model's kernel part and weights, which
        ``attribute`` averages separately; a mean of per-model scores would be a different
        estimator."""
        raise NotImplementedError("TRAK combines models in attribute(), not from scores")

    def _settings(self) -> dict[str, Any]:
        return {
            "projection": self.projection.to_dict(),
            "projection_dim": self.projector.dim,
            "damping": self.damping,
            "damping_ratio": DEFAULT_DAMPING_RATIO if self.damping is None else None,
            "output_function": getattr(self.model_output, "name", "custom"),
        }

    def _info(self, members: list[TRAK]) -> dict[str, Any]:
        caches = [m._train_features() for m in members]
        return {
            "damping": [c.solver.damping for c in caches],
            "damping_retries": [c.solver.retries for c in caches],
            "train_feature_seconds": [c.seconds for c in caches],
            "projection_dim": self.projector.dim,
            "projected": not isinstance(self.projector, IdentityProjector),
            "ensemble_size": len(members),
        }

    def _parts(self, test: Data) -> tuple[np.ndarray, np.ndarray]:
        """``c_s phi_s^T K phi_i`` (n_test, N) and ``w_i`` (N,) for this model, float64."""
        cache = self._train_features()
        estimator = cache.estimator
        kernel = estimator.products(estimator.test_features(test.x, test.targets))
        if cache.orientation is not None:  # the output function orients test samples
            outputs = self.engine.outputs(self.state, test.x, chunked=True)
            kernel = kernel * _finite(self.model_output.test_weight(outputs, test.targets))[:, None]
        return kernel.cpu().numpy(), self.engine.gather_columns(cache.weights).cpu().numpy()

    def _self_parts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``c_i phi_i^T K phi_i`` and ``w_i`` for training samples idx, each (n,)."""
        if self.sharding is not None:
            raise InputError("self-influence runs in one process")
        cache = self._train_features()
        diag = cache.estimator.self_products(idx)
        weights = cache.weights[torch.as_tensor(idx, device=diag.device)]
        if cache.orientation is not None:
            # c_i: the test sample is training sample i
            diag = diag * cache.orientation[torch.as_tensor(idx, device=diag.device)]
        return diag.cpu().numpy(), weights.cpu().numpy()

    # ---- features, weights and the kernel ------------------------------------------------
    def _train_features(self) -> _TrainFeatures:
        """Phi (N, P), w (N,) and the kernel solver of this model, computed once."""
        if self._cache is None:
            start = time.perf_counter()
            train = self.train
            n, dim = len(train), self.projector.dim
            # Phi in the model dtype, and the solver's float64 N x N (Woodbury, N < P) or P x P.
            solve_values = n * n if n < dim else dim * dim
            # the features may spill to feature_dir (see Budget); the solver's matrix may not
            solve_bytes = solve_values * torch.empty((), dtype=SOLVE_DTYPE).element_size()
            self.engine.check_features(n, "TRAK training features", solve_bytes)
            block = self.engine.train_block()
            x, targets = take(train.x, block), train.targets[block]
            phi = self._features(x, targets, "train", progress=self.progress)
            outputs = self.engine.outputs(self.state, x, chunked=True)
            weights = _finite(self.model_output.weight(outputs, targets))
            orientation = self.model_output.test_weight(outputs, targets)
            curvature = self.model_output.curvature(outputs, targets)
            rows = phi if curvature is None else phi * curvature.to(phi.dtype)[:, None]
            settings = CurvatureSettings(damping=self.damping,
                                         default_damping_ratio=DEFAULT_DAMPING_RATIO)
            rank = min(n, dim, self.engine.num_params)
            solver = gram_solver(rows, 1, settings, "TRAK kernel", effective_dim=rank,
                                 reduce=self.engine.reduce)
            estimator = KernelEstimator(self.engine, partial(self._features, what="test"),
                                        solver.solve, phi)
            self._cache = _TrainFeatures(estimator, weights,
                                         None if orientation is None else _finite(orientation),
                                         solver, time.perf_counter() - start)
        return self._cache

    def _fitted_state(self) -> FittedState:
        """Phi (N, P), the weights w (N,), the orientations c (N,) when the output function
        has them, and the kernel solver's factor: Cholesky of ``Phi^T D Phi + lambda I``
        (P, P), or the Woodbury (N, N) one for N < P (with ``D^(1/2) Phi`` when D != I)."""
        cache = self._train_features()
        phi = cache.estimator.features
        assert phi is not None  # TRAK always keeps its training features
        tensors = {"features": phi, "weights": cache.weights}
        if cache.orientation is not None:
            tensors["orientation"] = cache.orientation
        return merged(FittedState(tensors, {"seconds": cache.seconds}),
                      solver_state(cache.solver, "kernel.", rows=phi))

    def _load_fitted(self, state: FittedState) -> None:
        phi = state.tensors["features"]
        solver = load_solver(state, "kernel.", rows=phi)
        estimator = KernelEstimator(self.engine, partial(self._features, what="test"),
                                    solver.solve, phi)
        self._cache = _TrainFeatures(estimator, state.tensors["weights"],
                                     state.tensors.get("orientation"), solver,
                                     float(state.meta["seconds"]))

    def _features(
        self, x: torch.Tensor, targets: torch.Tensor, what: str, progress: bool | None = False
    ) -> torch.Tensor:
        """Projected gradients of the output function, (n, P) in the model dtype: the
        engine's features (the Kronecker fast path, spilled to ``feature_dir`` beyond the
        budget)."""
        self.engine.check_features(x.shape[0], f"TRAK {what} features")
        return self.engine.output_features(self.state, x, self._value, targets,
                                           what=f"TRAK {what} features", progress=progress)

    def _value(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The model output of one sample (d,), (d,) -> a scalar."""
        return self.model_output.value(output[None], target[None])[0]


def _finite(values: torch.Tensor) -> torch.Tensor:
    """Per-sample weights (n,) as float64, refused if not finite."""
    values = values.detach().to(SOLVE_DTYPE)
    if not bool(torch.isfinite(values).all()):
        raise InputError("loss slopes contain NaN or inf: the model or its loss is not "
                         "finite on some samples")
    return values
