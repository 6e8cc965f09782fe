"""Curvature of the training loss: its settings, what it is, and its damped solvers.

Five kinds share one interface (an :class:`iif.engine.linalg.Solver` with ``solve``):

- ``fisher``: empirical Fisher ``F = (1/N) sum_i phi_i phi_i^T + delta I`` of the (projected)
  per-sample gradients (paper appendix E); the default.
- ``ggn``: Gauss-Newton ``G = (1/N) sum_i Jt_i^T H_i Jt_i + delta I`` with ``Jt_i`` the
  (projected) output Jacobian and ``H_i`` the loss Hessian in output space, written as a Gram
  matrix of the rows ``Jt_i^T L_i`` where ``L_i L_i^T = H_i``.
- ``hessian``: the explicit Hessian of the mean training loss (small models), projected to
  ``A^T H A`` when a projection is used.
- ``ekfac`` and ``kfac``: the empirical Fisher of the unprojected gradients, block-diagonal by
  layer, Kronecker-factored per layer with a weight matrix (EK-FAC: eigenvalues corrected to
  the exact block's in the Kronecker eigenbasis), the exact diagonal elsewhere, damped per
  block (:mod:`iif.engine.ekfac`). Built from layer factors at theta*, for influence functions
  with the ``exact`` solver; the feature-row solvers here refuse them.

What lives where:

- here: :class:`CurvatureSettings` and :class:`CGSettings`; the damping rule
  (:func:`default_damping`, :func:`rank_bound`, :func:`damping_rule`); what each kind is
  built from (:func:`curvature_factor`: rows or an explicit matrix) and its matrix-free
  product (:func:`curvature_product`); and the solvers of the settings
  (:func:`gram_solver`, :func:`stacked_gram_solvers`, :func:`dense_solver`,
  :func:`cg_solver`, :func:`solver_from_factor`, :func:`fit_curvature`), which apply the
  rule and leave the arithmetic to :mod:`iif.engine.linalg`.
- :mod:`iif.engine.linalg`: float64 blocks and Gram products, the damped Cholesky with retries and
  the solver classes (Cholesky, Woodbury, stacked, conjugate gradients).
- :mod:`iif.engine.functional`, :mod:`iif.engine.grads` and :mod:`iif.engine.features`: the
  model as a function of its state, per-sample gradients, Jacobians, output-Hessian factors
  and the projected Gauss-Newton rows. They do not import this module; it imports them at its top.

Gram matrices with fewer rows than columns are solved through the Woodbury identity in the
row space, exactly. All solves run in float64 on a Cholesky factor; a factorisation that fails
(not positive definite) is retried with ``retry_factor`` times more damping, and the damping
finally used and the number of retries are reported on the solver.

:func:`gram_solver` and :func:`stacked_gram_solvers` stay twins, as their
:mod:`iif.engine.linalg` parts do (see there): the B-copy one's batched float64 Gram products are
not bit-equal to B one-copy products, and the one-copy one has forms (Woodbury, summed
parts) that the batched one cannot take.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import jvp, vjp, vmap

from iif.engine.features import ggn_features
from iif.engine.functional import (
    FunctionalModel,
    ModelState,
    module_mode,
    quiet_attention_fallback,
)
from iif.engine.grads import (
    GGN_PRODUCTS,
    HESSIAN,
    check_twice_differentiable,
    full_hessian,
    ggn_factor,
    gradient_products,
    loss_gradient,
    per_sample_grads,
    second_order,
)
from iif.engine.linalg import (
    DEFAULT_RETRIES,
    SOLVE_DTYPE,
    CGSolver,
    CholeskySolver,
    DampingRule,
    Solver,
    rows_solver,
    stacked_rows_solvers,
)
from iif.engine.projection import IdentityProjector, Projector
from iif.errors import InputError, exception_text
from iif.task.task import Task
from iif.validation import Settings, setting

log = logging.getLogger(__name__)

@dataclass
class CurvatureSettings(Settings):
    """``damping=None`` chooses ``default_damping_ratio`` times the mean nonzero eigenvalue.

    The mean is taken over ``min(D, M, N)`` eigenvalues (:func:`rank_bound`): D the solve
    dimension, M the number of parameters, N the number of training samples (the rank bound
    of the empirical Fisher). Counting null directions would shrink the damping with the size
    of the model (dividing by M gave 1e-5 to 1e-6 on small MLPs, far below what attribution
    quality wants) and with P, so projected scores would not approach unprojected ones. The
    ratio 0.3 was best on the tuning half of ``benchmarks/bench_quality.py`` on digits and
    MNIST alike for the Fisher, for influence functions and IIF, and on digits for the
    Gauss-Newton matrix (docs/quality.md).

    ``kind="fisher"`` is the default: the Gauss-Newton matrix cut to each sample's top
    output-Hessian direction was better on digits and much worse on MNIST.

    ``kind="ekfac"`` / ``"kfac"`` (:mod:`iif.engine.ekfac`) damp each layer's block on its own:
    ``default_damping_ratio`` times the mean of that block's eigenvalues, or ``damping`` for
    every block when given. They solve unprojected gradients only (no projection), in
    InfluenceFunction and IntegratedInfluence.
    """

    section = "[curvature]"

    kind: Literal["fisher", "ggn", "hessian", "ekfac", "kfac"] = setting(
        "fisher", doc="the curvature: empirical Fisher, Gauss-Newton, the explicit Hessian, or "
        "the Fisher's EK-FAC or K-FAC approximation (influence functions without projection)")
    # 0 is allowed: a curvature that is then singular is retried with a tiny damping
    damping: float | None = setting(None, ge=0, doc="damping added to the curvature (None: "
                                    "default_damping_ratio x its mean nonzero eigenvalue)")
    # "auto": 1 for the built-in cross-entropy, whose diag(p) - p p^T has one dominant
    # direction, else all d. An exact solve's Woodbury dimension is N x ggn_rank.
    ggn_rank: int | Literal["auto"] | None = setting(
        "auto", ge=1, doc="Gauss-Newton: top directions kept of each sample's output Hessian "
        "(None: all; auto: 1 for the built-in cross-entropy)")
    default_damping_ratio: float = setting(0.3, gt=0, doc="the damping=None rule's multiple "
                                           "of the mean nonzero eigenvalue")
    # IIF only: "once" reuses theta*'s solver (fitted on the real targets at the first step)
    # for every path step and test sample; "each" fits it at every path model; "auto" fits
    # it at each path model where exact layer-factor solves apply (iif.engine.factored:
    # refitting costs little there and was better on the digits tuning half) and once
    # elsewhere, where refitting means an N x N Gram matrix per path model and test sample
    # (3x the per-test time on the CNN task, the same LDS within noise: docs/quality.md)
    path_fit: Literal["auto", "each", "once"] = setting(
        "auto", doc="Integrated Influence: fit the curvature at each path model, or once at "
        "theta* for every path step and test sample; auto: each where exact solves from "
        "layer factors apply (models of nn.Linear layers, no projection), once elsewhere")
    max_retries: int = setting(DEFAULT_RETRIES.max_retries, ge=0, doc="retries with more "
                               "damping when a factorisation fails")
    # each retry multiplies the damping by this, so it must grow
    retry_factor: float = setting(DEFAULT_RETRIES.retry_factor, gt=1, doc="factor of the "
                                  "damping on each retry")


KRONECKER_KINDS = ("ekfac", "kfac")


def refuse_kronecker(kind: str, what: str) -> None:
    """One line refusing an EK-FAC or K-FAC ``kind`` where ``what`` (a solve on feature rows,
    curvature-vector products) would need it; other kinds pass."""
    if kind in KRONECKER_KINDS:
        raise InputError(f"curvature {kind!r} is built from layer factors for unprojected "
                         f"gradients (InfluenceFunction's solver 'exact', IntegratedInfluence "
                         f"without projection), not for {what}; use kind 'fisher' here")


def unprojected_only(kind: str) -> InputError:
    """The refusal of an EK-FAC or K-FAC ``kind`` with projected gradients: its factors are
    of the model's own layers."""
    return InputError(f"curvature {kind!r} solves unprojected gradients: use projection=None "
                      f"(ProjectionSettings(dim=None)), or kind 'fisher'")


def rank_bound(n: int, dim: int, num_params: int) -> int:
    """How many eigenvalues of the curvature the default damping averages: at most one per
    training sample, the solve dimension and the parameter count, for every kind. For the
    empirical Fisher this is its rank bound. Gauss-Newton and Hessian matrices can reach
    N x d, but a trained classifier's per-sample output Hessian ``diag(p) - p p^T`` has one
    dominant direction (towards the runner-up class), so N counts their significant
    eigenvalues too; with N x d the best damping ratio on the tuning half was 10x the
    Fisher's, with N the same ratio serves both (docs/quality.md)."""
    return max(1, min(dim, num_params, n))


def default_damping(settings: CurvatureSettings, trace: float, dim: int) -> float:
    """The first damping: ``settings.damping``, or ``default_damping_ratio`` times the mean
    eigenvalue ``|trace| / dim`` of the undamped curvature (``dim`` from :func:`rank_bound`)."""
    if settings.damping is not None:
        return settings.damping
    return settings.default_damping_ratio * abs(trace) / dim


def damping_rule(settings: CurvatureSettings, effective_dim: int) -> DampingRule:
    """:func:`default_damping` as a rule of the trace, for the :mod:`iif.engine.linalg` solvers."""
    return lambda trace: default_damping(settings, trace, effective_dim)


def gram_solver(
    rows: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
    effective_dim: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """Solver for ``C = (1/n) rows^T rows + delta I``, rows of shape (R, D)
    (:func:`iif.engine.linalg.rows_solver`: Woodbury in R dimensions when R < D and delta > 0).

    ``effective_dim`` (default D) is the number of eigenvalues the default damping averages.
    ``reduce`` (for rows split across processes, ``n`` counting all of them) sums the (D, D)
    matrices of the parts, e.g. an all-reduce; the solve then uses the explicit matrix.
    """
    rule = damping_rule(settings, effective_dim or rows.shape[-1])
    return rows_solver(rows, n, rule, settings, kind, reduce)


def stacked_gram_solvers(
    rows: torch.Tensor, n: int, settings: CurvatureSettings, kind: str,
    effective_dim: int | None = None,
) -> list[Solver]:
    """:func:`gram_solver` for B matrices at once, ``rows`` (B, R, D) with R >= D: the B
    Gram matrices come from batched float64 products
    (:func:`iif.engine.linalg.stacked_rows_solvers`)."""
    rule = damping_rule(settings, effective_dim or rows.shape[-1])
    return stacked_rows_solvers(rows, n, rule, settings, kind)


def dense_solver(
    matrix: torch.Tensor, settings: CurvatureSettings, kind: str, base: float | None = None,
    effective_dim: int | None = None,
) -> Solver:
    """Solver for ``matrix + delta I`` with an explicit (D, D) matrix; ``base`` (default: the
    rule on the matrix's trace) is the first damping."""
    first = base if base is not None else damping_rule(settings, effective_dim or matrix.shape[0])
    return CholeskySolver(matrix, first, settings, kind)


@dataclass(frozen=True)
class Share:
    """This process's part of a training set of ``n_total`` samples; ``reduce`` sums the
    parts' matrices across the processes (``iif.runs.distributed.Sharding.all_reduce``)."""

    n_total: int
    reduce: Callable[[torch.Tensor], torch.Tensor]


def fit_curvature(
    settings: CurvatureSettings,
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    projector: Projector,
    u: torch.Tensor,
    chunk_size: int = 128,
    share: Share | None = None,
) -> Solver:
    """The damped solver of the chosen curvature at (state, targets).

    ``u`` are the projected per-sample gradients at the same point (the Fisher features).
    With ``share``, ``x``, ``targets`` and ``u`` are this process's part of the training set
    and the parts' matrices are summed (see :func:`gram_solver`).
    """
    refuse_kronecker(settings.kind, "a solve on gradient features")
    n = x.shape[0] if share is None else share.n_total
    reduce = None if share is None else share.reduce
    if reduce is not None and settings.kind not in ("fisher", "ggn"):
        raise InputError("the explicit Hessian is not split across processes; use 'fisher' or "
                         "'ggn' curvature, or run in one process")
    factor = curvature_factor(settings.kind, fmodel, state, x, targets, task, projector, u,
                              chunk_size, ggn_rank=settings.ggn_rank)
    return solver_from_factor(factor, settings, n, projector.dim, fmodel.num_params, reduce)


def curvature_factor(
    kind: str, fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
    targets: torch.Tensor, task: Task, projector: Projector, u: torch.Tensor | None,
    chunk_size: int = 128,
    ggn_rank: int | None = None,
) -> tuple[str, torch.Tensor]:
    """What a solver of the ``kind`` curvature is built from, without the damping:
    ``("rows", R)`` whose Gram matrix / N is the curvature (the Fisher's ``u``, the
    Gauss-Newton rows ``A^T J_i^T L_i``), or ``("matrix", H)`` for the explicit Hessian of
    the whole training set (never split across processes: :func:`fit_curvature` refuses). One
    factor serves any number of damping values (:func:`solver_from_factor`). EK-FAC and K-FAC
    are refused (their factors: :func:`iif.engine.ekfac.fit_kronecker`)."""
    refuse_kronecker(kind, "a solve on gradient features")
    if kind == "fisher":
        return "rows", u
    if kind == "ggn":
        return "rows", ggn_features(fmodel, state, x, targets, task, projector, chunk_size,
                                    rank=ggn_rank)
    h = full_hessian(fmodel, state, x, targets, task, chunk_size=chunk_size)
    if not isinstance(projector, IdentityProjector):
        # A^T H A without forming A: project the rows of H, then the rows of (H A)^T.
        h = projector.project(projector.project(h).T.contiguous())
    return "matrix", h


def solver_from_factor(
    factor: tuple[str, torch.Tensor], settings: CurvatureSettings, n: int, dim: int,
    num_params: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solver:
    """The damped solver of a :func:`curvature_factor` at ``settings.damping``, for a
    training set of ``n`` samples and a solve in ``dim`` of ``num_params`` dimensions."""
    what, value = factor
    effective_dim = rank_bound(n, dim, num_params)
    if what == "rows":
        return gram_solver(value, n, settings, settings.kind, effective_dim, reduce)
    return dense_solver(value, settings, "hessian", effective_dim=effective_dim)


# ---- matrix-free curvature and conjugate gradients -------------------------------------------
@dataclass
class CGSettings(Settings):
    """Conjugate gradients: stop at ``tol`` relative residual or after ``max_iter`` steps."""

    section = "[cg]"

    max_iter: int = setting(200, ge=1, doc="most conjugate-gradient steps per solve")
    tol: float = setting(1e-8, gt=0, lt=1, doc="relative residual at which a solve stops")


def curvature_product(
    kind: str, fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
    targets: torch.Tensor, task: Task, chunk_size: int = 128,
    ggn_rank: int | str | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> C v`` for v of shape (M, r), without forming C (M x M), in float64.

    ``hessian``: Hessian-vector products of the mean training loss by double backward;
    ``ggn``: ``(1/N) sum_i J_i^T H_i J_i v`` through a Jacobian-vector and a vector-Jacobian
    product of the outputs; ``fisher``: ``(1/N) sum_i g_i g_i^T v`` from per-sample gradients
    recomputed chunk by chunk. Eval mode throughout, like the features. A model torch cannot
    differentiate twice is refused in one line by the first product of a kind that needs it.
    """
    refuse_kronecker(kind, "conjugate gradients")
    n = x.shape[0]
    if kind == "fisher":
        chunk_product = _fisher_chunk_product(fmodel, state, task, n, chunk_size)
    elif kind == "hessian":
        chunk_product = _hessian_chunk_product(fmodel, state, task, n)
    elif kind == "ggn":
        chunk_product = _ggn_chunk_product(fmodel, state, task, n, ggn_rank)
    else:
        raise InputError(f"unknown curvature kind {kind!r}")
    need = {"hessian": HESSIAN, "ggn": GGN_PRODUCTS}.get(kind)

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.to(SOLVE_DTYPE)
        out = torch.zeros_like(v)
        with module_mode(fmodel.module, False), _second_order_if(need):
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                out += chunk_product(v, x[start:stop], targets[start:stop]).detach()
        return out

    return apply


def _second_order_if(need: tuple[str, str] | None):
    """:func:`iif.engine.grads.second_order` for the kinds that differentiate twice."""
    if need is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(quiet_attention_fallback())
    stack.enter_context(second_order(need))
    return stack


_ChunkProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _outputs_at(fmodel: FunctionalModel, state: ModelState
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(flat parameters, inputs) -> outputs`` with ``state``'s buffers."""
    def outputs(flat: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        return fmodel(fmodel.unflatten(flat), state.buffers, xc)
    return outputs


def _fisher_chunk_product(fmodel: FunctionalModel, state: ModelState, task: Task, n: int,
                          chunk_size: int) -> _ChunkProduct:
    """``(v, x_chunk, targets_chunk) -> (1/n) G^T G v`` from the chunk's per-sample
    gradients ``G``."""
    def fisher_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
        g = per_sample_grads(fmodel, state, xc, tc, task, chunk_size).to(SOLVE_DTYPE)
        return g.T @ (g @ v) / n
    return fisher_chunk


def _hessian_chunk_product(fmodel: FunctionalModel, state: ModelState, task: Task,
                           n: int) -> _ChunkProduct:
    """``(v, x_chunk, targets_chunk) -> H v``, ``H`` the Hessian of the chunk's summed loss
    / n, by double backward: the chunk's loss gradient with its graph, then one backward pass
    through it per column of v.

    Not forward-over-reverse (``jvp`` of ``grad`` under ``vmap``): torch 2.13's nested
    forward-mode derivatives of ``layer_norm`` and ``batch_norm`` are wrong in some
    compositions (pytorch/pytorch#196700, #196699; ``torch.func.hessian`` through a
    LayerNorm is, tests/engine/test_torch_defects.py) and the fused CPU attention kernels
    have none. Measured with one thread on MLP, LayerNorm-MLP, CNN and GPT-2 models of
    1500-2500 parameters and 64-256 samples: with 2 columns double backward took 0.35-0.7 x
    the time of forward-over-reverse, with 16 columns 0.9-1.8 x (slower only on the MLP and
    the CNN).
    """
    flat = state.flat().detach().requires_grad_(True)
    checked: list[bool] = []  # the graph is checked once: every chunk runs the same layers

    def hessian_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
        g = loss_gradient(fmodel, flat, state.buffers, xc, tc, task, n,
                          check=None if checked else HESSIAN)
        checked.append(True)
        columns = v.to(flat.dtype).T.contiguous()
        return torch.stack(list(gradient_products(g, flat, columns)), 1).to(SOLVE_DTYPE)
    return hessian_chunk


def _ggn_chunk_product(fmodel: FunctionalModel, state: ModelState, task: Task, n: int,
                       ggn_rank: int | str | None) -> _ChunkProduct:
    """``(v, x_chunk, targets_chunk) -> (1/n) sum_i J_i^T H_i J_i v`` over the chunk.

    ``J v`` by forward mode (``jvp`` under ``vmap`` over the columns): first derivatives
    only, right on every model of tests/engine/test_exactness.py, and faster where conjugate
    gradients carry many columns (16 trace probes, a batch of test samples): measured with
    one thread on MLP, LayerNorm-MLP, CNN and GPT-2 models of 1500-2500 parameters, 0.3-0.7 x
    the time of the reverse route with 16 columns (0.8-1.3 x with 2). A model forward mode
    cannot run (an operation or a ``torch.autograd.Function`` without a forward-mode rule)
    takes the reverse route from then on: ``J v`` as the derivative of ``J^T u`` with
    respect to u (double backward)."""
    flat0 = state.flat().detach()
    outputs = _outputs_at(fmodel, state)
    reverse: list[bool] = []  # set once forward mode failed on this model

    def loss_hessians(out: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        h = ggn_factor(task, out.detach(), tc, ggn_rank)
        return h @ h.transpose(1, 2) / n  # (c, d, d) loss Hessians in output space

    def forward_mode(v: torch.Tensor, xc, tc) -> torch.Tensor:
        out, pullback = vjp(lambda f: outputs(f, xc), flat0)
        h = loss_hessians(out, tc)

        def gvp(col):
            jv = jvp(lambda f: outputs(f, xc), (flat0,), (col,))[1]
            return pullback(torch.einsum("nab,nb->na", h, jv))[0]
        return vmap(gvp, in_dims=1, out_dims=1)(v)

    def reverse_mode(v: torch.Tensor, xc, tc) -> torch.Tensor:
        flat = flat0.clone().requires_grad_(True)
        out = outputs(flat, xc)
        h = loss_hessians(out, tc)
        u = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, flat, grad_outputs=u, create_graph=True)
        check_twice_differentiable(jtu, GGN_PRODUCTS)
        columns = []
        for jv in gradient_products(jtu, u, v.T.contiguous()):
            (col,) = torch.autograd.grad(out, flat, torch.einsum("nab,nb->na", h, jv),
                                         retain_graph=True)
            columns.append(col)
        return torch.stack(columns, 1)

    def ggn_chunk(v: torch.Tensor, xc, tc) -> torch.Tensor:
        v = v.to(flat0.dtype)
        if not reverse:
            try:
                return forward_mode(v, xc, tc).to(SOLVE_DTYPE)
            except Exception as exc:  # noqa: BLE001 (any failure of forward mode: reverse)
                reverse.append(True)
                log.debug("Gauss-Newton products by double backward: forward mode failed "
                          "(%s)", exception_text(exc))
        return reverse_mode(v, xc, tc).to(SOLVE_DTYPE)
    return ggn_chunk


def cg_solver(
    product: Callable[[torch.Tensor], torch.Tensor], dim: int, settings: CurvatureSettings,
    cg: CGSettings, kind: str, trace: float, effective_dim: int | None = None,
) -> Solver:
    """Solver for ``C + damping I`` by conjugate gradients on ``product`` (v -> C v, (D, r)).

    ``trace`` (of C) sets the default damping, ``default_damping_ratio * trace /
    effective_dim`` (default ``dim``; see :func:`rank_bound`); a zero damping starts at
    1e-12 times the mean eigenvalue. Retries and diagnostics: :class:`iif.engine.linalg.CGSolver`.
    """
    damping = default_damping(settings, trace, effective_dim or dim)
    if damping == 0:
        damping = 1e-12 * max(abs(trace) / dim, 1e-300)
    return CGSolver(product, dim, damping, settings, cg.max_iter, cg.tol, kind)
