"""Seeded random projections of per-sample gradients: phi = A^T u with A in R^{M x P}.

Two structures, both with ``E[A A^T] = I`` so that inner products are preserved in
expectation:

- ``dense``: A is never stored: it is generated block by block (rows ``lo:hi`` of A) from
  ``(seed, block index)`` each time it is applied, so memory is ``block_rows * P`` values.
  Entries have variance 1/P. Cost 2 M P FLOPs per projected row, plus generating A.
- ``kronecker``: the gradient of an ``nn.Linear`` layer is a matrix G (out x in) [with its
  bias as one more input column], that of an ``nn.Conv2d`` (no groups, zero padding) one of
  out_channels x (in_channels kh kw); it is projected as ``A_out^T G A_in`` with small seeded
  factors A_out (out x p_out) and A_in (in+1 x p_in), i.e. by ``A_out (x) A_in``, to
  p_out x p_in values. The factors are stored (they are tiny; one :class:`KroneckerLayer`
  per layer holds them with the layer's offsets and shape) and the cost per row is
  ``2 out (in+1) p_in + 2 out p_in p_out`` FLOPs instead of ``2 out in P``. Parameters outside
  these layers get a dense projection of their own. The total dim is split evenly across
  the blocks, so ``projector.dim`` can be slightly below the requested P.

The same seed gives the same A on the same device type; CPU and CUDA generators draw
different (equally valid) matrices.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from iif.engine.functional import hf_conv1d_type
from iif.errors import InputError
from iif.validation import Settings, setting

log = logging.getLogger(__name__)


@dataclass
class ProjectionSettings(Settings):
    """The random projection of per-sample gradients (see the module docstring).
    ``dim=None`` means no projection (exact features in parameter space)."""

    section = "[projection]"

    dim: int | None = setting(None, ge=1, doc="P, the projected dimension (None: no "
                              "projection, the exact gradients)")
    kind: Literal["gaussian", "rademacher"] = setting(
        "gaussian", doc="distribution of the entries of A")
    seed: int = setting(0, ge=0, doc="seed of A (the same seed gives the same A on the same "
                        "device type)")
    structure: Literal["dense", "kronecker"] = setting(
        "dense", doc="dense A, or Kronecker factors per Linear and Conv2d layer")
    block_elements: int = setting(1 << 22, ge=1, doc="values of a dense A generated at once "
                                  "(16 MiB in float32)")


class Projector(Protocol):
    dim: int

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(n, M) -> (n, P)."""
        ...


class IdentityProjector:
    """No projection: features are the gradients themselves (P = M)."""

    def __init__(self, num_params: int):
        self.dim = num_params

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads


class RandomProjector:
    """Dense Gaussian or Rademacher projection generated in row blocks from a seed."""

    def __init__(
        self,
        num_params: int,
        settings: ProjectionSettings,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if settings.dim is None:
            raise InputError("RandomProjector needs a projection dim")
        self.num_params = num_params
        self.dim = int(settings.dim)
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        rows = max(1, settings.block_elements // self.dim)
        self.blocks = [(lo, min(lo + rows, num_params)) for lo in range(0, num_params, rows)]

    def block(self, index: int) -> torch.Tensor:
        """Rows ``blocks[index]`` of A, shape (hi - lo, P), regenerated from the seed."""
        lo, hi = self.blocks[index]
        return _random_matrix((hi - lo, self.dim), self.settings.kind,
                              self.settings.seed * 1_000_003 + index, self.device, self.dtype)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.num_params:
            raise InputError(
                f"cannot project vectors of size {grads.shape[-1]} with a projector for "
                f"{self.num_params} parameters"
            )
        out = torch.zeros(*grads.shape[:-1], self.dim, device=grads.device, dtype=grads.dtype)
        for index, (lo, hi) in enumerate(self.blocks):
            out += grads[..., lo:hi] @ self.block(index).to(grads.dtype)
        return out


def _random_matrix(
    shape: tuple[int, int], kind: str, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Seeded Gaussian or Rademacher entries of variance 1/shape[1]."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % (2**63 - 1))
    if kind == "gaussian":
        a = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    else:
        a = torch.randint(0, 2, shape, generator=gen, device=device).to(dtype).mul_(2).sub_(1)
    return a.mul_(shape[1] ** -0.5)


@dataclass(frozen=True, eq=False)
class KroneckerLayer:
    """One ``nn.Linear`` or ``nn.Conv2d`` layer of a :class:`KroneckerProjector`: where its
    gradient sits in the flat parameter vector and the seeded factors that project it.

    The layer's gradient is an ``out_features x in_features`` matrix G (a Conv2d weight
    (out, in, kh, kw) read as out x (in kh kw)) with the bias gradient as one more column; it
    is projected to ``A_out^T [G | g_bias] A_in``, ``p_out * p_in`` values.
    """

    module: torch.nn.Module
    """The ``nn.Linear`` or ``nn.Conv2d`` module (its forward hooks feed the features)."""
    weight_offset: int
    """Index of the weight's first entry in the flat parameter vector (M,)."""
    out_features: int
    """Rows of G: a Linear's ``out_features``, a Conv2d's ``out_channels``."""
    in_features: int
    """Weight columns of G: a Linear's ``in_features``, a Conv2d's ``in_channels kh kw``."""
    bias_offset: int | None
    """Index of the bias's first entry in the flat vector; None without a trainable bias."""
    a_out: torch.Tensor
    """A_out, (out_features, p_out): the seeded factor on the output side."""
    a_in: torch.Tensor
    """A_in, (in_features [+ 1 with a bias], p_in): the factor on the input side; its last
    row multiplies the bias column."""
    patches: dict[str, Any] | None
    """For a Conv2d: the ``torch.nn.functional.unfold`` arguments (``kernel_size``,
    ``dilation``, ``padding``, ``stride``) that turn its input into patches, one per output
    position; None for a Linear."""
    transposed: bool = False
    """Whether the weight is stored (in, out), as in ``transformers``' ``Conv1D`` (GPT-2's
    layers, ``y = x W + b``): G is then the transpose of the stored gradient."""
    embedding: bool = False
    """An ``nn.Embedding`` (weight (V, D), no bias): G = sum over positions of
    ``onehot(id_t) dy_t^T``, so the projected gradient is ``sum_t A_out[id_t] (x) A_in^T dy_t``,
    the rows of A_out the sample's ids pick (none for ``padding_idx``)."""
    padding_idx: int | None = None
    """An embedding's ``padding_idx`` (its row gets no gradient), else None."""

    @property
    def p_out(self) -> int:
        """Output-side projected dimension (columns of ``a_out``)."""
        return self.a_out.shape[1]

    @property
    def p_in(self) -> int:
        """Input-side projected dimension (columns of ``a_in``)."""
        return self.a_in.shape[1]

    @property
    def dim(self) -> int:
        """Projected values of this layer, ``p_out * p_in``."""
        return self.p_out * self.p_in


class KroneckerProjector:
    """``A_out^T G A_in`` per ``nn.Linear``, ``nn.Conv2d`` or ``transformers`` ``Conv1D`` layer
    (see the module docstring and :class:`KroneckerLayer`), a dense seeded projection for
    every other parameter; (n, M) -> (n, P) with P = ``self.dim``."""

    def __init__(self, fmodel, settings: ProjectionSettings,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if settings.dim is None:
            raise InputError("KroneckerProjector needs a projection dim")
        self.num_params = fmodel.num_params
        self.settings = settings
        device = torch.device(device)
        offsets = dict(zip(fmodel.names, np.cumsum([0, *fmodel.sizes[:-1]]).tolist(),
                           strict=True))
        self.layers: list[KroneckerLayer] = []
        covered: set[str] = set()
        # a weight that another module also uses (tied weights) gets gradient from both: its
        # layer's hooks would see only one part, so it is projected with the other parameters
        uses = Counter(id(p) for m in fmodel.module.modules()
                       for p in m._parameters.values() if p is not None)
        candidates = [(name, m) for name, m in fmodel.module.named_modules()
                      if (isinstance(m, torch.nn.Linear) or _factorable_conv(m)
                          or is_hf_conv1d(m) or _factorable_embedding(m))
                      and uses[id(m.weight)] == 1]
        found = []
        for name, module in candidates:
            w = f"{name}.weight" if name else "weight"
            b = f"{name}.bias" if name else "bias"
            if w not in offsets:
                continue
            found.append((w, b if b in offsets else None, module))
            covered.update({w, b})
        self.layer_params = frozenset(covered & set(offsets))
        """Names of the parameters inside the layers (weights and biases)."""
        rest = [n for n in fmodel.names if n not in covered]
        rest_index = np.concatenate([
            np.arange(offsets[n], offsets[n] + size)
            for n, size in zip(fmodel.names, fmodel.sizes, strict=True) if n in rest
        ]) if rest else np.zeros(0, dtype=np.int64)
        n_blocks = len(found) + (1 if rest else 0)
        share = int(settings.dim) // max(n_blocks, 1)
        if share < 1:
            raise InputError(f"projection dim {settings.dim} is below the number of parameter "
                             f"blocks ({n_blocks}) of a kronecker projection")
        for index, (w, b, module) in enumerate(found):
            patches: dict[str, Any] | None
            if isinstance(module, torch.nn.Linear):
                out, inp = module.out_features, module.in_features
                patches = None
            elif is_hf_conv1d(module):  # weight (in, out)
                inp, out = module.weight.shape
                patches = None
            elif isinstance(module, torch.nn.Embedding):  # weight (V, D): rows are ids
                out, inp = module.weight.shape
                patches = None
            else:  # a Conv2d weight (out, in, kh, kw) is an out x (in kh kw) matrix
                out = module.out_channels
                inp = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                patches = {"kernel_size": module.kernel_size, "dilation": module.dilation,
                           "padding": module.padding, "stride": module.stride}
            cols = inp + (1 if b is not None else 0)
            p_out = max(1, min(out, round(share ** 0.5)))
            p_in = max(1, min(cols, share // p_out))
            seed = settings.seed * 1_000_003 + 7919 * (index + 1)
            self.layers.append(KroneckerLayer(
                module=module, weight_offset=offsets[w], out_features=out, in_features=inp,
                bias_offset=None if b is None else offsets[b],
                a_out=_random_matrix((out, p_out), settings.kind, seed, device, dtype),
                a_in=_random_matrix((cols, p_in), settings.kind, seed + 1, device, dtype),
                patches=patches, transposed=is_hf_conv1d(module),
                embedding=isinstance(module, torch.nn.Embedding),
                padding_idx=getattr(module, "padding_idx", None)))
        self.rest_index = torch.as_tensor(rest_index, device=device, dtype=torch.long)
        self.rest = None
        if rest:
            rest_dim = min(share, len(rest_index))
            self.rest = RandomProjector(len(rest_index), ProjectionSettings(
                dim=rest_dim, kind=settings.kind, seed=settings.seed * 31 + 17,
                block_elements=settings.block_elements), device=device, dtype=dtype)
        self.dim = (sum(layer.dim for layer in self.layers)
                    + (self.rest.dim if self.rest is not None else 0))
        if self.dim != settings.dim:
            # each block gets p_out x p_in values, whole numbers that fit its layer, so the
            # total is rarely the dim asked for; say why the recorded projection_dim differs
            shapes = ", ".join(f"{layer.p_out}x{layer.p_in}" for layer in self.layers)
            rest_note = f" + {self.rest.dim} other parameters" if self.rest is not None else ""
            log.info("kronecker projection: dim %d shared by %d blocks as p_out x p_in per "
                     "layer (%s%s) gives %d values (projection_dim %d)", settings.dim, n_blocks,
                     shapes, rest_note, self.dim, self.dim)
        # every trainable parameter sits in one of the layers (a Linear or Conv2d): features
        # can be built from layer inputs and output gradients without per-sample gradients
        # (iif.engine.features); otherwise the rest need per-sample gradients of their own
        # B copies' stacked features take Linear and Conv2d layers only
        self.all_params_in_layers = self.rest is None and not any(
            layer.embedding for layer in self.layers)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.num_params:
            raise InputError(
                f"cannot project vectors of size {grads.shape[-1]} with a projector for "
                f"{self.num_params} parameters"
            )
        lead = grads.shape[:-1]
        g = grads.reshape(-1, self.num_params)
        parts = []
        for layer in self.layers:
            w_off, out, inp = layer.weight_offset, layer.out_features, layer.in_features
            a_out, a_in = layer.a_out.to(g.dtype), layer.a_in.to(g.dtype)
            weight = g[:, w_off : w_off + out * inp]
            weight = (weight.reshape(-1, inp, out).transpose(1, 2) if layer.transposed
                      else weight.reshape(-1, out, inp))
            t = weight @ a_in[:inp]  # (n, out, p_in)
            if layer.bias_offset is not None:
                b_off = layer.bias_offset
                t = t + g[:, b_off : b_off + out, None] * a_in[inp]
            parts.append((a_out.T @ t).reshape(g.shape[0], -1))  # (n, p_out * p_in)
        if self.rest is not None:
            parts.append(self.rest.project(g.index_select(1, self.rest_index)))
        return torch.cat(parts, dim=1).reshape(*lead, self.dim)


def is_hf_conv1d(module: torch.nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (:func:`hf_conv1d_type`)."""
    conv1d = hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _factorable_embedding(module: torch.nn.Module) -> bool:
    """An ``nn.Embedding`` whose gradient is the sum of its output gradients in the rows of
    the ids used: no ``max_norm`` (it renormalises rows in the forward), no per-batch
    ``scale_grad_by_freq``, no sparse gradients."""
    return (isinstance(module, torch.nn.Embedding) and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse)


def _factorable_conv(module: torch.nn.Module) -> bool:
    """A Conv2d whose weight gradient is a sum over positions of output gradient x input
    patch (``unfold``): no groups, zero padding."""
    return (isinstance(module, torch.nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def make_projector(
    num_params: int,
    settings: ProjectionSettings,
    device: torch.device | str,
    dtype: torch.dtype,
    fmodel=None,
) -> Projector:
    """The projector of ``settings``; ``kronecker`` needs the ``FunctionalModel``.

    A dimension of at least ``num_params`` would only make the gradients longer and their
    inner products noisier: the exact gradients are used instead (the projector's ``dim``,
    which methods record as ``projection_dim``, is then ``num_params``), with a warning."""
    if settings.dim is None:
        return IdentityProjector(num_params)
    if settings.dim >= num_params:
        log.warning("projection dim %d is at least the model's %d parameters: using the exact "
                    "gradients (projection_dim %d)", settings.dim, num_params, num_params)
        return IdentityProjector(num_params)
    if settings.structure == "kronecker":
        if fmodel is None:
            raise InputError("a kronecker projection needs the model (make_projector(fmodel=))")
        return KroneckerProjector(fmodel, settings, device=device, dtype=dtype)
    return RandomProjector(num_params, settings, device=device, dtype=dtype)
