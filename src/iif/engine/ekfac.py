"""EK-FAC and K-FAC: the empirical Fisher of the training loss, block-diagonal by layer,
Kronecker-factored where a layer has a weight matrix, and its damped solve.

What is approximated: ``F = (1/N) sum_i g_i g_i^T`` with ``g_i`` the per-sample gradient of the
loss the methods use (``task.sample_loss`` through :func:`iif.engine.grads.sample_loss_fn`),
in the flat parameter order of ``FunctionalModel.names`` (tied parameters once), at one model
state. Its blocks:

- **Kronecker blocks**: every layer the hooks (:mod:`iif.engine.hooks`) handle in closed form
  with a weight matrix, ``nn.Linear``, ``transformers``' ``Conv1D`` and ``nn.Conv1d`` /
  ``nn.Conv2d`` with ``groups=1`` (the unfolded input patches are its inputs). Its gradient is
  a matrix ``G_i`` (out, cols) = ``sum_t d_it a_it^T`` over the layer's positions t (sequence
  positions, convolution positions, every call of a layer called more than once), ``a`` the
  input with a 1 appended when the layer has a trainable bias (the last column), ``d`` the
  gradient of the loss with respect to the layer's output. vec is row-major, so the block is
  approximated by ``kron(S, A)`` with A (cols, cols) and S (out, out) covariances, and with
  ``A = Q_A L_A Q_A^T``, ``S = Q_S L_S Q_S^T``:

  - K-FAC: ``(Q_S x Q_A) diag(L_S x L_A) (Q_S x Q_A)^T``;
  - EK-FAC: the same eigenbasis with the eigenvalues that fit the exact block best in
    Frobenius norm, ``lambda_k = (1/N) sum_i ((Q_S x Q_A)^T vec(G_i))_k^2``, i.e.
    ``diag(Q^T F_l Q)``, computed from the per-sample gradients chunk by chunk.

- **The diagonal part**: every other trainable parameter (embeddings, LayerNorm and BatchNorm
  parameters, grouped convolutions, parameters the hooks leave to their per-sample loop or
  their checks moved there, a weight tied between several layers such as GPT-2's token
  embedding and output layer, a bias whose weight is frozen) gets the exact diagonal of F,
  ``(1/N) sum_i g_i^2`` on its coordinates. :meth:`KroneckerFactors.summary` says how many
  parameters each part holds and ``diagonal`` why each parameter is there.

Positions. With one position per sample (an MLP) A and S are ``(1/N) sum_i a_i a_i^T`` and
``(1/N) sum_i d_i d_i^T`` and both conventions below coincide. With T positions two are in
use: per-sample sums (``"sum"``: ``a_i`` the mean of the sample's inputs over positions, ``d_i``
the sum of its output gradients, the bias's gradient, so the bias block of ``kron(S, A)`` is
exact and the scale is right when positions move together) and positions as samples
(``"expand"``: ``A = sum_it a a^T / (N T)``, ``S = sum_it d d^T / N``, exact when the
positions' gradients are uncorrelated, as when each position has its own loss or its own
output weights). Neither is better in general: at random initialisation on random inputs and
labels, the relative Frobenius error of ``kron(S, A)`` against the exact block was 0.24-0.45
(sum) against 0.81-0.84 (expand) for a Linear layer over tokens mean-pooled before a
classifier, 0.72-0.79 against 0.97 for a convolution before global average pooling, but
0.98-0.99 against 0.86-0.87 for a convolution before a flatten-and-Linear head and 0.79-0.86
against 0.57-0.66 for a token-level language model. So each layer takes the convention whose
``trace(S) trace(A)`` is closer in ratio to the exact ``trace(F_l) = (1/N) sum_i |G_i|^2``,
computed in the same pass: in those twelve cases (four models, three seeds) that choice had the
smaller Frobenius error for K-FAC and for EK-FAC alike. ``KroneckerBlock.positions`` records
it ("one", "sum" or "expand").

Passes and cost. One batched forward and one backward per chunk to the layer outputs
(:func:`iif.engine.hooks.hooked_layer_calls`; models whose forward cannot run under ``vmap``
work, BatchNorm without running statistics is refused as the hooks refuse it) give A, S and the
traces, O(N T (d_in^2 + d_out^2 + d_in d_out)) per layer with T positions; then the
eigendecompositions, O(d_in^3 + d_out^3) per layer; then one pass over the per-sample gradients
(given, or recomputed chunk by chunk with :func:`iif.engine.grads.per_sample_jacobians`; never
N x M at once) gives the EK-FAC eigenvalues, O(N d_in d_out (d_in + d_out)) per layer, and the
diagonal part. K-FAC without a diagonal part skips that pass. Memory of the factors
O(sum_l d_in^2 + d_out^2 + d_in d_out) plus the diagonal part; a chunk holds its per-sample
gradients (n, M) and its layers' inputs and output gradients.

The solve (:class:`KroneckerSolver`, an :class:`iif.engine.linalg.Solver` of dimension M):
``Q (L + delta_l)^{-1} Q^T v`` per block, ``Q_S ((Q_S^T V Q_A) / (L + delta_l)) Q_A^T`` for
the block's part V (out, cols) of v (no M x M matrix; O(d_in d_out (d_in + d_out)) per
column), and ``v / (diag + delta)`` on the diagonal part. Damping per block:
``delta_l = default_damping_ratio x mean(lambda over block l)`` (the diagonal part is one
block of its own values), or ``CurvatureSettings.damping`` for every block when given; a
block whose damped eigenvalues are not all positive is retried with ``retry_factor`` times
the damping (from a tiny one when it was 0), as the Cholesky solves are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from iif.engine.curvature import KRONECKER_KINDS, CurvatureSettings
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.grads import _plan, per_sample_jacobians, sample_loss_fn
from iif.engine.hooks import HookPlan, LayerCall, conv_patches, hooked_layer_calls
from iif.engine.linalg import SOLVE_DTYPE, Solver
from iif.errors import CurvatureError, InputError
from iif.task.outputs import model_output
from iif.task.task import Task

log = logging.getLogger(__name__)

# the hook rules with a weight matrix: (out, in) gradients summed over positions
_MATRIX_KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")
_NOT_FINITE = "per-sample gradients contain NaN or inf; the curvature cannot be built"


# ---- the layout of a block in the flat vector ----------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """Where one layer's gradient matrix (out, cols) sits in flat vectors: its weight
    (``weight``, the name in ``names``) as (out, inputs), stored (inputs, out) for Conv1D
    (``transposed``), and its bias (``bias``, or None) as the last column."""

    path: str
    kind: str
    weight: str
    bias: str | None
    out: int
    inputs: int
    weight_at: int
    bias_at: int | None

    @property
    def transposed(self) -> bool:
        return self.kind == "hf_conv1d"

    @property
    def cols(self) -> int:
        return self.inputs + (self.bias is not None)

    @property
    def size(self) -> int:
        return self.out * self.cols

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Vectors (s, M) -> the block's matrices (s, out, cols), float64."""
        s = flat.shape[0]
        w = flat[:, self.weight_at : self.weight_at + self.out * self.inputs].to(SOLVE_DTYPE)
        w = (w.reshape(s, self.inputs, self.out).transpose(1, 2) if self.transposed
             else w.reshape(s, self.out, self.inputs))
        if self.bias_at is None:
            return w
        b = flat[:, self.bias_at : self.bias_at + self.out].to(SOLVE_DTYPE)
        return torch.cat([w, b.unsqueeze(2)], dim=2)

    def scatter(self, mats: torch.Tensor, flat: torch.Tensor) -> None:
        """Write matrices (s, out, cols) into the block's coordinates of ``flat`` (s, M)."""
        s, w = mats.shape[0], mats[:, :, : self.inputs]
        w = w.transpose(1, 2) if self.transposed else w
        flat[:, self.weight_at : self.weight_at + self.out * self.inputs] = w.reshape(s, -1)
        if self.bias_at is not None:
            flat[:, self.bias_at : self.bias_at + self.out] = mats[:, :, self.inputs]


def _offsets(fmodel: FunctionalModel) -> dict[str, int]:
    return dict(zip(fmodel.names, np.cumsum([0, *fmodel.sizes[:-1]]).tolist(), strict=True))


def block_layouts(fmodel: FunctionalModel, plan: HookPlan
                  ) -> tuple[list[BlockLayout], dict[str, str]]:
    """The Kronecker blocks of the hook plan's layers, and every other trainable parameter
    (the diagonal part) with the reason it is there."""
    offsets = _offsets(fmodel)
    shapes = dict(zip(fmodel.names, fmodel.shapes, strict=True))
    hooked = plan.hooked
    reasons: dict[str, str] = {}
    layouts: list[BlockLayout] = []
    for layer in plan.layers:
        weight = layer.roles.get("weight")
        if layer.kind not in _MATRIX_KINDS or weight is None or len(hooked[weight]) > 1:
            continue
        groups = getattr(layer.module, "groups", 1)
        if groups > 1:
            for name in layer.roles.values():
                reasons[name] = (f"{layer.path} is a grouped convolution (groups={groups}), "
                                 f"whose gradient is not one Kronecker product")
            continue
        bias = layer.roles.get("bias")
        bias = bias if bias is not None and len(hooked[bias]) == 1 else None
        shape = shapes[weight]
        out, inputs = ((shape[1], shape[0]) if layer.kind == "hf_conv1d"
                       else (shape[0], math.prod(shape[1:])))
        layouts.append(BlockLayout(layer.path, layer.kind, weight, bias, out, inputs,
                                   offsets[weight], None if bias is None else offsets[bias]))
    in_blocks = {n for b in layouts for n in (b.weight, b.bias) if n is not None}
    for name in fmodel.names:
        if name not in in_blocks and name not in reasons:
            reasons[name] = _why_diagonal(name, plan, hooked)
    return layouts, reasons


def _why_diagonal(name: str, plan: HookPlan, hooked: dict[str, tuple[str, ...]]) -> str:
    kinds = hooked.get(name)
    if kinds is None:
        why = plan.moved.get(name, "no layer rule gives its gradient")
        return f"its per-sample gradients come from the per-sample loop ({why})"
    if len(kinds) > 1:
        return (f"used by {len(kinds)} layers ({', '.join(kinds)}): a tied parameter counts "
                f"once, in the diagonal part")
    if kinds[0] in _MATRIX_KINDS:
        return "a bias whose layer has no trainable weight in a Kronecker block"
    return f"a parameter of a {kinds[0]} layer, which has no Kronecker factors"


# ---- factors -------------------------------------------------------------------------------
@dataclass
class KroneckerBlock:
    """One layer's factors (float64): covariances ``a`` (cols, cols) and ``s`` (out, out) of
    the convention ``positions``, their eigendecompositions, the exact ``trace`` of the
    Fisher block and (EK-FAC) the corrected eigenvalues ``eigen`` (out, cols), entry (p, k)
    belonging to ``outer(q_s[:, p], q_a[:, k])``."""

    layout: BlockLayout
    a: torch.Tensor
    s: torch.Tensor
    positions: str
    trace: float
    q_a: torch.Tensor
    lam_a: torch.Tensor
    q_s: torch.Tensor
    lam_s: torch.Tensor
    eigen: torch.Tensor | None = None

    def values(self, kind: str) -> torch.Tensor:
        """The block's eigenvalues (out, cols) in its Kronecker eigenbasis: EK-FAC's
        corrected ones, or K-FAC's ``outer(lam_s, lam_a)``."""
        if kind == "ekfac":
            if self.eigen is None:
                raise InputError("these factors have no EK-FAC eigenvalues (fitted as kfac)")
            return self.eigen
        return torch.outer(self.lam_s, self.lam_a)


@dataclass
class KroneckerFactors:
    """EK-FAC (``kind="ekfac"``) or K-FAC factors of the empirical Fisher of ``n`` samples on
    ``num_params`` parameters: the Kronecker ``blocks``, and the diagonal part (``diag``, the
    mean squared per-sample gradient, on the flat coordinates ``diag_index``, of the
    parameters ``diagonal`` names with why). :meth:`solver` damps and solves."""

    kind: str
    n: int
    num_params: int
    blocks: list[KroneckerBlock]
    diagonal: dict[str, str]
    diag_index: torch.Tensor
    diag: torch.Tensor

    def summary(self) -> str:
        """One line: e.g. ``ekfac: 4 layers (M1 parameters), diagonal: 6 parameters (M2)``."""
        kron = sum(b.layout.size for b in self.blocks)
        layers, tensors = len(self.blocks), len(self.diagonal)
        return (f"{self.kind}: {layers} layer{'s' * (layers != 1)} ({kron} parameters), "
                f"diagonal: {tensors} parameter{'s' * (tensors != 1)} "
                f"({int(self.diag_index.numel())})")

    def solver(self, settings: CurvatureSettings) -> KroneckerSolver:
        """The damped solve at ``settings`` (its damping or ratio and retry policy)."""
        return KroneckerSolver(self, settings)

    # ---- a fitted state: tensors and JSON metadata -----------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata from which :meth:`from_state` rebuilds these factors."""
        tensors = {"diag_index": self.diag_index, "diag": self.diag}
        blocks = []
        for i, b in enumerate(self.blocks):
            for part in ("a", "s", "q_a", "lam_a", "q_s", "lam_s", "eigen"):
                value = getattr(b, part)
                if value is not None:
                    tensors[f"{i}.{part}"] = value
            lay = b.layout
            blocks.append({"path": lay.path, "kind": lay.kind, "weight": lay.weight,
                           "bias": lay.bias, "out": lay.out, "inputs": lay.inputs,
                           "positions": b.positions, "trace": b.trace})
        meta = {"kind": self.kind, "n": self.n, "num_params": self.num_params,
                "blocks": blocks, "diagonal": dict(self.diagonal)}
        return tensors, meta

    @classmethod
    def from_state(cls, fmodel: FunctionalModel, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> KroneckerFactors:
        """The factors :meth:`state` described, for the same model."""
        offsets = _offsets(fmodel)
        blocks = []
        for i, b in enumerate(meta["blocks"]):
            layout = BlockLayout(b["path"], b["kind"], b["weight"], b["bias"], int(b["out"]),
                                 int(b["inputs"]), offsets[b["weight"]],
                                 None if b["bias"] is None else offsets[b["bias"]])
            parts = {p: tensors[f"{i}.{p}"] for p in ("a", "s", "q_a", "lam_a", "q_s", "lam_s")}
            blocks.append(KroneckerBlock(layout, positions=b["positions"],
                                         trace=float(b["trace"]),
                                         eigen=tensors.get(f"{i}.eigen"), **parts))
        return cls(meta["kind"], int(meta["n"]), int(meta["num_params"]), blocks,
                   dict(meta["diagonal"]), tensors["diag_index"], tensors["diag"])


# ---- fitting -------------------------------------------------------------------------------
def fit_kronecker(
    fmodel: FunctionalModel,
    state: ModelState,
    x: Any,
    targets: torch.Tensor,
    task: Task,
    kind: str = "ekfac",
    chunk_size: int = 128,
    grads: torch.Tensor | None = None,
) -> KroneckerFactors:
    """EK-FAC or K-FAC factors of the empirical Fisher of the training loss at ``state`` on
    (``x``, ``targets``), N samples (see the module's docstring).

    ``x`` is a batched tensor or :class:`iif.task.inputs.Inputs`, sliced ``chunk_size``
    samples at a time. ``grads`` (N, M): the per-sample loss gradients at ``state`` in the
    flat order of ``fmodel.names`` when the caller holds them (an exact influence function
    does); else they are recomputed chunk by chunk.
    """
    if kind not in KRONECKER_KINDS:
        raise InputError(f"Kronecker factors are 'ekfac' or 'kfac', not {kind!r}")
    n = int(targets.shape[0])
    if n == 0:
        raise InputError("no training samples to fit the curvature on")
    if grads is not None and tuple(grads.shape) != (n, fmodel.num_params):
        raise InputError(f"grads must be (N, M) = ({n}, {fmodel.num_params}), got "
                         f"{tuple(grads.shape)}")
    plan = _plan(fmodel)
    layouts, reasons, sums = _layer_sums(fmodel, state, x, targets, task, chunk_size, plan)
    blocks = [_block(layout, sums[layout.path], n) for layout in layouts]
    offsets = _offsets(fmodel)
    sizes = dict(zip(fmodel.names, fmodel.sizes, strict=True))
    diagonal = {name: reasons[name] for name in fmodel.names if name in reasons}
    device = targets.device
    index = torch.cat([torch.arange(offsets[k], offsets[k] + sizes[k], device=device)
                       for k in diagonal] or [torch.zeros(0, dtype=torch.long, device=device)])
    diag = torch.zeros(index.numel(), dtype=SOLVE_DTYPE, device=device)
    if kind == "ekfac" or index.numel():
        for b in blocks:
            b.eigen = (torch.zeros(b.layout.out, b.layout.cols, dtype=SOLVE_DTYPE,
                                   device=device) if kind == "ekfac" else None)
        chunks = (_given(grads, chunk_size) if grads is not None
                  else _recomputed(fmodel, state, x, targets, task, chunk_size))
        for g in chunks:
            _second_pass(g, blocks, index, diag)
        for b in blocks:
            if b.eigen is not None:
                b.eigen /= n
        diag /= n
    if not all(bool(torch.isfinite(t).all()) for b in blocks
               for t in (b.a, b.s, *(() if b.eigen is None else (b.eigen,)))) \
            or not bool(torch.isfinite(diag).all()):
        raise InputError(_NOT_FINITE)
    factors = KroneckerFactors(kind, n, fmodel.num_params, blocks, diagonal, index, diag)
    log.info("curvature %s", factors.summary())
    return factors


@dataclass
class _Sums:
    """One layer's sums over samples: per-sample sums (``a_sum``, ``s_sum``), positions as
    samples (``a_exp``, ``s_exp``, ``positions``), the most positions one sample had, and
    ``sum_i |G_i|^2``."""

    a_sum: torch.Tensor
    s_sum: torch.Tensor
    a_exp: torch.Tensor
    s_exp: torch.Tensor
    positions: int = 0
    most: int = 0
    trace: float = 0.0

    @classmethod
    def zeros(cls, layout: BlockLayout, device: torch.device) -> _Sums:
        def z(k: int) -> torch.Tensor:
            return torch.zeros(k, k, dtype=SOLVE_DTYPE, device=device)
        return cls(z(layout.cols), z(layout.out), z(layout.cols), z(layout.out))

    def add(self, x: torch.Tensor, d: torch.Tensor, bias: bool) -> None:
        """A chunk's layer inputs x (n, T, in) and output gradients d (n, T, out), float64;
        ``bias``: the inputs carry a 1 for the bias (added here, not to the large x)."""
        n, t = x.shape[0], x.shape[1]
        mean_x, sum_d = x.mean(1), d.sum(1)
        a_part = _gram_with_ones(mean_x, n, bias)
        s_part = sum_d.T @ sum_d
        self.a_sum += a_part
        self.s_sum += s_part
        if t == 1:  # the conventions coincide
            self.a_exp += a_part
            self.s_exp += s_part
            inputs = mean_x.pow(2).sum(1) + bias
            self.trace += float((inputs * sum_d.pow(2).sum(1)).sum())
        else:
            flat_d = d.reshape(n * t, -1)
            self.a_exp += _gram_with_ones(x.reshape(n * t, -1), n * t, bias)
            self.s_exp += flat_d.T @ flat_d
            # |G_i|^2 = |sum_t d x^T|^2 + |sum_t d|^2 (the bias column)
            self.trace += float(torch.bmm(d.transpose(1, 2), x).pow(2).sum())
            self.trace += float(sum_d.pow(2).sum()) if bias else 0.0
        self.positions += n * t
        self.most = max(self.most, t)


def _gram_with_ones(rows: torch.Tensor, count: int, bias: bool) -> torch.Tensor:
    """``[rows, 1]^T [rows, 1]`` for rows (count, in), without forming ``[rows, 1]``
    (``rows^T rows`` without the bias)."""
    gram = rows.T @ rows
    if not bias:
        return gram
    total = rows.sum(0, keepdim=True)
    corner = torch.full((1, 1), float(count), dtype=gram.dtype, device=gram.device)
    return torch.cat([torch.cat([gram, total.T], 1), torch.cat([total, corner], 1)], 0)


def _layer_sums(fmodel: FunctionalModel, state: ModelState, x: Any, targets: torch.Tensor,
                task: Task, chunk_size: int, plan: HookPlan
                ) -> tuple[list[BlockLayout], dict[str, str], dict[str, _Sums]]:
    """The first pass: every Kronecker layer's sums over the training set, with the layouts
    and the diagonal part (:func:`block_layouts`). A layer the hooks' checks move to their
    loop on the way leaves the blocks, and the pass restarts."""
    params = dict(state.params)
    fixed = {**fmodel.frozen, **state.buffers}
    fn = _batched_loss(fmodel, task)
    n = int(targets.shape[0])
    while True:
        layouts: list[BlockLayout] | None = None
        reasons: dict[str, str] = {}
        sums: dict[str, _Sums] = {}
        moved: dict[str, str] = {}
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            calls = [c for _, chunk in hooked_layer_calls(
                fmodel.module, fmodel.names, params, fixed, x[start:stop], fn,
                targets[start:stop], chunk_size=stop - start, plan=plan) for c in chunk]
            if layouts is None:  # after the plan's checks on the first chunk
                layouts, reasons = block_layouts(fmodel, plan)
                sums = {b.path: _Sums.zeros(b, targets.device) for b in layouts}
                moved = dict(plan.moved)
            if plan.moved != moved:
                break
            _add_chunk(layouts, sums, calls)
        else:
            return layouts or [], reasons, sums
        log.info("curvature factors: the hooks moved %s to their loop; starting again",
                 sorted(set(plan.moved) - set(moved)))


def _batched_loss(fmodel: FunctionalModel, task: Task):
    """``(model outputs, targets) -> (n,)`` per-sample losses of ``sample_loss_fn``."""
    loss = sample_loss_fn(task)

    def batched(out: Any, t: torch.Tensor) -> torch.Tensor:
        o = model_output(out, fmodel.output)
        return vmap(loss)(o.reshape(o.shape[0], -1), t)

    return batched


def _add_chunk(layouts: list[BlockLayout], sums: dict[str, _Sums],
               calls: list[LayerCall]) -> None:
    """Each layout's inputs and output gradients over its calls in one chunk, added to its
    sums (the calls of a layer called several times are more positions)."""
    by_path: dict[str, list[LayerCall]] = {}
    for call in calls:
        by_path.setdefault(call.layer.path, []).append(call)
    for layout in layouts:
        found = by_path.get(layout.path)
        if not found:
            continue
        pairs = [_positions(layout, c) for c in found]
        x, d = pairs[0] if len(pairs) == 1 else (torch.cat([x for x, _ in pairs], 1),
                                                 torch.cat([d for _, d in pairs], 1))
        sums[layout.path].add(x, d, layout.bias is not None)


def _positions(layout: BlockLayout, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """One call's inputs x (n, T, in), without the bias's 1, and output gradients d
    (n, T, out), float64."""
    x, dy = call.saved, call.grad
    n = dy.shape[0]
    if layout.kind in ("conv1d", "conv2d"):
        a = conv_patches(call.layer.module, x, SOLVE_DTYPE).transpose(1, 2)
        d = dy.reshape(n, layout.out, -1).transpose(1, 2)
    else:
        a = x.reshape(n, -1, layout.inputs)
        d = dy.reshape(n, -1, layout.out)
    return a.to(SOLVE_DTYPE), d.to(SOLVE_DTYPE)


def _block(layout: BlockLayout, sums: _Sums, n: int) -> KroneckerBlock:
    """The block's covariances of the convention whose Kronecker trace is closer to the exact
    one (see the module's docstring), and their eigendecompositions."""
    a_sum, s_sum = sums.a_sum / n, sums.s_sum / n
    if sums.most <= 1:
        positions, a, s = "one", a_sum, s_sum
    else:
        a_exp, s_exp = sums.a_exp / max(sums.positions, 1), sums.s_exp / n
        exact = sums.trace / n
        positions, a, s = min((("sum", a_sum, s_sum), ("expand", a_exp, s_exp)),
                              key=lambda c: _trace_gap(c[1], c[2], exact))
    lam_a, q_a = _eigh(a)
    lam_s, q_s = _eigh(s)
    return KroneckerBlock(layout, a, s, positions, sums.trace / n, q_a, lam_a, q_s, lam_s)


def _trace_gap(a: torch.Tensor, s: torch.Tensor, exact: float) -> float:
    """|log(trace(kron(S, A)) / exact)|, infinite when either is 0."""
    kron = float(torch.trace(a)) * float(torch.trace(s))
    if not (kron > 0 and exact > 0):
        return math.inf
    return abs(math.log(kron / exact))


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clipped at 0: rounding of a positive semi-definite matrix) and vectors."""
    if not bool(torch.isfinite(m).all()):
        raise InputError(_NOT_FINITE)
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values.clamp_min(0), vectors


def _given(grads: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    for lo in range(0, grads.shape[0], chunk_size):
        yield grads[lo : lo + chunk_size]


def _recomputed(fmodel: FunctionalModel, state: ModelState, x: Any, targets: torch.Tensor,
                task: Task, chunk_size: int) -> Iterator[torch.Tensor]:
    for _, jac in per_sample_jacobians(fmodel, state, x, sample_loss_fn(task), targets,
                                       chunk_size=chunk_size):
        yield jac[:, 0]


def _second_pass(g: torch.Tensor, blocks: list[KroneckerBlock], index: torch.Tensor,
                 diag: torch.Tensor) -> None:
    """Add a chunk of per-sample gradients g (c, M): squared coordinates in each block's
    eigenbasis (EK-FAC) and on the diagonal part."""
    for b in blocks:
        if b.eigen is not None:
            mats = b.layout.gather(g.to(b.q_a.device))  # (c, out, cols)
            b.eigen += (b.q_s.T @ mats @ b.q_a).pow(2).sum(0)
    if index.numel():
        diag += g[:, index.to(g.device)].to(SOLVE_DTYPE).pow(2).sum(0).to(diag.device)


# ---- the solve -----------------------------------------------------------------------------
class KroneckerSolver(Solver):
    """``(C + delta)^{-1} v`` for the EK-FAC or K-FAC matrix C of ``factors``, block by block
    (see the module's docstring), for v (M,) or (M, r) in the flat order of the model's
    parameters, float64.

    ``dampings`` holds each block's damping by layer path and ``diagonal_damping`` the
    diagonal part's; ``damping`` is their mean weighted by parameter count (a summary), and
    ``retries`` counts every block's. ``details`` reports the kind, layer count, dampings,
    positions conventions and the summary line.
    """

    def __init__(self, factors: KroneckerFactors, settings: CurvatureSettings):
        self.factors = factors
        self.inverses: list[torch.Tensor] = []
        self.dampings: dict[str, float] = {}
        retries = 0
        for b in factors.blocks:
            values = b.values(factors.kind)
            delta, tries = _block_damping(values, settings, f"{factors.kind} {b.layout.path}")
            self.inverses.append(1.0 / (values + delta))
            self.dampings[b.layout.path] = delta
            retries += tries
        self.diagonal_damping = 0.0
        if factors.diag.numel():
            self.diagonal_damping, tries = _block_damping(factors.diag, settings,
                                                          f"{factors.kind} diagonal part")
            retries += tries
        self.diag_inverse = 1.0 / (factors.diag + self.diagonal_damping)
        sizes = [b.layout.size for b in factors.blocks] + [int(factors.diag.numel())]
        deltas = [*self.dampings.values(), self.diagonal_damping]
        mean = sum(s * d for s, d in zip(sizes, deltas, strict=True)) / max(sum(sizes), 1)
        super().__init__(factors.num_params, mean, retries, kind=factors.kind)
        self.details = {
            "solver": factors.kind, "layers": len(factors.blocks),
            "summary": factors.summary(), "dampings": dict(self.dampings),
            "diagonal_damping": self.diagonal_damping,
            "positions": {b.layout.path: b.positions for b in factors.blocks},
            "damping_rule": ("absolute" if settings.damping is not None else
                             f"{settings.default_damping_ratio} x mean eigenvalue per block"),
        }

    def _apply(self, rhs: torch.Tensor) -> torch.Tensor:
        f = self.factors
        rhs = rhs.to(f.diag.device)
        out = torch.zeros_like(rhs)
        cols_first, out_t = rhs.T, out.T  # (r, M) views: blocks gather and scatter rows
        for b, inverse in zip(f.blocks, self.inverses, strict=True):
            mats = b.layout.gather(cols_first)  # (r, out, cols)
            rotated = b.q_s.T @ mats @ b.q_a
            b.layout.scatter(b.q_s @ (rotated * inverse) @ b.q_a.T, out_t)
        if f.diag_index.numel():
            out[f.diag_index] = rhs[f.diag_index] * self.diag_inverse[:, None]
        return out


def _block_damping(values: torch.Tensor, settings: CurvatureSettings, what: str
                   ) -> tuple[float, int]:
    """The damping of one block: ``settings.damping``, or ``default_damping_ratio`` times
    the mean of its eigenvalues ``values``; raised by ``retry_factor`` (from a tiny damping
    when it is 0) while some damped eigenvalue is not positive. Returns (damping, retries)."""
    mean = float(values.mean()) if values.numel() else 0.0
    delta = (settings.damping if settings.damping is not None
             else settings.default_damping_ratio * mean)
    lowest = float(values.min()) if values.numel() else 1.0
    for attempt in range(settings.max_retries + 1):
        if attempt:
            delta = delta * settings.retry_factor if delta > 0 else max(1e-6 * mean, 1e-12)
        if lowest + delta > 0:
            if attempt:
                log.warning("%s curvature was not positive definite; solved with damping %.3g "
                            "after %d retries", what, delta, attempt)
            return delta, attempt
    raise CurvatureError(f"{what} curvature is not positive definite even with damping "
                         f"{delta:.3g} after {settings.max_retries} retries")
