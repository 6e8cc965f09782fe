"""Exact (unprojected) Fisher and Gauss-Newton solves from layer factors, without per-sample
gradients.

For an ``nn.Linear`` layer called once per forward on (batch, features) inputs, the gradient of
a per-sample scalar ``s_i`` with respect to the layer's weight and bias is the outer product
``delta_i [a_i, 1]^T`` of its output gradient ``delta_i = ds_i / d(layer output)`` (out) and its
input ``a_i`` (in) with a one for the bias. Inner products of such gradients factor exactly:

    <grad s_i, grad t_j> = sum_l ([a_i, 1] . [a_j, 1]) (delta^s_i . delta^t_j)

so a model whose trainable parameters all sit in such layers needs, per sample, only its layer
inputs ``A_l`` (N, in_l + 1) and output gradients ``D_l`` (N, R, out_l) for R scalars: every
product of a Woodbury solve of the empirical Fisher ``F = (1/N) U^T U + delta I`` (U the N x M
matrix of per-sample gradients u_i) is a sum over layers of products of these small matrices,
and no N x M matrix is ever formed:

- ``K = U U^T = sum_l (A_l A_l^T) * (D_l D_l^T)`` (N x N, elementwise product),
- ``U v = sum_l rowsum((D_l V_l) * A_l)`` for an M-vector given as per-layer matrices V_l,
- ``U^T w = [D_l^T diag(w) A_l]_l`` as per-layer matrices.

A score of Integrated Influence's path step (or of the influence function) is then

    -(1/N) gamma^T F^{-1} psi_i = -(1/(N delta)) [psi_i . gamma - (Psi U^T w)_i],
    w = (N delta I + K)^{-1} U gamma,

in ``O(N^2 sum_l (in_l + out_l) + N^3 / 3 + N M)`` operations instead of ``O(N^2 M)``. All
products run in float64; the damping follows the dense solves' rule
(``curvature.default_damping``) and the Cholesky factor comes from
``linalg.damped_cholesky`` (retried with more damping when not positive definite).

The Gauss-Newton matrix ``G = (1/N) sum_i J_i^T L_i L_i^T J_i`` is the same construction
with the rows ``J_i^T L_i[:, r]``: each is the gradient of the scalar ``<f(x_i), L_i[:, r]>``,
so it factors like a loss gradient, and ``ggn_rank`` columns of ``L_i`` give N x ggn_rank
Woodbury rows (:func:`ggn_rows`); psi and gamma stay the loss-gradient factors.

Layers are recorded with forward hooks in eval mode (dropout off, BatchNorm on running statistics),
``chunk_size`` samples at a time (grown, as the Kronecker fast path of ``iif.engine.features`` does,
to the memory of a dense chunk). :func:`supports_factored` says whether a model qualifies; it also
checks the factors against per-sample gradients on two samples, so a Linear subclass with its own
forward or a weight used outside its layer is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from iif.engine.budget import grown_chunk
from iif.engine.curvature import CurvatureSettings, default_damping
from iif.engine.functional import FunctionalModel, ModelState, module_mode
from iif.engine.grads import (
    ggn_factor,
    loss_and_target_jvps,
    measurement_fn,
    path_step_fn,
    per_sample_jacobians,
    sample_loss_fn,
)
from iif.engine.linalg import SOLVE_DTYPE, Solver, damped_cholesky
from iif.errors import CurvatureError, InputError
from iif.task.task import Task

log = logging.getLogger(__name__)

# rows of one block of the N x N products (the Gram matrices are built block by block; a
# symmetric one computes its upper blocks and mirrors them)
GRAM_BLOCK = 512
# float64 values of one temporary of the matrix-vector helpers
_BLOCK_ELEMENTS = 1 << 24
# an eigendecomposition of an n x n matrix costs about this many Cholesky factors (measured
# 15-18 for n = 500..2000 on CPU): FactoredFisher.solvers takes it for more damping values
EIGH_CHOLESKIES = 16


# ---- layers and factors ----------------------------------------------------------------------
@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` module and the names of its trainable weight and bias (None when
    frozen or absent). Its gradient is an out x cols matrix: the weight's in columns (when
    trainable), then the bias column (when trainable)."""

    module: nn.Linear
    weight: str | None
    bias: str | None

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def cols(self) -> int:
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)

    @property
    def size(self) -> int:
        return self.out_features * self.cols


@dataclass
class Factors:
    """Per-sample gradient factors of R scalars per sample on the layers ``layers``.

    ``inputs[l]`` (n, cols_l): the layer input ``[a_i, 1]`` restricted to its trainable
    columns; ``grads[l]`` (n, R, out_l): the output gradients of the R scalars. Row r of
    sample i has the gradient ``grads[l][i, r] (x) inputs[l][i]`` on layer l. float64.
    """

    layers: list[LinearLayer]
    inputs: list[torch.Tensor]
    grads: list[torch.Tensor]

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def rows(self) -> int:
        return int(self.grads[0].shape[1])

    def sq_norms(self, row: int = 0) -> torch.Tensor:
        """Squared norms (n,) of the per-sample gradients of row ``row``:
        ``sum_l |inputs_l,i|^2 |grads_l,i,row|^2``."""
        return sum(a.pow(2).sum(1) * d[:, row].pow(2).sum(1)
                   for a, d in zip(self.inputs, self.grads, strict=True))


class _Unsupported(InputError):
    """The model's layers do not factor (a Linear called twice or never, inputs with more
    than two dimensions)."""


def linear_layers(fmodel: FunctionalModel) -> list[LinearLayer] | None:
    """The ``nn.Linear`` layers holding every trainable parameter of the model, or None when
    some trainable parameter is not the weight or bias of exactly one Linear module (a
    convolution, a normalisation, a parameter shared by two modules)."""
    module = fmodel.module
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((m, pname))
    roles: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for name in fmodel.names:
        own = owners.get(id(module.get_parameter(name)), [])
        if len(own) != 1:
            return None
        m, pname = own[0]
        if not isinstance(m, nn.Linear) or pname not in ("weight", "bias"):
            return None
        roles.setdefault(id(m), (m, {}))[1][pname] = name
    return [LinearLayer(m, r.get("weight"), r.get("bias")) for m, r in roles.values()]


def _require_layers(fmodel: FunctionalModel) -> list[LinearLayer]:
    layers = linear_layers(fmodel)
    if layers is None:
        raise InputError("factored solves need every trainable parameter in an nn.Linear "
                         "layer (weight or bias); use the dense solve for this model")
    return layers


def _chunk(fmodel: FunctionalModel, layers: list[LinearLayer], chunk_size: int,
           rows: int) -> int:
    """Samples per chunk: as many as fit the memory of a dense chunk of ``chunk_size``
    samples (``chunk_size * rows * M`` values), up to ``iif.engine.budget.MAX_FAST_CHUNK``."""
    widths = sum(layer.in_features + layer.out_features for layer in layers)
    return grown_chunk(chunk_size, rows, fmodel.num_params, (rows + 2) * widths)


def linear_factors(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    fn: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    chunk_size: int = 128,
    layers: list[LinearLayer] | None = None,
) -> Factors:
    """Layer inputs and output gradients of the R scalars ``fn(output_i, *args_i)`` per
    sample (``fn`` as for ``iif.engine.grads.per_sample_jacobians``), in eval mode.

    One batched forward per chunk records each layer's input and output with hooks; R
    backward passes give the output gradients. Raises :class:`InputError` when a layer is
    not called exactly once per forward, gets inputs that are not (batch, features), or the
    factors are not finite.
    """
    layers = _require_layers(fmodel) if layers is None else layers
    n = x.shape[0]
    if n == 0:
        raise InputError("no samples to factor")
    recorder = _LayerRecorder(layers)
    # parameters require grad only so that the layer outputs do
    params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    a_out = [torch.empty(n, layer.cols, dtype=SOLVE_DTYPE, device=x.device) for layer in layers]
    d_out: list[torch.Tensor] = []
    step = None
    with recorder, module_mode(fmodel.module, False), torch.enable_grad():
        start = 0
        while start < n:
            stop = start + (step or chunk_size)
            values = recorder.forward(fmodel, params, state, x[start:stop], fn,
                                      [a[start:stop] for a in args])  # (c, R)
            c, r = values.shape
            if step is None:
                step = _chunk(fmodel, layers, chunk_size, r)
                d_out = [torch.zeros(n, r, layer.out_features, dtype=SOLVE_DTYPE,
                                     device=x.device) for layer in layers]
            for a_l, inp, layer in zip(a_out, recorder.inputs, layers, strict=True):
                a_l[start : start + c] = _augmented(inp, layer)
            _output_gradients(values, recorder.outputs, d_out, start)
            start += c
    _check_finite_factors(a_out, d_out)
    return Factors(layers, a_out, d_out)


class _LayerRecorder:
    """Forward hooks on ``layers`` (registered while the recorder is entered as a context)
    recording, per forward, how often each layer is called, its input and its output."""

    def __init__(self, layers: list[LinearLayer]):
        self.layers = layers
        self.calls = [0] * len(layers)
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def record(module, inp, out):
            self.calls[index] += 1
            self.inputs[index] = inp[0].detach()
            self.outputs[index] = out
            # later in-place operations (ReLU(inplace=True)) act on a copy, so ``out`` stays
            # the layer's output in the graph
            return out.clone()
        return record

    def __enter__(self) -> _LayerRecorder:
        self._handles = [layer.module.register_forward_hook(self._hook(i))
                         for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def forward(self, fmodel: FunctionalModel, params: dict[str, torch.Tensor],
                state: ModelState, xc: torch.Tensor, fn: Callable[..., torch.Tensor],
                args: list[torch.Tensor]) -> torch.Tensor:
        """The R scalars ``fn(output_i, *args_i)`` of each sample of the chunk ``xc``, shape
        (c, R), recording the layers' inputs and outputs (each layer called once)."""
        from torch.func import vmap

        self.calls[:] = [0] * len(self.layers)
        out = fmodel(params, state.buffers, xc)
        _check_calls(self.layers, self.calls, self.inputs)
        return vmap(lambda o, *a: fn(o, *a).reshape(-1))(out, *args)


def _output_gradients(values: torch.Tensor, outputs: list, d_out: list[torch.Tensor],
                      start: int) -> None:
    """Write the gradients of each of the R columns of ``values`` (c, R) with respect to the
    layer ``outputs`` into rows ``start..start + c`` of ``d_out`` (one backward per column)."""
    c, r = values.shape
    for j in range(r):
        deltas = torch.autograd.grad(values[:, j].sum(), outputs,
                                     retain_graph=j < r - 1, allow_unused=True)
        for d_l, delta in zip(d_out, deltas, strict=True):
            if delta is not None:
                d_l[start : start + c, j] = delta


def _check_finite_factors(a_out: list[torch.Tensor], d_out: list[torch.Tensor]) -> None:
    for tensor in (*a_out, *d_out):
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise InputError("per-sample gradients contain NaN or inf: the model or its loss "
                             "is not finite on some samples")


def _check_calls(layers: list[LinearLayer], calls: list[int], inputs: list) -> None:
    for layer, c, inp in zip(layers, calls, inputs, strict=True):
        if c != 1:
            raise _Unsupported(
                f"a Linear layer ({layer.weight or layer.bias}) is called {c} times per "
                f"forward; factored solves need each layer called exactly once"
            )
        if inp.dim() != 2:
            raise _Unsupported(
                f"a Linear layer ({layer.weight or layer.bias}) gets inputs of shape "
                f"{tuple(inp.shape)}; factored solves need (batch, features) inputs"
            )


def _augmented(a: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """``[a, 1]`` restricted to the layer's trainable columns, float64."""
    parts = [a.to(SOLVE_DTYPE)] if layer.weight else []
    if layer.bias:
        parts.append(torch.ones(a.shape[0], 1, dtype=SOLVE_DTYPE, device=a.device))
    return torch.cat(parts, dim=1)


def supports_factored(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor) -> bool:
    """Whether the factored solves apply to this model: every trainable parameter is the
    weight or bias of an ``nn.Linear`` layer that one forward calls exactly once on (batch,
    features) inputs, and the factors of two samples ``x[:2]`` reproduce their per-sample gradients
    (``iif.engine.grads.per_sample_jacobians``) of a random output direction."""
    layers = linear_layers(fmodel)
    if layers is None or x.shape[0] == 0:
        return False
    probe = x[:2]
    out_dim = fmodel.outputs(state, probe[:1]).shape[1]
    gen = torch.Generator().manual_seed(0)
    dtype = next(iter(state.params.values())).dtype
    direction = torch.randn(out_dim, generator=gen, dtype=torch.float64).to(probe.device, dtype)

    def fn(out: torch.Tensor) -> torch.Tensor:
        return (out * direction).sum()

    try:
        factors = linear_factors(fmodel, state, probe, fn, chunk_size=2, layers=layers)
    except _Unsupported:
        return False
    dense = torch.cat([j[:, 0] for _, j in per_sample_jacobians(fmodel, state, probe, fn,
                                                                 chunk_size=2)])
    mine = dense_rows(fmodel, factors)
    scale = float(dense.abs().max()) + torch.finfo(dtype).tiny
    return float((mine - dense.to(SOLVE_DTYPE)).abs().max()) <= torch.finfo(dtype).eps ** 0.5 \
        * scale


# ---- flat parameter vectors ------------------------------------------------------------------
def _offsets(fmodel: FunctionalModel) -> dict[str, int]:
    return dict(zip(fmodel.names, np.cumsum([0, *fmodel.sizes[:-1]]).tolist(), strict=True))


def to_flat(fmodel: FunctionalModel, layers: list[LinearLayer],
            mats: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer matrices (s, out_l, cols_l) -> vectors (s, M) in the order of
    ``fmodel.names``."""
    offsets = _offsets(fmodel)
    s = mats[0].shape[0]
    flat = torch.zeros(s, fmodel.num_params, dtype=mats[0].dtype, device=mats[0].device)
    for layer, v in zip(layers, mats, strict=True):
        col = 0
        if layer.weight:
            lo = offsets[layer.weight]
            flat[:, lo : lo + layer.out_features * layer.in_features] = \
                v[:, :, : layer.in_features].reshape(s, -1)
            col = layer.in_features
        if layer.bias:
            lo = offsets[layer.bias]
            flat[:, lo : lo + layer.out_features] = v[:, :, col]
    return flat


def from_flat(fmodel: FunctionalModel, layers: list[LinearLayer],
              flat: torch.Tensor) -> list[torch.Tensor]:
    """Vectors (s, M) in the order of ``fmodel.names`` -> per-layer matrices
    (s, out_l, cols_l)."""
    offsets = _offsets(fmodel)
    s = flat.shape[0]
    mats = []
    for layer in layers:
        out, parts = layer.out_features, []
        if layer.weight:
            lo = offsets[layer.weight]
            parts.append(flat[:, lo : lo + out * layer.in_features].reshape(s, out, -1))
        if layer.bias:
            lo = offsets[layer.bias]
            parts.append(flat[:, lo : lo + out, None])
        mats.append(torch.cat(parts, dim=2))
    return mats


def dense_rows(fmodel: FunctionalModel, factors: Factors, row: int = 0) -> torch.Tensor:
    """The per-sample gradients (n, M) of row ``row``, materialised (for checks on small
    models)."""
    return to_flat(fmodel, factors.layers,
                   [d[:, row, :, None] * a[:, None, :]
                    for a, d in zip(factors.inputs, factors.grads, strict=True)])


# ---- products --------------------------------------------------------------------------------
def grams(left: Factors, right: Factors | None = None,
          pairs: Sequence[tuple[int, int]] = ((0, 0),)) -> list[torch.Tensor]:
    """Gram matrices ``K[i, j] = <grad row r1 of left sample i, grad row r2 of right sample j>
    = sum_l (A1_l A2_l^T)[i, j] (D1_l[:, r1] D2_l[:, r2]^T)[i, j]``, one (n1, n2) float64
    matrix per pair ``(r1, r2)``; the input products are shared by the pairs.

    ``right=None`` means ``left`` with itself: only the upper blocks are computed, the input
    products of the lower blocks are their transposes, and the matrices of pairs with
    ``r1 == r2`` are mirrored (symmetric)."""
    sym = right is None
    right = left if sym else right
    n1, n2 = len(left), len(right)
    device = left.inputs[0].device
    out = [torch.zeros(n1, n2, dtype=SOLVE_DTYPE, device=device) for _ in pairs]
    blocks1 = [slice(lo, min(lo + GRAM_BLOCK, n1)) for lo in range(0, n1, GRAM_BLOCK)]
    blocks2 = [slice(lo, min(lo + GRAM_BLOCK, n2)) for lo in range(0, n2, GRAM_BLOCK)]
    for i, b1 in enumerate(blocks1):
        for j, b2 in enumerate(blocks2):
            if sym and j < i:
                continue
            lower = sym and j > i  # also fill block (j, i)
            for a1, d1, a2, d2 in zip(left.inputs, left.grads, right.inputs, right.grads,
                                      strict=True):
                g = a1[b1] @ a2[b2].T
                for k, (r1, r2) in zip(out, pairs, strict=True):
                    k[b1, b2] += g * (d1[b1, r1] @ d2[b2, r2].T)
                    if lower and r1 != r2:
                        k[b2, b1] += g.T * (d1[b2, r1] @ d2[b1, r2].T)
            if lower:
                for k, (r1, r2) in zip(out, pairs, strict=True):
                    if r1 == r2:
                        k[b2, b1] = k[b1, b2].T
    return out


def gram(left: Factors, right: Factors | None = None, rows: tuple[int, int] = (0, 0)
         ) -> torch.Tensor:
    """One Gram matrix of :func:`grams`: rows ``rows[0]`` of ``left`` against rows
    ``rows[1]`` of ``right`` (default ``left``)."""
    return grams(left, right, (rows,))[0]


def _row_grads(d: torch.Tensor, rows: int | Sequence[int]) -> torch.Tensor:
    """Output gradients of one row for every vector, (n, out), or of one row per vector,
    (s, n, out)."""
    if isinstance(rows, (int, np.integer)):
        return d[:, int(rows)]
    return d[:, list(rows)].transpose(0, 1)


def apply_rows(factors: Factors, vectors: list[torch.Tensor],
               rows: int | Sequence[int] = 0) -> torch.Tensor:
    """``U v`` (n, s): the inner products of the per-sample gradients of row ``rows`` (one row
    for all vectors, or one per vector) with s vectors given as per-layer matrices
    (s, out_l, cols_l) (see :func:`from_flat`)."""
    n, s = len(factors), vectors[0].shape[0]
    res = torch.zeros(s, n, dtype=SOLVE_DTYPE, device=factors.inputs[0].device)
    for a, d, v in zip(factors.inputs, factors.grads, vectors, strict=True):
        dr = _row_grads(d, rows)
        out, cols = v.shape[1], v.shape[2]
        step = max(1, _BLOCK_ELEMENTS // max(n * min(out, cols), 1))
        for lo in range(0, s, step):
            vs = v[lo : lo + step].to(SOLVE_DTYPE)
            ds = dr if dr.dim() == 2 else dr[lo : lo + step]
            if out <= cols:  # (s, n, out): the inputs through each vector, against delta
                res[lo : lo + step] += ((a @ vs.transpose(1, 2)) * ds).sum(-1)
            else:  # (s, n, cols): delta through each vector, against the inputs
                res[lo : lo + step] += ((ds @ vs) * a).sum(-1)
    return res.T


def combine_rows(factors: Factors, weights: torch.Tensor,
                 rows: int | Sequence[int] = 0) -> list[torch.Tensor]:
    """``U^T w`` as per-layer matrices (s, out_l, cols_l): for each of the s columns of
    ``weights`` (n, s), ``sum_i w_i u_i`` with u_i the gradient of row ``rows`` (one row for
    all columns, or one per column) of sample i."""
    n, s = weights.shape
    w = weights.to(SOLVE_DTYPE)
    mats = []
    for a, d in zip(factors.inputs, factors.grads, strict=True):
        dr = _row_grads(d, rows)
        step = max(1, _BLOCK_ELEMENTS // max(n * d.shape[2], 1))
        parts = []
        for lo in range(0, s, step):
            ds = dr if dr.dim() == 2 else dr[lo : lo + step]
            scaled = w.T[lo : lo + step, :, None] * ds  # (s, n, out)
            parts.append(scaled.transpose(1, 2) @ a)  # (s, out, cols)
        mats.append(torch.cat(parts))
    return mats


# ---- the factored Woodbury solve -------------------------------------------------------------
class FactoredFisher:
    """The empirical Fisher ``F = (1/n) U^T U + delta I`` of the per-sample gradients of row
    ``row`` of ``factors``, solved in n dimensions (Woodbury) from its Gram matrix
    ``K = U U^T`` (:func:`grams`; pass ``gram`` when it is already computed).

    ``n`` (default the number of samples) is the N of the mean; ``effective_dim`` the
    number of eigenvalues the default damping averages (default M, as ``gram_solver``).
    """

    def __init__(self, fmodel: FunctionalModel, factors: Factors, settings: CurvatureSettings,
                 effective_dim: int | None = None, n: int | None = None, row: int = 0,
                 gram: torch.Tensor | None = None):
        self.fmodel = fmodel
        self.factors = factors
        self.settings = settings
        self.row = row
        self.n = len(factors) if n is None else int(n)
        self.kuu = grams(factors, pairs=((row, row),))[0] if gram is None else gram
        if not bool(torch.isfinite(self.kuu).all()):
            raise InputError("per-sample gradients contain NaN or inf; the curvature cannot "
                             "be built")
        self.trace = float(torch.diagonal(self.kuu).sum()) / self.n
        self.effective_dim = effective_dim or fmodel.num_params

    @property
    def default_damping(self) -> float:
        """The damping of the dense solves' rule (``curvature.default_damping``)."""
        return default_damping(self.settings, self.trace, self.effective_dim)

    def _start(self, base: float) -> tuple[float, int]:
        """A positive first damping: the Woodbury form needs damping > 0, so an undamped
        request starts where the dense solve's first retry would (1e-6 x the mean diagonal
        of F), counted as one retry."""
        if base > 0:
            return base, 0
        mean_diag = abs(self.trace) / self.fmodel.num_params
        nxt = 1e-6 * mean_diag if mean_diag > 0 else 1e-12
        log.warning("fisher curvature with damping 0 is singular in the Woodbury form "
                    "(N < M); solved with damping %.3g", nxt)
        return nxt, 1

    def solver(self, damping: float | None = None) -> FactoredSolver:
        """The solver at ``damping`` (default: the dense solves' rule), on a Cholesky factor
        of ``K + n delta I`` (``linalg.damped_cholesky``: more damping when not positive
        definite, reported)."""
        base, extra = self._start(self.default_damping if damping is None else damping)
        factor, used, retries = damped_cholesky(self.kuu, base, float(self.n), self.settings,
                                                "fisher")
        return self.cholesky_solver(factor, used, retries + extra)

    def cholesky_solver(self, factor: torch.Tensor, damping: float, retries: int
                        ) -> FactoredSolver:
        """The solver on a Cholesky factor (n, n) of ``K + n damping I`` already computed
        (by :meth:`solver`, or loaded with a fitted state: ``iif.results.fitted``)."""

        def inner(rhs: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(rhs, factor)

        solver = FactoredSolver(self, damping, retries, inner, "cholesky")
        solver.cholesky = factor  # kept for saving the fitted state
        return solver

    def solvers(self, dampings: Sequence[float],
                method: Literal["auto", "eigh", "cholesky"] = "auto") -> list[FactoredSolver]:
        """Solvers for several damping values from one Gram matrix K.

        ``eigh``: one eigendecomposition of K, then O(n^2) per solve; a value at which
        ``K + n delta I`` is not numerically positive definite (smallest eigenvalue below
        n eps times the largest) is raised by ``retry_factor`` as the Cholesky solves do, and
        the retries are reported. ``cholesky``: one Cholesky factor per value. An
        eigendecomposition costs about as much as ``EIGH_CHOLESKIES`` Cholesky factors, so
        ``auto`` takes it for more values than that."""
        values = []
        for value in dampings:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not (float(value) >= 0):
                raise InputError(f"dampings must be numbers >= 0, got {value!r}")
            values.append(float(value))
        if method not in ("auto", "eigh", "cholesky"):
            raise InputError(f"method must be 'auto', 'eigh' or 'cholesky', got {method!r}")
        if method == "cholesky" or (method == "auto" and len(values) <= EIGH_CHOLESKIES):
            return [self.solver(value) for value in values]
        evals, evecs = torch.linalg.eigh(self.kuu)
        top = float(evals.abs().max()) if evals.numel() else 0.0
        floor = self.n * torch.finfo(SOLVE_DTYPE).eps * top
        out = []
        for value in values:
            damping, retries = self._start(value)
            while float((evals + self.n * damping).min()) <= floor:
                if retries >= self.settings.max_retries:
                    raise CurvatureError(
                        f"fisher curvature is not positive definite even with damping "
                        f"{damping:.3g} after {retries} retries")
                damping *= self.settings.retry_factor
                retries += 1
            if retries:
                log.warning("fisher curvature was not positive definite; solved with damping "
                            "%.3g after %d retries", damping, retries)
            scale = 1.0 / (evals + self.n * damping)

            def inner(rhs: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
                return evecs @ (scale[:, None] * (evecs.T @ rhs))

            out.append(FactoredSolver(self, damping, retries, inner, "eigh"))
        return out


class FactoredSolver(Solver):
    """``solve(v) = F^{-1} v`` for M-vectors v (``iif.engine.linalg.Solver``), through the
    factors: ``(1/delta) [v - U^T (n delta I + K)^{-1} U v]``. ``inner(r)`` solves
    ``(n delta I + K) x = r`` for r (n, s)."""

    def __init__(self, fisher: FactoredFisher, damping: float, retries: int,
                 inner: Callable[[torch.Tensor], torch.Tensor], how: str):
        super().__init__(fisher.fmodel.num_params, damping, retries, self._flat,
                         fisher.settings.kind)
        self.fisher = fisher
        self.inner = inner
        self.cholesky: torch.Tensor | None = None  # the factor behind ``inner``, if one
        self.details = {"solver": "factored", "factorisation": how, "trace": fisher.trace,
                        "effective_dim": fisher.effective_dim}

    def _flat(self, v: torch.Tensor) -> torch.Tensor:
        f = self.fisher
        layers = f.factors.layers
        uv = apply_rows(f.factors, from_flat(f.fmodel, layers, v.T), f.row)  # (n, r)
        back = to_flat(f.fmodel, layers, combine_rows(f.factors, self.inner(uv), f.row))
        return (v - back.T) / self.damping

    def scores(self, test: Factors, psi_row: int = 1, paired: bool = False,
               psi: Factors | None = None, k_psi_u: torch.Tensor | None = None
               ) -> torch.Tensor:
        """``-(1/n) gamma_s^T F^{-1} psi_i`` (s, n): see :func:`woodbury_scores`."""
        return woodbury_scores([self], test, psi_row, paired, psi, k_psi_u)[0]


def woodbury_scores(
    solvers: Sequence[FactoredSolver],
    test: Factors,
    psi_row: int = 1,
    paired: bool = False,
    psi: Factors | None = None,
    k_psi_u: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Scores ``-(1/n) gamma_s^T F^{-1} psi_i``, (s, n) float64 per solver (all of one
    :class:`FactoredFisher`), with gamma_s the row-0 gradient of test sample s and psi_i the
    row ``psi_row`` gradient of training sample i in ``psi`` (default the Fisher's own
    factors, whose layer inputs then serve u and psi alike). ``paired``: test sample s is
    scored against row ``psi_row + s`` (B paths sharing the model, one test sample each).

    ``w_s = (n delta I + K)^{-1} U gamma_s``; then ``Psi U^T w_s`` either as
    ``Psi (U^T w_s)`` through per-layer matrices (O(s n M)) or, given ``k_psi_u = Psi U^T``
    (n, n) from :func:`grams`, as ``k_psi_u @ w_s`` (O(n^2 s)).
    """
    fisher = solvers[0].fisher
    train, row, n = fisher.factors, fisher.row, fisher.n
    psi = train if psi is None else psi
    s = len(test)
    if paired:
        if psi_row + s > psi.rows:
            raise InputError(f"paired scores need {s} psi rows from row {psi_row}, the factors "
                             f"have {psi.rows} rows")
        if k_psi_u is not None:
            raise InputError("paired scores compute Psi U^T w through per-layer matrices")
        psi_rows: int | list[int] = list(range(psi_row, psi_row + s))
    else:
        psi_rows = psi_row
    if psi is train and not paired and psi_row == row:  # influence functions: psi = u
        u_gamma = psi_gamma = gram(train, test, (row, 0))
    elif psi is train and not paired:
        u_gamma, psi_gamma = grams(train, test, ((row, 0), (psi_row, 0)))
    else:
        u_gamma = gram(train, test, (row, 0))
        psi_gamma = (_paired_products(psi, test, psi_row) if paired
                     else gram(psi, test, (psi_row, 0)))  # (n, s)
    out = []
    for solver in solvers:
        w = solver.inner(u_gamma)  # (n, s)
        if k_psi_u is not None:
            psi_v = k_psi_u @ w
        else:
            psi_v = apply_rows(psi, combine_rows(train, w, row), psi_rows)
        out.append(-((psi_gamma - psi_v) / (n * solver.damping)).T)
    return out


def _paired_products(left: Factors, test: Factors, first: int) -> torch.Tensor:
    """(n, s): column s is the inner product of row ``first + s`` of ``left`` with row 0 of
    test sample s."""
    s = len(test)
    res = torch.zeros(len(left), s, dtype=SOLVE_DTYPE, device=left.inputs[0].device)
    for a, d, at, dt in zip(left.inputs, left.grads, test.inputs, test.grads, strict=True):
        res += (a @ at.T) * torch.einsum("nso,so->ns", d[:, first : first + s], dt[:, 0])
    return res


def _kernel_route(n: int, s: int, solves: int, layers: list[LinearLayer]) -> bool:
    """Whether ``Psi U^T w`` is cheaper through the (n, n) matrix ``Psi U^T`` (its output
    side n^2 sum(out) plus n^2 s per solve) than through per-layer matrices (4 s n M per
    solve)."""
    m = sum(layer.size for layer in layers)
    outs = sum(layer.out_features for layer in layers)
    return n * (outs + s * solves) < 2 * s * m * solves


def ggn_rows(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
             targets: torch.Tensor, task: Task, rank: int | None,
             layers: list[LinearLayer], chunk_size: int = 128) -> Factors:
    """Factors of the Gauss-Newton rows ``J_i^T L_i[:, r]`` (``iif.engine.grads.ggn_factor``),
    one factor sample per (i, r): their Gram matrix / N is the Gauss-Newton matrix."""
    outputs = fmodel.outputs(state, x)
    factor = ggn_factor(task, outputs, targets, rank).to(outputs.dtype)  # (n, d, r)

    def contracted(o: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return o @ f  # (r,): the gradient of <f(x), L[:, r]> is J^T L[:, r]

    rows = linear_factors(fmodel, state, x, contracted, factor, chunk_size=chunk_size,
                          layers=layers)
    r = rows.rows
    return Factors(layers, [a.repeat_interleave(r, dim=0) for a in rows.inputs],
                   [d.reshape(-1, 1, d.shape[-1]) for d in rows.grads])


def _curvature(fmodel: FunctionalModel, state: ModelState, train: Factors, x: torch.Tensor,
               targets: torch.Tensor, task: Task, settings: CurvatureSettings,
               effective_dim: int | None, chunk_size: int, gram: torch.Tensor | None = None
               ) -> FactoredFisher:
    """The damped curvature of ``settings.kind`` at ``state``: the empirical Fisher of row 0
    of ``train``, or the Gauss-Newton matrix of ``targets`` (N x ggn_rank Woodbury rows)."""
    if settings.kind == "fisher":
        return FactoredFisher(fmodel, train, settings, effective_dim, gram=gram)
    if settings.kind == "ggn":
        rows = ggn_rows(fmodel, state, x, targets, task, settings.ggn_rank, train.layers,
                        chunk_size)
        return FactoredFisher(fmodel, rows, settings, effective_dim, n=len(train))
    raise InputError(f"factored solves use the empirical Fisher or Gauss-Newton, not "
                     f"{settings.kind!r}")


# ---- entry points of the methods -------------------------------------------------------------
@dataclass(frozen=True)
class StepOptions:
    """How :func:`factored_step_scores` solves: ``effective_dim`` (the eigenvalue count of
    the default damping), ``chunk_size`` (samples per chunk of layer factors), ``dampings``
    (explicit values instead of the default rule) and ``method`` (their solve, see
    :meth:`FactoredFisher.solvers`)."""

    effective_dim: int | None = None
    chunk_size: int = 128
    dampings: Sequence[float] | None = None
    method: Literal["auto", "eigh", "cholesky"] = "auto"


def factored_step_scores(
    fmodel: FunctionalModel,
    state: ModelState,
    train_x: torch.Tensor,
    rho: torch.Tensor,
    rho_prev: torch.Tensor,
    test_x: torch.Tensor,
    test_targets: torch.Tensor,
    task: Task,
    settings: CurvatureSettings,
    options: StepOptions | None = None,
    **changes: object,
) -> tuple[torch.Tensor, FactoredSolver] | tuple[list[torch.Tensor], list[FactoredSolver]]:
    """One exact path step of Integrated Influence with the empirical Fisher (or, for
    ``settings.kind == "ggn"``, the Gauss-Newton matrix of ``rho`` in place of F):
    ``I^(k)[s, i] = -(1/N) gamma_s^T F^{-1} psi_i`` (n_test, N) float64, with
    ``u_i, psi_i`` the gradients of ``iif.engine.grads.path_step_fn(task)`` at ``(rho, rho_prev)``,
    ``gamma_s`` the test loss gradients and ``F = (1/N) sum_i u_i u_i^T + delta I``, from
    layer factors (no N x M matrix). Returns the scores and the solver (``.damping``,
    ``.retries``, ``.solve`` on M-vectors).

    ``rho_prev`` (B, N, d) gives B paths sharing the model and ``rho`` (stacked per-test
    paths at their first step): test sample b is scored against path b's psi.
    ``effective_dim``: the eigenvalue count of the default damping, as the dense solve's.
    ``dampings``: explicit damping values instead of the default rule, all from one
    featurisation and Gram matrix (``method``: see :meth:`FactoredFisher.solvers`); then
    lists of scores and solvers, one per value. These four are :class:`StepOptions`, given as
    ``options`` and/or keywords (``chunk_size=64``).
    """
    opts = dataclasses.replace(options or StepOptions(), **changes)
    effective_dim, chunk_size, dampings = opts.effective_dim, opts.chunk_size, opts.dampings
    if settings.kind not in ("fisher", "ggn"):
        raise InputError(f"factored solves use the empirical Fisher or Gauss-Newton, not "
                         f"{settings.kind!r}")
    layers = _require_layers(fmodel)
    paired = rho_prev.dim() == 3
    if paired:
        if rho_prev.shape[0] != test_x.shape[0]:
            raise InputError(f"{rho_prev.shape[0]} paths need as many test samples, got "
                             f"{test_x.shape[0]}")
        fn, args = loss_and_target_jvps(task), (rho, rho_prev.transpose(0, 1))
        chunk_size = max(1, chunk_size * 2 // (1 + rho_prev.shape[0]))
    else:
        fn, args = path_step_fn(task), (rho, rho_prev)
    train = linear_factors(fmodel, state, train_x, fn, *args, chunk_size=chunk_size,
                           layers=layers)
    test = linear_factors(fmodel, state, test_x, measurement_fn(task), test_targets,
                          chunk_size=chunk_size, layers=layers)
    solves = 1 if dampings is None else len(dampings)
    if settings.kind == "ggn":
        # the curvature has its own rows; psi and gamma stay the path-step factors
        fisher = _curvature(fmodel, state, train, train_x, rho, task, settings, effective_dim,
                            chunk_size)
        psi, k_psi_u = train, None
    else:
        kernel = not paired and _kernel_route(len(train), len(test), solves, layers)
        mats = grams(train, pairs=((0, 0), (1, 0)) if kernel else ((0, 0),))
        fisher = FactoredFisher(fmodel, train, settings, effective_dim, gram=mats[0])
        psi, k_psi_u = None, mats[1] if kernel else None
    if dampings is None:
        solver = fisher.solver()
        return solver.scores(test, 1, paired, psi=psi, k_psi_u=k_psi_u), solver
    solvers = fisher.solvers(dampings, opts.method)
    return woodbury_scores(solvers, test, 1, paired, psi=psi, k_psi_u=k_psi_u), solvers


@dataclass
class FactoredInfluence:
    """The training side of exact influence functions from layer factors, fitted once:
    ``train`` the per-sample gradient factors at theta*, ``solver`` the damped curvature's
    Woodbury solver, ``kernel`` the (N, N) Gram matrix ``U U^T`` of the Fisher (None for
    the Gauss-Newton matrix, whose scores go through per-layer matrices)."""

    train: Factors
    solver: FactoredSolver
    kernel: torch.Tensor | None

    def scores(self, fmodel: FunctionalModel, state: ModelState, test_x: torch.Tensor,
               test_targets: torch.Tensor, task: Task, chunk_size: int = 128
               ) -> torch.Tensor:
        """``-(1/N) g_s^T C^{-1} g_i`` (n_test, N) float64: only the test factors are new."""
        test = linear_factors(fmodel, state, test_x, measurement_fn(task), test_targets,
                              chunk_size=chunk_size, layers=self.train.layers)
        if self.kernel is None:
            return self.solver.scores(test, psi_row=0, psi=self.train)
        return self.solver.scores(test, psi_row=0, k_psi_u=self.kernel)


def fit_factored_influence(
    fmodel: FunctionalModel,
    state: ModelState,
    train_x: torch.Tensor,
    train_targets: torch.Tensor,
    task: Task,
    settings: CurvatureSettings,
    effective_dim: int | None = None,
    chunk_size: int = 128,
) -> FactoredInfluence:
    """The training factors, the curvature's solver and (Fisher) the Gram matrix of
    :func:`factored_influence_scores`."""
    if settings.kind not in ("fisher", "ggn"):
        raise InputError(f"factored solves use the empirical Fisher or Gauss-Newton, not "
                         f"{settings.kind!r}")
    layers = _require_layers(fmodel)
    train = linear_factors(fmodel, state, train_x, sample_loss_fn(task), train_targets,
                           chunk_size=chunk_size, layers=layers)
    if settings.kind == "ggn":
        solver = _curvature(fmodel, state, train, train_x, train_targets, task, settings,
                            effective_dim, chunk_size).solver()
        return FactoredInfluence(train, solver, None)
    k = gram(train)  # here Psi U^T = U U^T: the kernel route costs n^2 s more
    return FactoredInfluence(train, FactoredFisher(fmodel, train, settings, effective_dim,
                                                   gram=k).solver(), k)


def factored_influence_scores(
    fmodel: FunctionalModel,
    state: ModelState,
    train_x: torch.Tensor,
    train_targets: torch.Tensor,
    test_x: torch.Tensor,
    test_targets: torch.Tensor,
    task: Task,
    settings: CurvatureSettings,
    effective_dim: int | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, FactoredSolver]:
    """Influence-function scores ``-(1/N) g_s^T F^{-1} g_i`` (n_test, N) float64 with the
    exact empirical Fisher of the training loss gradients, from layer factors; and the
    solver."""
    fitted = fit_factored_influence(fmodel, state, train_x, train_targets, task, settings,
                                    effective_dim, chunk_size)
    scores = fitted.scores(fmodel, state, test_x, test_targets, task, chunk_size)
    return scores, fitted.solver
