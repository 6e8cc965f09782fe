"""Influence functions (Koh & Liang 2017) on the engine's gradients, projection and curvature.

``scores[s, i] = -(1/N) g_s^T C^{-1} g_i`` with ``g_i`` the loss gradient of training sample i,
``g_s`` that of test sample s, both at theta*, and ``C`` the damped curvature of the mean
training loss. Including sample i (up-weighting it by 1/N) moves theta by ``-(1/N) C^{-1} g_i``
and so the test loss by the score: positive = including i raises the test loss, the project's
sign convention. With K = 1 and the baseline f(x; theta*), Integrated Influence equals these
scores exactly (paper Lemma 2.5).

Solvers:

- ``exact``: per-sample gradients without projection, C as a dense or Woodbury solve (small
  models; the engine's memory budget refuses an N x M matrix that does not fit).
- ``projected``: the same on gradients projected to P dimensions (``ProjectionSettings``).
- ``cg``: matrix-free conjugate gradients on curvature-vector products (Hessian-, Gauss-Newton-
  or Fisher-vector products from ``torch.func``): memory O(M x n_test), for models whose
  per-sample gradients cannot be stored; iterations and residuals are reported.

The curvatures ``ekfac`` and ``kfac`` (:mod:`iif.engine.ekfac`) take the ``exact`` solver: the
EK-FAC or K-FAC approximation of the empirical Fisher is fitted at theta* from layer factors
and the stored training gradients, and solved block by block; a projection or ``cg`` is
refused with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from iif.engine.curvature import (
    KRONECKER_KINDS,
    CGSettings,
    CurvatureSettings,
    cg_solver,
    rank_bound,
)
from iif.engine.ekfac import KroneckerFactors
from iif.engine.factored import FactoredInfluence
from iif.engine.functional import FunctionalModel
from iif.engine.linalg import SOLVE_DTYPE, Solver
from iif.engine.projection import IdentityProjector, ProjectionSettings, Projector, make_projector
from iif.errors import InputError
from iif.methods.base import AttributionMethod
from iif.methods.estimator import KernelEstimator
from iif.results.attribution import Attribution
from iif.results.fitted import (
    FittedState,
    factored_state,
    load_factored,
    load_solver,
    merged,
    solver_state,
)
from iif.task.data import take
from iif.task.task import Data, Task
from iif.validation import Limits


class InfluenceFunction(AttributionMethod):
    """Influence-function attributions for a trained model.

    Args:
        task, train_data: the trained model (theta*) with its recipe, and its training data.
        curvature: ``fisher`` (default), ``ggn`` or ``hessian``, with damping (None:
            ``default_damping_ratio`` (0.3) x its trace over ``min(N, P, M)``, its mean
            nonzero eigenvalue; for ``cg`` the trace is estimated, see ``trace_probes``);
            or ``ekfac`` / ``kfac`` with the ``exact`` solver, damped block by block (None:
            the ratio x the mean eigenvalue of each layer's block).
        solver: ``exact``, ``projected`` (needs ``projection=ProjectionSettings(dim=P)``),
            ``cg``, or ``auto`` (default): ``projected`` when a projection is set, else
            ``exact`` (the solver used is ``effective_solver`` and is recorded).
        cg: settings of the conjugate-gradient solver.
        trace_probes: Hutchinson probes estimating the trace of a ``ggn`` or ``hessian``
            curvature for the default damping under ``cg`` (the Fisher trace is exact).
        models, chunk_size, seed, progress, max_feature_bytes: see
            :class:`iif.methods.base.AttributionMethod`.
    """

    method = "if"
    KEYWORD_LIMITS: ClassVar[dict[str, Limits]] = {"trace_probes": Limits(ge=1)}

    def __init__(
        self,
        task: Task,
        train_data: Any,
        *,
        curvature: CurvatureSettings | None = None,
        solver: Literal["auto", "exact", "projected", "cg"] = "auto",
        projection: ProjectionSettings | None = None,
        cg: CGSettings | None = None,
        trace_probes: int = 16,
        **common: Any,
    ):
        super().__init__(task, train_data, **common)
        self.curvature = self._keyword("curvature", curvature, default=CurvatureSettings)
        self.solver = self._keyword("solver", solver)
        self.projection = self._keyword("projection", projection, default=ProjectionSettings)
        self.cg = self._keyword("cg", cg, default=CGSettings)
        self.trace_probes = self._keyword("trace_probes", trace_probes)
        self._reset()
        self._mark_built()

    def shards_training_set(self) -> bool:
        """A projected curvature serves every test sample."""
        return self.effective_solver == "projected"

    def _reset(self) -> None:
        # checked here too: solver and projection may be changed after construction
        projected = self.projection.dim is not None
        if self.solver == "auto":
            self.effective_solver = "projected" if projected else "exact"
        else:
            self.effective_solver = self.solver
        if self.solver == "projected" and not projected:
            raise InputError("solver 'projected' needs ProjectionSettings(dim=P)")
        if self.solver not in ("projected", "auto") and projected:
            raise InputError(f"solver {self.solver!r} does not project; use "
                             f"solver='projected' (or 'auto') with a projection")
        kind = self.curvature.kind
        if kind in KRONECKER_KINDS and self.effective_solver != "exact":
            how, remedy = (("a projection", "projection=None") if projected else
                           (f"solver {self.effective_solver!r}", "solver 'exact' or 'auto'"))
            raise InputError(f"curvature {kind!r} solves the unprojected gradients (solver "
                             f"'exact'), not with {how}: use {remedy}, or kind 'fisher'")
        super()._reset()
        # the fitted training side (``fit``): every cache below is of the current settings
        self._fitted: tuple[KernelEstimator, Solver] | None = None
        self._grads: torch.Tensor | None = None
        self._factored: FactoredInfluence | None = None
        self._kron: KroneckerFactors | None = None
        self._cg_trace: float | None = None

    def _make_projector(self, fmodel: FunctionalModel) -> Projector:
        if self.projection.dim is None:
            return IdentityProjector(fmodel.num_params)
        return make_projector(fmodel.num_params, self.projection, self.task.device,
                              self.task.dtype, fmodel)

    # ---- the method ----------------------------------------------------------------------
    def _attribute(self, test: Data) -> Attribution:
        if self._use_factored():
            fitted = self._factored_fit()
            scores = fitted.scores(self.fmodel, self.state, test.x, test.targets, self.task,
                                   self.engine.budget.chunk_size)
            solver = fitted.solver
            return Attribution(scores.cpu().numpy(), self.method, self.settings(), None,
                               {"solver": solver.report()})
        estimator, solver = self._fit()
        products = estimator.products(estimator.test_features(test.x, test.targets))
        scores = -products / len(self.train)
        info = {"solver": solver.report()}
        return Attribution(scores.cpu().numpy(), self.method, self.settings(), None, info)

    def attribute_dampings(self, test_data: Any, dampings: Sequence[float],
                           relative: bool = False) -> list[Attribution]:
        """One attribution per damping value, from one featurisation: the training features
        and the curvature's rows (or explicit Hessian) are computed once, and each value
        only refactors the solve. ``relative``: the values are ratios to the mean nonzero
        eigenvalue (``default_damping_ratio``) instead of absolute dampings. ``exact`` and
        ``projected`` solvers, one model."""
        self._validate_settings()
        if (self.effective_solver == "cg" or len(self.members()) > 1
                or self.sharding is not None):
            raise InputError("attribute_dampings needs the 'exact' or 'projected' solver, one "
                             "model and one process")
        values = [float(d) for d in dampings]
        if not values or any(not (d >= 0 and math.isfinite(d)) for d in values):
            raise InputError(f"dampings must be finite numbers >= 0, got {dampings!r}")
        test = self.validate_test(test_data)
        # the features only: the solver of self.curvature would build the factor once more
        grads = self._train_grads()
        train = self.train
        if self.curvature.kind in KRONECKER_KINDS:
            make_solver = self._kronecker(grads).solver
        else:
            factor = self.engine.curvature_factor(self.curvature, grads)

            def make_solver(settings: CurvatureSettings) -> Solver:
                return self.engine.solver_from_factor(factor, settings)
        test_grads = self._features(test.x, test.targets)  # (n_test, D)
        results = []
        for value in values:
            settings = (dataclasses.replace(self.curvature, damping=None,
                                            default_damping_ratio=value) if relative
                        else dataclasses.replace(self.curvature, damping=value))
            solver = make_solver(settings)
            estimator = self._estimator(solver, grads)
            scores = -estimator.products(test_grads) / len(train)
            result = Attribution(scores.cpu().numpy(), self.method,
                                 {**self.settings(), "curvature": settings.to_dict()}, None,
                                 {"solver": solver.report()})
            results.append(result)
        return results

    def _use_factored(self) -> bool:
        return self.engine.factored_applies(self.effective_solver == "exact",
                                            self.curvature.kind)

    def _self_influence(self, idx: np.ndarray) -> np.ndarray:
        if self.sharding is not None:
            raise InputError("self-influence runs in one process")
        estimator, _ = self._fit()
        chunk = self.engine.budget.chunk_size
        step = chunk if self.effective_solver != "cg" else max(1, chunk // 4)
        return (-estimator.self_products(idx, step) / len(self.train)).cpu().numpy()

    def _settings(self) -> dict[str, Any]:
        return {
            "solver": self.effective_solver,
            "curvature": self.curvature.to_dict(),
            "projection": self.projection.to_dict(),
            "projection_dim": self.projector.dim,  # the dimension used (see make_projector)
            **({"cg": self.cg.to_dict(), "trace_probes": self.trace_probes}
               if self.effective_solver == "cg" else {}),
        }

    # ---- parts ---------------------------------------------------------------------------
    def _features(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.effective_solver == "cg":
            return self.engine.per_sample_grads(self.state, x, targets)
        return self.engine.loss_features(self.state, x, targets)

    def _test_features(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gradients of the task's measurement (the test loss by default)."""
        if self.effective_solver == "cg":
            return self.engine.per_sample_grads(self.state, x, targets, measure=True)
        return self.engine.test_features(self.state, x, targets)

    def _estimator(self, solver: Solver, grads: torch.Tensor | None) -> KernelEstimator:
        return KernelEstimator(self.engine, self._features, solver.solve, grads,
                               self._test_features)

    def _fit(self) -> tuple[KernelEstimator, Solver]:
        """The estimator (training features stored, or recomputed in chunks for ``cg``) on
        the damped solver, and the solver."""
        if self._fitted is None:
            train = self.train
            if self.effective_solver == "cg":
                solver, grads = self._cg_solver(), None
            elif self.curvature.kind in KRONECKER_KINDS:
                grads = self._train_grads()
                solver = self._kronecker(grads).solver(self.curvature)
            else:
                block = self.engine.train_block()
                grads = self._train_grads()
                solver = self.engine.fit_curvature(self.curvature, self.state,
                                                   take(train.x, block),
                                                   train.targets[block], grads,
                                                   reduce=self.engine.reduce)
            self._fitted = (self._estimator(solver, grads),
                            solver)
        return self._fitted

    def _cg_solver(self) -> Solver:
        """The conjugate-gradient solver; its trace (for the default damping) is computed
        once, or taken from a loaded fitted state."""
        product = self.engine.curvature_product(self.curvature)
        if self._cg_trace is None:
            self._cg_trace = self._trace(product)
        m = self.engine.num_params
        return cg_solver(product, m, self.curvature, self.cg, self.curvature.kind,
                         self._cg_trace, rank_bound(len(self.train), m, m))

    def _kronecker(self, grads: torch.Tensor) -> KroneckerFactors:
        """EK-FAC or K-FAC factors at theta*, fitted once from the training gradients
        ``grads`` (N, M); every damping shares them."""
        if self._kron is None:
            self._kron = self.engine.kronecker_factors(self.curvature, grads)
        return self._kron

    def _factored_fit(self) -> FactoredInfluence:
        """Training factors, solver and Gram matrix of the exact factored solve, once."""
        if self._factored is None:
            self._factored = self.engine.factored_influence(self.curvature)
        return self._factored

    def _fitted_state(self) -> FittedState:
        """Factored route: training layer factors, the Gram matrix and its Cholesky factor;
        ``exact``/``projected``: training features (N, D) and the solver's factor (Cholesky
        of the (D, D) curvature, or the Woodbury (N, N) one), or with ``ekfac`` / ``kfac``
        the layer factors; ``cg``: the trace only (its training gradients are recomputed
        chunk by chunk by design)."""
        if self._use_factored():
            return factored_state(self._factored_fit())
        estimator, solver = self._fit()
        if self.effective_solver == "cg":
            return FittedState({}, {"cg": {"trace": self._cg_trace}})
        features = estimator.features
        assert features is not None  # stored for the exact and projected solvers
        if self._kron is not None:
            tensors, meta = self._kron.state()
            return FittedState({"features": features,
                                **{f"kronecker.{k}": t for k, t in tensors.items()}},
                               {"kronecker": meta})
        return merged(FittedState({"features": features}),
                      solver_state(solver, "solver.", rows=features))

    def _load_fitted(self, state: FittedState) -> None:
        if "factored" in state.meta:
            self._factored = load_factored(state, self.fmodel, self.curvature)
            return
        grads: torch.Tensor | None = None
        if "cg" in state.meta:
            self._cg_trace = float(state.meta["cg"]["trace"])
            solver = self._cg_solver()
        elif "kronecker" in state.meta:
            grads = self._grads = state.tensors["features"]
            tensors = {k.removeprefix("kronecker."): t for k, t in state.tensors.items()
                       if k.startswith("kronecker.")}
            self._kron = KroneckerFactors.from_state(self.fmodel, tensors,
                                                     state.meta["kronecker"])
            solver = self._kron.solver(self.curvature)
        else:
            grads = self._grads = state.tensors["features"]
            solver = load_solver(state, "solver.", rows=grads)
        self._fitted = (self._estimator(solver, grads), solver)

    def _train_grads(self) -> torch.Tensor:
        """This process's training features (exact or projected), computed once: the solver
        and every damping of :meth:`attribute_dampings` share them."""
        if self._grads is None:
            block = self.engine.train_block()
            self._grads = self._features(take(self.train.x, block), self.train.targets[block])
        return self._grads

    def _trace(self, product) -> float:
        """trace(C): exact for the Fisher (mean squared gradient norm), Hutchinson otherwise."""
        if self.curvature.damping is not None:
            return 0.0  # not used
        m = self.engine.num_params
        if self.curvature.kind == "fisher":
            total = sum(float(g.double().pow(2).sum()) for g in self._train_grad_chunks())
            return total / len(self.train)
        gen = torch.Generator().manual_seed(self.seed)
        probes = (torch.randint(0, 2, (m, self.trace_probes), generator=gen)
                  .to(SOLVE_DTYPE).mul_(2).sub_(1).to(self.task.device))
        estimate = float((probes * product(probes)).sum()) / self.trace_probes
        return abs(estimate) if math.isfinite(estimate) else 0.0

    def _train_grad_chunks(self):
        """Per-sample training gradients (c, M), chunk by chunk, in order."""
        train, chunk = self.train, self.engine.budget.chunk_size
        for lo in range(0, len(train), chunk):
            sub = train.subset(slice(lo, lo + chunk))
            yield self.engine.per_sample_grads(self.state, sub.x, sub.targets)
