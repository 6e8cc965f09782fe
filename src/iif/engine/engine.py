"""The engine bound once per trained model: its task, training data, functional model, theta*,
projector and memory budget, so that the methods ask for features, solves and trained copies
without passing them along every time.

An :class:`Engine` wraps the free functions of ``iif.engine.features``, ``iif.engine.curvature``,
``iif.engine.factored``, ``iif.engine.ekfac``, ``iif.engine.training`` and
``iif.engine.stacked`` (the arithmetic stays there). It offers what any method needs and
knows no method: :meth:`Engine.fit` trains B >= 1 copies toward given targets, with an extra
objective term and a stop rule of the caller's (Integrated Influence builds its unlearning
baselines and path models on it in ``iif.methods.integrated``); features and curvature take
a :class:`~iif.engine.stacked.StackedState` of B >= 1 copies or a
:class:`~iif.engine.functional.ModelState` (one copy) and dispatch on it: one copy, or a task
that cannot be stacked, runs the plain one-model code copy by copy; more, the vmapped code.
Every feature matrix honours the :class:`Budget`: beyond ``max_feature_bytes`` it is
memory-mapped from ``feature_dir`` if one is set, else refused.

The engine owns the policy: :meth:`Engine.stacking` says whether copies of this task train
and featurise stacked (and why not), the :class:`~iif.engine.budget.Budget` how many copies fit
(:meth:`Engine.copies_that_fit`) and whether a feature matrix may be held
(:meth:`Engine.check_features`); the methods ask it instead of sizing memory themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from iif.engine.budget import MAX_COPIES, Budget
from iif.engine.curvature import (
    KRONECKER_KINDS,
    CurvatureSettings,
    Share,
    curvature_factor,
    curvature_product,
    fit_curvature,
    rank_bound,
    solver_from_factor,
    stacked_gram_solvers,
    unprojected_only,
)
from iif.engine.ekfac import KroneckerFactors, fit_kronecker
from iif.engine.factored import (
    FactoredInfluence,
    factored_influence_scores,
    factored_step_scores,
    fit_factored_influence,
    linear_layers,
    supports_factored,
)
from iif.engine.features import (
    Bar,
    can_stack_features,
    function_features,
    ggn_features,
    loss_features,
    step_features,
)
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.grads import HOOKS, gradient_route, per_sample_grads, sample_loss_fn
from iif.engine.linalg import Solver
from iif.engine.projection import IdentityProjector, Projector
from iif.engine.stacked import StackedState, cumulative_batchnorm, fit_stacked
from iif.engine.training import FitResult, fit
from iif.errors import InputError
from iif.task.task import Data, Task

State = ModelState | StackedState


__all__ = ["Budget", "Engine", "Stacking", "why_training_cannot_stack"]

# why a Kronecker projector's features are not computed for B copies at once
NOT_KRONECKER = ("the projection is not Kronecker over parameters that all sit in Linear or "
                 "Conv2d layers")
SHARED_LAYERS = "a projected layer is called more than once per forward (shared weights)"


@dataclass(frozen=True)
class Stacking:
    """Whether B copies of one model can be trained stacked (under ``vmap``) and featurised
    stacked (B-wide Kronecker products), each with the reason why not (None: they can)."""

    why_not_training: str | None = None
    why_not_features: str | None = None

    @property
    def training(self) -> bool:
        return self.why_not_training is None

    @property
    def features(self) -> bool:
        return self.why_not_features is None


def why_training_cannot_stack(task: Task) -> str | None:
    """Why copies of ``task`` cannot train stacked, or None: freezing a copy needs an
    optimizer that updates each element from its own history (the built-in ones, not a
    callable), and BatchNorm with ``momentum=None`` cannot train under ``vmap``
    (:func:`~iif.engine.stacked.cumulative_batchnorm`)."""
    if callable(task.recipe.optimizer):
        return ("a custom optimizer (a callable) cannot freeze one copy of many; stacking "
                "needs the recipe's built-in 'sgd', 'adam' or 'adamw'")
    if cumulative_batchnorm(task.model):
        return "BatchNorm with momentum=None (a cumulative average) cannot train under vmap"
    return None


class Engine:
    """Gradients, features, solves and trained copies of one trained model.

    Args:
        task: the task (its model need not be ``fmodel``'s: an ensemble member's engine has
            the member's model and the task's recipe and loss).
        train: the training data.
        fmodel: the model as a pure function; ``state`` its trained parameters theta*.
        projector: built from this model (a Kronecker projector hooks its modules).
        budget: the memory policy.
        sharding: an ``iif.runs.distributed.Sharding`` while the training set is split across
            processes (see ``AttributionMethod.sharded``), else None.
    """

    def __init__(self, task: Task, train: Data, fmodel: FunctionalModel, state: ModelState,
                 projector: Projector, budget: Budget, sharding: Any = None):
        self.task, self.train = task, train
        self.fmodel, self.state = fmodel, state
        self.projector, self.budget = projector, budget
        self.sharding = sharding
        self._supports_factored: bool | None = None
        self._stacking: Stacking | None = None

    @classmethod
    def bind(cls, task: Task, train: Data, model: nn.Module, budget: Budget,
             projector: Callable[[FunctionalModel], Projector] | None = None,
             sharding: Any = None) -> Engine:
        """The engine of ``model`` at its current parameters (theta*, frozen here);
        ``projector`` builds the projector from the model's FunctionalModel (None: exact)."""
        fmodel = FunctionalModel(model, task.output)
        made = IdentityProjector(fmodel.num_params) if projector is None else projector(fmodel)
        return cls(task, train, fmodel, fmodel.state(), made, budget, sharding)

    def rebound(self, projector: Projector, budget: Budget) -> Engine:
        """The same model at the same theta* with another projector and budget."""
        return Engine(self.task, self.train, self.fmodel, self.state, projector, budget,
                      self.sharding)

    # ---- sizes and the training set ----------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.fmodel.num_params

    @property
    def dim(self) -> int:
        """P, the feature dimension (M without projection)."""
        return self.projector.dim

    def rank_bound(self) -> int:
        """The eigenvalue count of a curvature of the training set in P of M dimensions."""
        return rank_bound(len(self.train), self.projector.dim, self.fmodel.num_params)

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sums a tensor over the processes under sharding; None in one process."""
        return None if self.sharding is None else self.sharding.all_reduce

    def train_block(self) -> slice:
        """The training samples this process featurises: all, or its block under sharding."""
        return slice(None) if self.sharding is None else self.sharding.rows(len(self.train))

    def gather_columns(self, block: torch.Tensor) -> torch.Tensor:
        """Scores of this process's training block (..., n_block) as (..., N), summed over
        the processes (each fills its own columns); unchanged without sharding."""
        if self.sharding is None:
            return block
        full = torch.zeros(*block.shape[:-1], len(self.train), dtype=block.dtype,
                           device=block.device)
        full[..., self.train_block()] = block
        return self.sharding.all_reduce(full)

    def outputs(self, state: ModelState, x: torch.Tensor,
                chunked: bool = False) -> torch.Tensor:
        """Model outputs at ``state`` (eval mode), in budget-sized chunks if ``chunked``."""
        if chunked:
            return self.fmodel.outputs(state, x, self.budget.chunk_size)
        return self.fmodel.outputs(state, x)

    # ---- features ------------------------------------------------------------------------
    def loss_features(self, state: State, x: torch.Tensor, targets: torch.Tensor,
                      what: str | Bar = "per-sample gradients", measure: bool = False
                      ) -> torch.Tensor:
        """Projected per-sample loss gradients (``measure``: of the task's measurement):
        (n, P) at a ModelState; for a StackedState of B copies, copy b's gradients of its own
        samples ``x[b]``, ``targets[b]`` ((B, n, ...), (B, n, d)) -> (B, n, P). ``what``
        names them in errors; a :class:`~iif.engine.features.Bar` also shows their progress."""
        b = self.budget
        with b.spill():
            return loss_features(self.fmodel, state, x, targets, self.task, self.projector,
                                 b.chunk_size, b.max_feature_bytes, what, measure)

    def test_features(self, state: State, x: torch.Tensor, targets: torch.Tensor,
                      what: str = "test gradients") -> torch.Tensor:
        """Projected per-sample gradients of the task's measurement (the test loss by
        default; :meth:`iif.task.task.Task.measure`), shaped as :meth:`loss_features`."""
        return self.loss_features(state, x, targets, what, measure=True)

    def step_features(self, state: State, x: torch.Tensor, rho: torch.Tensor,
                      rho_prev: torch.Tensor, progress: bool | None = None,
                      desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
        """Path features u and psi: (N, P) each at a ModelState (psi (N, B, P) for B previous
        targets (B, N, d)); for a StackedState of B copies with ``rho``, ``rho_prev`` (B, N,
        d), (B, N, P) each (the Kronecker fast path: see :meth:`stacks_features`)."""
        b = self.budget
        with b.spill():
            return step_features(self.fmodel, state, x, rho, rho_prev, self.task,
                                 self.projector, b.chunk_size, b.max_feature_bytes,
                                 progress=Bar(progress, desc))

    def output_features(self, state: ModelState, x: torch.Tensor, fn, *args: torch.Tensor,
                        what: str = "output gradients",
                        progress: bool | None = False) -> torch.Tensor:
        """Projected per-sample gradients (n, P) of the scalar ``fn(output_i, *args_i)``."""
        b = self.budget
        with b.spill():
            return function_features(self.fmodel, state, x, fn, *args,
                                     projector=self.projector, chunk_size=b.chunk_size,
                                     max_bytes=b.max_feature_bytes, what=what,
                                     progress=progress)

    def ggn_features(self, state: ModelState, x: torch.Tensor, targets: torch.Tensor,
                     rank: int | None = None) -> torch.Tensor:
        """Gauss-Newton rows ``A^T J_i^T L_i`` (N * r, P)."""
        b = self.budget
        with b.spill():
            return ggn_features(self.fmodel, state, x, targets, self.task, self.projector,
                                b.chunk_size, b.max_feature_bytes, rank)

    def per_sample_grads(self, state: ModelState, x: torch.Tensor, targets: torch.Tensor,
                         measure: bool = False) -> torch.Tensor:
        """Unprojected per-sample loss gradients (n, M); ``measure``: of the task's
        measurement instead."""
        return per_sample_grads(self.fmodel, state, x, targets, self.task,
                                self.budget.chunk_size, measure)

    # ---- the policy: stacking and memory -----------------------------------------------
    def stacking(self) -> Stacking:
        """Whether B copies train stacked (the task's optimizer and BatchNorm) and featurise
        stacked (the Kronecker fast path on a model of single-use layers), and why not;
        checked once."""
        if self._stacking is None:
            if not getattr(self.projector, "all_params_in_layers", False):
                features = NOT_KRONECKER
            elif not can_stack_features(self.fmodel, self.state, self.train.x[:1],
                                        self.projector):
                features = SHARED_LAYERS
            else:
                features = None
            training = self._why_training_cannot_stack()
            if features is None and self.fmodel.route == HOOKS:
                features = training
            self._stacking = Stacking(training, features)
        return self._stacking

    def _why_training_cannot_stack(self) -> str | None:
        """Why copies cannot train stacked: the task's optimizer or BatchNorm
        (:func:`~iif.engine.stacked.why_training_cannot_stack`), or a forward that cannot run
        under ``vmap`` (the gradient route's probe, :func:`~iif.engine.grads.gradient_route`)."""
        why = why_training_cannot_stack(self.task)
        if why is None and self.gradient_route() == HOOKS:
            why = self.fmodel.route_note
        return why

    def gradient_route(self) -> str:
        """``"vmap"`` or ``"hooks"`` (:func:`~iif.engine.grads.gradient_route`), probed once
        on two training samples with the task's loss."""
        x = self.train.x[:2]
        return gradient_route(self.fmodel, self.state, x, sample_loss_fn(self.task),
                              self.train.targets[:2])

    def stacks_features(self) -> bool:
        """Whether B copies' features come from B-wide products (:meth:`stacking`)."""
        return self.stacking().features

    def stacks_path_features(self, copies: int) -> bool:
        """Whether the path features u, psi (B, N, P) of ``copies`` copies are computed
        together: they stack (:meth:`stacking`) and fit ``max_feature_bytes`` (in the
        model's dtype: the inputs may be integer token ids)."""
        need = 2 * copies * len(self.train) * self.projector.dim
        return self.stacks_features() and self.budget.holds(
            need * self.train.targets.element_size())

    def copies_that_fit(self, per_copy_bytes: int, most: int = MAX_COPIES) -> int:
        """Model copies (1..``most``) of ``per_copy_bytes`` each that the budget allows
        side by side: :meth:`iif.engine.budget.Budget.copies_that_fit`."""
        return self.budget.copies_that_fit(per_copy_bytes, most)

    def check_features(self, rows: int, what: str, solve_bytes: int = 0,
                       dim: int | None = None) -> None:
        """Refuse a (rows x dim) feature matrix in the task's dtype (dim: P by default), with
        ``solve_bytes`` of a solver's matrix, beyond the budget (it names ``what``); with a
        ``feature_dir`` the features spill and only the solver's bytes count."""
        size = torch.empty((), dtype=self.task.dtype).element_size()
        self.budget.check_features(rows, self.projector.dim if dim is None else dim, what,
                                   size, solve_bytes)

    # ---- curvature -----------------------------------------------------------------------
    def fit_curvature(self, settings: CurvatureSettings, state: State, x: torch.Tensor,
                      targets: torch.Tensor, u: torch.Tensor,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> Solver | list[Solver]:
        """The damped solver of the curvature of the training set at (state, targets); ``x``,
        ``targets``, ``u`` may be this process's part, ``reduce`` summing the parts.

        For a StackedState of B copies (``targets`` (B, N, d), ``u`` (B, N, P)), the B
        copies' solvers: a Fisher with N >= P from batched Gram products
        (:func:`iif.engine.curvature.stacked_gram_solvers`), anything else copy by copy."""
        if isinstance(state, StackedState):
            n = len(self.train) if reduce is None else x.shape[0]
            if settings.kind == "fisher" and reduce is None and n >= self.projector.dim:
                return stacked_gram_solvers(u, n, settings, "fisher", self.rank_bound())
            return [self.fit_curvature(settings, member, x, targets[b], u[b], reduce)
                    for b, member in enumerate(state.members())]
        if settings.kind in KRONECKER_KINDS:
            return self._kronecker_solver(settings, state, x, targets, u, reduce)
        with self.budget.spill():
            share = None if reduce is None else Share(len(self.train), reduce)
            return fit_curvature(settings, self.fmodel, state, x, targets, self.task,
                                 self.projector, u, self.budget.chunk_size, share)

    def _kronecker_solver(self, settings: CurvatureSettings, state: ModelState,
                          x: torch.Tensor, targets: torch.Tensor, u: torch.Tensor,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> Solver:
        """EK-FAC or K-FAC at (state, targets) from the unprojected training gradients ``u``
        (N, M), in one process."""
        if reduce is not None or self.sharding is not None:
            raise InputError(f"curvature {settings.kind!r} is fitted in one process")
        if not isinstance(self.projector, IdentityProjector):
            raise unprojected_only(settings.kind)
        return fit_kronecker(self.fmodel, state, x, targets, self.task, settings.kind,
                             self.budget.chunk_size, u).solver(settings)

    def curvature_factor(self, settings: CurvatureSettings,
                         u: torch.Tensor | None) -> tuple[str, torch.Tensor]:
        """What solvers of every damping are built from, at theta* on the training set."""
        with self.budget.spill():
            return curvature_factor(settings.kind, self.fmodel, self.state, self.train.x,
                                    self.train.targets, self.task, self.projector, u,
                                    self.budget.chunk_size, ggn_rank=settings.ggn_rank)

    def solver_from_factor(self, factor: tuple[str, torch.Tensor],
                           settings: CurvatureSettings) -> Solver:
        return solver_from_factor(factor, settings, len(self.train), self.projector.dim,
                                  self.fmodel.num_params)

    def curvature_product(self, settings: CurvatureSettings
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> C v`` (M, r) at theta* on the training set, without forming C."""
        return curvature_product(settings.kind, self.fmodel, self.state, self.train.x,
                                 self.train.targets, self.task, self.budget.chunk_size,
                                 ggn_rank=settings.ggn_rank)

    def kronecker_factors(self, settings: CurvatureSettings,
                          grads: torch.Tensor | None = None) -> KroneckerFactors:
        """EK-FAC or K-FAC factors (``settings.kind``) of the empirical Fisher at theta* on the
        training set (:func:`iif.engine.ekfac.fit_kronecker`); ``grads``: the training
        per-sample gradients (N, M) when already computed, else recomputed chunk by chunk.
        One process."""
        if self.sharding is not None:
            raise InputError(f"curvature {settings.kind!r} is fitted in one process")
        return fit_kronecker(self.fmodel, self.state, self.train.x, self.train.targets,
                             self.task, settings.kind, self.budget.chunk_size, grads)

    # ---- exact solves from layer factors -------------------------------------------------
    def factored_applies(self, exact: bool, kind: str) -> bool:
        """Whether exact solves of this model run from layer factors (``iif.engine.factored``): an
        unprojected (``exact``) Fisher or Gauss-Newton solve, N < M (the Woodbury form), one
        process, and a model of single-use Linear layers (checked once). They equal the
        per-sample-gradient solve without any N x M matrix."""
        if not (exact and kind in ("fisher", "ggn") and self.sharding is None
                and len(self.train) < self.fmodel.num_params):
            return False
        if self._supports_factored is None:
            self._supports_factored = supports_factored(self.fmodel, self.state, self.train.x)
        return self._supports_factored

    def linear_layers(self):
        return linear_layers(self.fmodel)

    def factored_step_scores(self, settings: CurvatureSettings, state: ModelState,
                             rho: torch.Tensor, rho_prev: torch.Tensor, test_x: torch.Tensor,
                             test_targets: torch.Tensor):
        """Exact scores (n_test, N) of the training set's gradient differences at (``rho``,
        ``rho_prev``) against the test gradients, and the solver (one Integrated Influence path
        step)."""
        return factored_step_scores(self.fmodel, state, self.train.x, rho, rho_prev, test_x,
                                    test_targets, self.task, settings,
                                    effective_dim=self.rank_bound(),
                                    chunk_size=self.budget.chunk_size)

    def factored_influence(self, settings: CurvatureSettings) -> FactoredInfluence:
        """The training side of exact influence functions at theta*: training factors,
        solver and Gram matrix, for any number of test batches."""
        return fit_factored_influence(self.fmodel, self.state, self.train.x,
                                      self.train.targets, self.task, settings,
                                      effective_dim=self.rank_bound(),
                                      chunk_size=self.budget.chunk_size)

    def factored_influence_scores(self, settings: CurvatureSettings, test_x: torch.Tensor,
                                  test_targets: torch.Tensor):
        """Exact influence-function scores (n_test, N) at theta* and the solver."""
        return factored_influence_scores(self.fmodel, self.state, self.train.x,
                                         self.train.targets, test_x, test_targets, self.task,
                                         settings, effective_dim=self.rank_bound(),
                                         chunk_size=self.budget.chunk_size)

    # ---- training -----------------------------------------------------------------------
    def fit(self, state: State, x: torch.Tensor, targets: torch.Tensor,
            **options: Any) -> list[FitResult]:
        """Train B >= 1 copies from ``state`` (a ModelState is one copy); one
        :class:`~iif.engine.training.FitResult` per copy. ``targets``: (N, d) shared by the copies
        or (B, N, d), one set per copy. The copies share the minibatch order (``generator``);
        copy b equals its separate run (to floating-point tolerance).

        ``options`` are those of ``iif.engine.training.fit``, with per-copy callbacks:
        ``extra(params_b, buffers_b, *data_b)`` and ``stop(params_b, buffers_b, *data_b)``
        (a bool tensor) get copy b's slice of ``extra_data`` (tensors (B, ...));
        ``sound(b, state_b)`` judges copy b's epoch. One copy, or a task that cannot be
        stacked (:meth:`stacking`), trains copy by copy with
        ``iif.engine.training.fit``; more run as stacked copies under vmap (``iif.engine.stacked``).
        """
        stacks = self._why_training_cannot_stack() is None  # no features probe here
        if isinstance(state, StackedState) and len(state) > 1 and stacks:
            return fit_stacked(self.task, self.fmodel, state, x, targets,
                               **_stacked_options(options))
        members = state.members() if isinstance(state, StackedState) else [state]
        generator = options.get("generator")
        first = None if generator is None else generator.get_state()
        results = []
        for b, member in enumerate(members):
            if first is not None:
                generator.set_state(first)  # every copy sees the same minibatch order
            results.append(fit(self.task, self.fmodel, member, x,
                               targets[b] if targets.dim() == 3 else targets,
                               **_copy_options(options, b)))
        return results


def _copy_options(options: dict[str, Any], b: int) -> dict[str, Any]:
    """``Engine.fit``'s options for copy b alone (``iif.engine.training.fit``'s)."""
    out = dict(options)
    data = [t[b] for t in out.pop("extra_data", ())]
    extra, stop, sound = out.get("extra"), out.get("stop"), out.get("sound")
    if extra is not None:
        out["extra"] = lambda params, buffers: extra(params, buffers, *data)
    if stop is not None:
        out["stop"] = lambda params, buffers: bool(stop(params, buffers, *data))
    if sound is not None:
        out["sound"] = lambda candidate: sound(b, candidate)
    return out


def _stacked_options(options: dict[str, Any]) -> dict[str, Any]:
    """``Engine.fit``'s options for ``iif.engine.stacked.fit_stacked`` (which shows no progress
    bar), ``stop`` vmapped over the copies."""
    out = dict(options)
    stop, data = out.get("stop"), tuple(out.get("extra_data", ()))
    if stop is not None:
        in_dims = (0, 0) + (0,) * len(data)
        out["stop"] = lambda params, buffers: vmap(stop, in_dims=in_dims)(params, buffers, *data)
    return out
