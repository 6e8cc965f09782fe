"""Per-sample gradients from module hooks: one ordinary batched forward and backward per chunk,
without ``torch.func.vmap``.

:func:`iif.engine.grads.per_sample_jacobians` differentiates each sample under ``vmap``; models
whose forward cannot run there (data-dependent control flow such as a Hugging Face attention
mask with padding, recurrent layers) take this route instead. The model runs once per chunk at
the given parameters and buffers (``torch.func.functional_call``) with forward hooks on its
layers. The gradient ``dy`` (n, ..., out) of the sum over samples of one of the R values ``fn``
returns, taken with respect to a layer's output, splits by sample, and with the layer's input it
gives each sample's parameter gradient in closed form:

- ``nn.Linear`` on (n, ..., in): ``dW_i = sum_t dy_it x_it^T`` and ``db_i = sum_t dy_it``, the
  sums over all positions t between the batch and the feature dimension;
- ``transformers.pytorch_utils.Conv1D`` (GPT-2's layer, ``y = x W + b`` with W (in, out)): the
  same, transposed;
- ``nn.Conv1d`` / ``nn.Conv2d`` with zero padding (numbers or 'same' / 'valid'), any stride,
  dilation and groups: the Linear rule on the unfolded input patches, group by group;
- ``nn.Embedding``: ``dy`` scattered into the rows of the indices the sample uses, none into
  ``padding_idx``; with ``scale_grad_by_freq`` each row is divided by its index's count in the
  sample (the gradient of the sample alone);
- ``nn.LayerNorm`` (elementwise affine) and BatchNorm on running statistics:
  ``dw_i = sum dy x_hat`` and ``db_i = sum dy``, x_hat the layer's input normalised without
  the affine map.

A parameter registered in several hooked layers (tied weights: GPT-2's output layer shares the
token embedding) or a layer called several times per forward gets the sum of all contributions,
once in the flat vector. Every other trainable parameter is "rest": its per-sample gradients
come from a loop over samples (``torch.autograd.grad`` of each sample's value, the graph
retained), n R backward passes per chunk of n samples through the part of the graph between the
values and those parameters. A model without rest parameters runs no such loop.

Splitting the batched gradient by sample is exact only when samples do not interact: the model
runs in eval mode (dropout off, BatchNorm on running statistics; BatchNorm in train mode, or
without running statistics, normalises over the batch and would couple the samples, so the
latter is refused), and ``fn``'s i-th value must depend on sample i only.

Safeguards. A layer call whose input does not carry the chunk's samples along dim 0 (a
sequence-first layout, an unbatched call) moves that layer's parameters to the loop. A call on
one row while the chunk has n (position embeddings looked up with (1, T) ids and broadcast over
the batch) is lifted: its output is expanded to n rows in the graph, so the gradient reaching it
is per sample. On the first chunk the values of a forward with lifts are compared with a plain
forward, and the hooked gradients of two samples with plain autograd of their values: a weight
used outside its layer's forward, or any case these rules miss, moves to the loop instead of
giving wrong gradients (``HookPlan.moved`` says which and why). ``nn.MultiheadAttention`` reads
its ``out_proj`` weight directly, so its layers go to the loop from the start.

Flat vectors follow ``names`` (``FunctionalModel.names``: trainable parameters in
``named_parameters()`` order, tied parameters once). Memory is per chunk: J (n, R, M) and one
batched forward's activations, never N x M.

:func:`hooked_layer_calls` runs the same forward and gives, instead of J, each hooked call's
input and the gradient reaching its output (the layer factors of :mod:`iif.engine.ekfac`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from iif.engine.functional import hf_conv1d_type, module_mode
from iif.errors import InputError
from iif.task.inputs import Inputs as SampleInputs

log = logging.getLogger(__name__)

# a batched tensor (one positional argument), a tuple of them (positional arguments), a dict
# of them (keyword arguments) or both (iif.task.inputs.Inputs); values that are not tensors
# are passed to every chunk unchanged
Inputs = torch.Tensor | SampleInputs | Sequence[Any] | Mapping[str, Any]
BatchFn = Callable[..., torch.Tensor]

_BatchNorm = nn.modules.batchnorm._BatchNorm
_ROLES = {"linear": ("weight", "bias"), "hf_conv1d": ("weight", "bias"),
          "conv1d": ("weight", "bias"), "conv2d": ("weight", "bias"), "embedding": ("weight",),
          "layernorm": ("weight", "bias"), "batchnorm": ("weight", "bias")}
_BASES = ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"),
          (nn.Embedding, "embedding"), (nn.LayerNorm, "layernorm"), (_BatchNorm, "batchnorm"))


# ---- the plan ----------------------------------------------------------------------------


@dataclass
class HookedLayer:
    """One hooked module: its rule (``kind``) and which of its parameters (role -> name in
    ``names``) take their per-sample gradients from it."""

    module: nn.Module
    path: str
    kind: str
    roles: dict[str, str]


@dataclass
class HookPlan:
    """Which layer computes each trainable parameter's per-sample gradient.

    ``hooked`` maps a parameter name to the kinds of the layers that use it (two for a tied
    weight, e.g. ``("embedding", "linear")``); ``rest`` lists, in ``names`` order, the
    parameters the per-sample loop handles; ``moved`` those the checks sent there, with why.
    """

    names: list[str]
    layers: list[HookedLayer]
    moved: dict[str, str] = field(default_factory=dict)
    # set once the checks passed on a chunk of two or more samples; later calls skip them
    checked: bool = False

    @property
    def hooked(self) -> dict[str, tuple[str, ...]]:
        kinds: dict[str, tuple[str, ...]] = {}
        for layer in self.layers:
            for name in layer.roles.values():
                kinds[name] = (*kinds.get(name, ()), layer.kind)
        return {n: kinds[n] for n in self.names if n in kinds}

    @property
    def rest(self) -> list[str]:
        hooked = self.hooked
        return [n for n in self.names if n not in hooked]

    @property
    def route(self) -> str:
        """'hooks', 'hooks+loop' or 'loop'."""
        hooked, rest = self.hooked, self.rest
        return "+".join(r for r, used in (("hooks", hooked), ("loop", rest)) if used)

    def summary(self) -> str:
        """One line: how many parameters each rule covers and which go to the loop."""
        hooked, rest = self.hooked, self.rest
        counts = Counter("+".join(sorted(set(k))) for k in hooked.values())
        kinds = ", ".join(f"{k} {c}" for k, c in sorted(counts.items()))
        line = f"hooks for {len(hooked)} of {len(self.names)} parameters"
        line += f" ({kinds})" if kinds else ""
        if rest:
            shown = ", ".join(rest[:3]) + (f" and {len(rest) - 3} more" if len(rest) > 3 else "")
            line += f"; per-sample loop for {len(rest)} ({shown})"
        if self.moved:
            line += f"; {len(self.moved)} moved to the loop by the checks"
        return line

    def move_to_loop(self, reasons: Mapping[str, str]) -> None:
        """Take the parameters ``reasons`` names out of every hooked layer."""
        hooked = self.hooked
        new = {n: r for n, r in reasons.items() if n in hooked}
        if not new:
            raise RuntimeError(f"no hooked parameter among {sorted(reasons)}")
        for name, reason in new.items():
            log.info("per-sample gradients of %s come from the per-sample loop: %s", name, reason)
        self.moved.update(new)
        for layer in self.layers:
            layer.roles = {r: n for r, n in layer.roles.items() if n not in new}
        self.layers = [layer for layer in self.layers if layer.roles]


def hook_plan(module: nn.Module, names: Sequence[str]) -> HookPlan:
    """Decide, for each trainable parameter in ``names``, which hooked layers give its
    per-sample gradient (all the modules it is registered in must have a rule); the others
    are "rest". Raises :class:`InputError` for a BatchNorm without running statistics."""
    _refuse_batch_statistics(module)
    try:
        by_id = {id(module.get_parameter(n)): n for n in names}
    except AttributeError as exc:
        raise InputError(f"not a parameter of the model: {exc}") from None
    inside_attention = {id(c) for m in module.modules() if isinstance(m, nn.MultiheadAttention)
                        for c in m.modules()}
    uses: dict[str, list[tuple[str, nn.Module, str, str | None]]] = {n: [] for n in names}
    for path, m in module.named_modules():
        kind = None if id(m) in inside_attention else _layer_kind(m)
        for role, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in by_id:
                uses[by_id[id(p)]].append((path, m, role, kind))
    layers: dict[int, HookedLayer] = {}
    for name in names:
        found = uses[name]
        if not found or any(k is None or role not in _ROLES[k] for _, _, role, k in found):
            continue
        for path, m, role, kind in found:
            layers.setdefault(id(m), HookedLayer(m, path, kind, {})).roles[role] = name
    return HookPlan(list(names), list(layers.values()))


def _refuse_batch_statistics(module: nn.Module) -> None:
    for path, m in module.named_modules():
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise InputError(
                f"{path or 'the model'} is a BatchNorm without running statistics: it "
                f"normalises over the batch even in eval mode, so the samples of a batch "
                f"interact and have no per-sample gradients of their own")


def _layer_kind(m: nn.Module) -> str | None:
    """The rule for module ``m``; None unless its forward is the plain one of a supported
    layer (a subclass with its own forward may compute anything)."""
    for base, kind in _BASES:
        if isinstance(m, base):
            plain = type(m).forward is base.forward
            if kind.startswith("conv"):
                plain = plain and m.padding_mode == "zeros"
            elif kind == "embedding":
                plain = plain and m.max_norm is None  # renormalises the weight in place
            return kind if plain else None
    hf = hf_conv1d_type()
    if hf is not None and isinstance(m, hf) and type(m).forward is hf.forward:
        return "hf_conv1d"
    return None


# ---- the rules: what a call keeps, and its per-sample gradients --------------------------


def _unfit(layer: HookedLayer, x: object, out: object, rows: int) -> str | None:
    """Why a call cannot be split by sample, or None."""
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return "its input or output is not a tensor"
    m, kind = layer.module, layer.kind
    dims = {"conv1d": x.dim() == 3, "conv2d": x.dim() == 4, "batchnorm": x.dim() >= 2,
            "embedding": x.dim() >= 1 and not x.is_floating_point(),
            "layernorm": x.dim() > len(getattr(m, "normalized_shape", ()))}
    if not dims.get(kind, x.dim() >= 2 and out.shape[:-1] == x.shape[:-1]):
        return f"an input of shape {tuple(x.shape)} has no batch dimension"
    if x.shape[0] != rows and not (x.shape[0] == 1 and out.dim() > 0 and out.shape[0] == 1):
        return f"an input of shape {tuple(x.shape)} does not hold the {rows} samples in dim 0"
    return None


def _saved(layer: HookedLayer, x: torch.Tensor) -> torch.Tensor:
    """What the rule needs from a call's input (read during the call: under functional_call
    the module's buffers are then the ones given)."""
    m = layer.module
    with torch.no_grad():
        if layer.kind == "layernorm":
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        if layer.kind == "batchnorm":
            return F.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)
    return x.detach()


def _linear(m: nn.Module, x: torch.Tensor, dy: torch.Tensor, t: dict[str, torch.Tensor],
            transposed: bool = False) -> None:
    """(n, ..., in) and (n, ..., out): the sums over positions as one (n, out, in) product."""
    dtype = next(iter(t.values())).dtype
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
    dy3 = dy.reshape(dy.shape[0], -1, dy.shape[-1]).to(dtype)
    if "weight" in t:
        w = torch.bmm(x3.transpose(1, 2), dy3) if transposed else torch.bmm(dy3.transpose(1, 2), x3)
        t["weight"].add_(w)
    if "bias" in t:
        t["bias"].add_(dy3.sum(1))


def _hf_linear(m: nn.Module, x: torch.Tensor, dy: torch.Tensor,
               t: dict[str, torch.Tensor]) -> None:
    _linear(m, x, dy, t, transposed=True)


def _conv_padding(m: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zeros per spatial dimension, as the convolution pads its input."""
    if m.padding == "valid":
        return [(0, 0)] * len(m.kernel_size)
    if m.padding == "same":  # an odd total puts the extra zero at the end
        totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return [(p // 2, p - p // 2) for p in totals]
    return [(p, p) for p in m.padding]


def conv_patches(m: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """The input patches (n, C k, positions) of an ``nn.Conv1d`` / ``nn.Conv2d`` call on
    ``x`` (n, C, L) or (n, C, H, W), zero-padded as the layer pads, channel-major (the order
    of the weight's flattened (C / groups) k columns, group after group), in ``dtype``."""
    pads = [p for pair in reversed(_conv_padding(m)) for p in pair]  # last dimension first
    x = F.pad(x, pads) if any(pads) else x
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if x.dim() == 3:  # a 1-d convolution is a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    return F.unfold(x if dtype is None else x.to(dtype), kernel, dilation=dilation,
                    stride=stride)


def _conv(m: nn.Module, x: torch.Tensor, dy: torch.Tensor, t: dict[str, torch.Tensor]) -> None:
    """(n, C, L) or (n, C, H, W): the Linear rule on patches (n, C k, positions) per group."""
    n, g = x.shape[0], m.groups
    dtype = next(iter(t.values())).dtype
    dy = dy.reshape(n, dy.shape[1], -1).to(dtype)
    if "weight" in t:
        cols = conv_patches(m, x, dtype)
        cols = cols.reshape(n * g, -1, cols.shape[-1])  # channels are group-major
        w = torch.bmm(dy.reshape(n * g, -1, dy.shape[-1]), cols.transpose(1, 2))
        t["weight"].add_(w.reshape(t["weight"].shape))
    if "bias" in t:
        t["bias"].add_(dy.sum(-1))


def _embedding(m: nn.Module, ids: torch.Tensor, dy: torch.Tensor,
               t: dict[str, torch.Tensor]) -> None:
    """ids (n, ...) and dy (n, ..., D) scattered into the rows of a (n, V, D) gradient."""
    w = t["weight"]
    n, vocab, dim = w.shape
    ids = ids.reshape(n, -1).long()
    dy = dy.reshape(n, -1, dim).to(w.dtype)
    if m.padding_idx is not None:
        dy = dy.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0)
    if m.scale_grad_by_freq:
        counts = torch.zeros(n, vocab, dtype=w.dtype, device=w.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=w.dtype))
        dy = dy / counts.gather(1, ids).unsqueeze(-1)
    rows = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    w.index_put_((rows.reshape(-1), ids.reshape(-1)), dy.reshape(-1, dim), accumulate=True)


def _norm(m: nn.Module, x_hat: torch.Tensor, dy: torch.Tensor,
          t: dict[str, torch.Tensor]) -> None:
    """LayerNorm (n, ..., *shape) or BatchNorm (n, C, ...): sums over all other positions."""
    n = dy.shape[0]
    if isinstance(m, nn.LayerNorm):
        shape = (n, -1, *m.normalized_shape)
        lead = 1
    else:
        shape = (n, dy.shape[1], -1)
        lead = 2
    dtype = next(iter(t.values())).dtype
    dy = dy.to(dtype)
    if "weight" in t:
        t["weight"].add_((dy * x_hat.to(dtype)).reshape(shape).sum(lead))
    if "bias" in t:
        t["bias"].add_(dy.reshape(shape).sum(lead))


_RULES = {"linear": _linear, "hf_conv1d": _hf_linear, "conv1d": _conv, "conv2d": _conv,
          "embedding": _embedding, "layernorm": _norm, "batchnorm": _norm}


# ---- one chunk ---------------------------------------------------------------------------


class _Replan(Exception):
    """A chunk must run again with these parameters (name -> reason) moved to the loop."""

    def __init__(self, moves: Mapping[str, str]):
        super().__init__(dict(moves))
        self.moves = dict(moves)


@dataclass
class _Call:
    layer: HookedLayer
    saved: torch.Tensor  # (n, ...) what the rule needs from the input
    output: torch.Tensor  # (n, ...) the call's output, a node of the graph
    version: int


@dataclass
class LayerCall:
    """One call of a hooked layer in a chunk's forward (:func:`hooked_layer_calls`):
    ``saved`` (n, ...) what its rule reads from the input (the input itself for Linear,
    Conv1D and convolutions), ``grad`` (n, ...) the gradient of the chunk's summed values
    with respect to the call's output (zeros where the values do not reach it)."""

    layer: HookedLayer
    saved: torch.Tensor
    grad: torch.Tensor


class _Recorder:
    """Forward hooks on the plan's layers while entered: every call's input and output."""

    def __init__(self, plan: HookPlan, rows: int):
        self.plan = plan
        self.rows = rows
        self.calls: list[_Call] = []
        self.unfit: dict[str, str] = {}
        self.lifted: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Recorder:
        try:
            for layer in self.plan.layers:
                self._handles.append(
                    layer.module.register_forward_hook(self._hook(layer), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: HookedLayer) -> Callable[..., torch.Tensor | None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            x = args[0] if args else next(iter(kwargs.values()), None)
            reason = _unfit(layer, x, out, self.rows)
            if reason is not None:
                self.unfit.update(dict.fromkeys(layer.roles.values(), f"{layer.path}: {reason}"))
                return None
            saved = _saved(layer, x)
            version = saved._version
            if x.shape[0] != self.rows:
                # one row broadcast over the batch later on: expanded here, the graph sums
                # the samples' gradients after this point, so the one reaching it is per sample
                out = out.expand(self.rows, *out.shape[1:])
                saved = saved.expand(self.rows, *saved.shape[1:])
                self.lifted.update(layer.roles.values())
            self.calls.append(_Call(layer, saved, out, version))
            # the graph continues from a copy: an in-place operation after the layer (a ReLU
            # with inplace=True) then leaves the recorded output as the layer computed it
            return out.clone()

        return record


@dataclass
class _Run:
    """One call of :func:`hooked_jacobians`: the model, its tensors and the flat layout."""

    module: nn.Module
    plan: HookPlan
    tensors: dict[str, torch.Tensor]  # everything functional_call gets
    leaves: dict[str, torch.Tensor]  # the trainable ones, by name in ``names``
    slices: dict[str, slice]
    fn: BatchFn

    def chunk(self, args: tuple, kwargs: dict, fn_args: list[torch.Tensor], rows: int,
              verify: bool) -> torch.Tensor:
        """J (rows, R, M) of one chunk; the plan is amended and the chunk rerun as needed."""
        return self._planned(lambda: self._jacobian(args, kwargs, fn_args, rows, verify),
                             verify and rows > 1)

    def layer_calls(self, args: tuple, kwargs: dict, fn_args: list[torch.Tensor],
                    rows: int) -> list[LayerCall]:
        """Every hooked call of one chunk with the gradient reaching its output (see
        :func:`hooked_layer_calls`); the plan is amended and the chunk rerun as needed."""
        return self._planned(lambda: self._layer_calls(args, kwargs, fn_args, rows), False)

    def _planned(self, compute: Callable[[], Any], checks: bool) -> Any:
        """``compute()`` in eval mode with gradients on, the plan amended and ``compute``
        rerun while a chunk asks for it; ``checks``: the run passed the plan's checks."""
        while True:
            try:
                with module_mode(self.module, False), torch.enable_grad():
                    out = compute()
                self.plan.checked = self.plan.checked or checks
                return out
            except _Replan as replan:
                if replan.__cause__ is None:
                    self.plan.move_to_loop(replan.moves)
                    continue
                # the forward failed with lifts: the move stands only if the chunk then runs
                kept = (list(self.plan.layers), [dict(la.roles) for la in self.plan.layers],
                        dict(self.plan.moved))
                self.plan.move_to_loop(replan.moves)
                try:
                    return self._planned(compute, checks)
                except Exception:
                    self.plan.layers, self.plan.moved = kept[0], kept[2]
                    for layer, roles in zip(kept[0], kept[1], strict=True):
                        layer.roles = roles
                    raise

    def _layer_calls(self, args: tuple, kwargs: dict, fn_args: list[torch.Tensor],
                     rows: int) -> list[LayerCall]:
        values, calls = self._forward(args, kwargs, fn_args, rows, verify=False)
        if values.shape[1] != 1:
            raise InputError(f"layer calls take one value per sample; fn returned "
                             f"{values.shape[1]}")
        live = [c for c in calls if c.output.requires_grad] if values.requires_grad else []
        grads = torch.autograd.grad(values[:, 0].sum(), [c.output for c in live],
                                    allow_unused=True) if live else ()
        found = {id(c): g for c, g in zip(live, grads, strict=True)}
        return [LayerCall(c.layer, c.saved, _or_zeros(found.get(id(c)), c.output))
                for c in calls]

    def _jacobian(self, args: tuple, kwargs: dict, fn_args: list[torch.Tensor], rows: int,
                  verify: bool) -> torch.Tensor:
        values, calls = self._forward(args, kwargs, fn_args, rows, verify)
        first = next(iter(self.leaves.values()))
        size = sum(s.stop - s.start for s in self.slices.values())
        jac = torch.zeros(rows, values.shape[1], size, dtype=first.dtype, device=first.device)
        if values.requires_grad:
            self._hooked_rows(values, calls, jac)
            if verify:
                self._verify_samples(values, jac)
            self._loop_rows(values, jac)
        return jac.detach()

    def _forward(self, args: tuple, kwargs: dict, fn_args: list[torch.Tensor], rows: int,
                 verify: bool) -> tuple[torch.Tensor, list[_Call]]:
        recorder = _Recorder(self.plan, rows)
        try:
            with recorder:
                out = functional_call(self.module, self.tensors, args, kwargs)
            values = _values(self.fn(out, *fn_args), rows)
        except Exception as exc:
            if recorder.lifted:  # perhaps the expanded output broke the model: without it
                raise _Replan(dict.fromkeys(
                    recorder.lifted, f"the model fails with the one-row call expanded ({exc})"
                )) from exc
            raise
        if recorder.unfit:
            raise _Replan(recorder.unfit)
        changed = [c.layer.path for c in recorder.calls
                   if c.saved._version != c.version and "weight" in c.layer.roles]
        if changed:
            # autograd saved the same input for the weight's gradient, so it cannot either
            raise InputError(f"the model modifies the input of {changed[0]} in place after the "
                             f"layer used it: its weight's gradient is not defined by autograd")
        if verify and recorder.lifted:
            with torch.no_grad():
                plain = _values(self.fn(functional_call(self.module, self.tensors, args, kwargs),
                                        *fn_args), rows)
            if not _close(plain, values.detach()):
                raise _Replan(dict.fromkeys(
                    recorder.lifted, "expanding its one-row call changes the model's values"))
        return values, recorder.calls

    def _targets(self, jac: torch.Tensor, row: int) -> dict[str, torch.Tensor]:
        """Views (n, *shape) of row ``row`` of J, one per parameter."""
        return {n: jac[:, row, self.slices[n]].view(jac.shape[0], *leaf.shape)
                for n, leaf in self.leaves.items()}

    def _hooked_rows(self, values: torch.Tensor, calls: list[_Call], jac: torch.Tensor) -> None:
        """One batched backward per row of values to the hooked outputs, then the rules."""
        live = [c for c in calls if c.output.requires_grad]
        if not live:
            return
        for row in range(values.shape[1]):
            grads = torch.autograd.grad(values[:, row].sum(), [c.output for c in live],
                                        retain_graph=True, allow_unused=True)
            targets = self._targets(jac, row)
            for call, dy in zip(live, grads, strict=True):
                if dy is not None:
                    t = {role: targets[name] for role, name in call.layer.roles.items()}
                    _RULES[call.layer.kind](call.layer.module, call.saved, dy, t)

    def _verify_samples(self, values: torch.Tensor, jac: torch.Tensor) -> None:
        """Hooked gradients of the first and last sample against plain autograd (row 0)."""
        names = [n for n in self.plan.hooked if not self._count_scaled(n)]
        if not names:
            return
        leaves = [self.leaves[n] for n in names]
        moves: dict[str, str] = {}
        for i in sorted({0, values.shape[0] - 1}):
            ref = torch.autograd.grad(values[i, 0], leaves, retain_graph=True, allow_unused=True)
            total = torch.sqrt(sum((_dense(g).double().norm() ** 2 for g in ref if g is not None),
                                   torch.zeros((), dtype=torch.float64)))
            for name, g in zip(names, ref, strict=True):
                mine = jac[i, 0, self.slices[name]]
                other = torch.zeros_like(mine) if g is None else _dense(g).reshape(-1)
                if not _close(mine, other, floor=float(total)):
                    moves[name] = ("its hooked gradient differs from autograd's (the weight is "
                                   "used outside its layer's forward, or the layer mixes samples)")
        if moves:
            raise _Replan(moves)

    def _count_scaled(self, name: str) -> bool:
        # autograd of a batch counts indices over the whole batch; the rule counts per sample
        return any(layer.kind == "embedding" and layer.module.scale_grad_by_freq
                   and name in layer.roles.values() for layer in self.plan.layers)

    def _loop_rows(self, values: torch.Tensor, jac: torch.Tensor) -> None:
        """Rest parameters: one backward per sample and row (samples are independent)."""
        rest = self.plan.rest
        if not rest:
            return
        leaves = [self.leaves[n] for n in rest]
        for i in range(values.shape[0]):
            for row in range(values.shape[1]):
                grads = torch.autograd.grad(values[i, row], leaves, retain_graph=True,
                                            allow_unused=True)
                for name, g in zip(rest, grads, strict=True):
                    if g is not None:
                        jac[i, row, self.slices[name]] = _dense(g).reshape(-1)


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).detach() if g is None else g.detach()


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def _values(v: object, rows: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[0] != rows:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise InputError(f"fn must return a tensor (n,) or (n, R) for the n={rows} samples of "
                         f"a chunk; got {got}")
    return v.reshape(rows, -1)


def _close(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> bool:
    """Equal up to rounding, norm-wise: NaN where the other has NaN, and
    ``|a - b| <= rtol (|a| + |b| + 1e-3 floor)`` with rtol ten times the square root of the
    precision (3e-3 in float32, 1.5e-7 in float64): far above rounding, far below the error
    of a rule that does not apply."""
    if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in (a, b))
    rtol = min(10 * eps**0.5, 0.1)
    a, b = a.double().nan_to_num(0.0), b.double().nan_to_num(0.0)
    return float((a - b).norm()) <= rtol * (float(a.norm()) + float(b.norm()) + 1e-3 * floor)


# ---- the route ---------------------------------------------------------------------------


def hooked_jacobians(
    module: nn.Module,
    names: Sequence[str],
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    inputs: Inputs,
    fn: BatchFn,
    *args: torch.Tensor,
    chunk_size: int = 128,
    plan: HookPlan | None = None,
    check: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, J)`` with J (n_chunk, R, M): the gradients, with respect to the
    parameters ``names`` (flat, in that order), of each of the R values per sample that
    ``fn(outputs, *args)`` returns for a chunk.

    ``fn`` gets the model's BATCHED outputs for a chunk (whatever the model returns, e.g. a
    Hugging Face output with ``.logits``) and the chunk's rows of ``args``, and returns (n,)
    (R = 1) or (n, R); value i must depend on sample i only. ``inputs`` is a batched tensor,
    a tuple of them (positional arguments), a dict of them (keyword arguments, e.g.
    ``input_ids`` and ``attention_mask``) or an :class:`iif.task.inputs.Inputs` of both;
    every tensor among them and in ``args`` is sliced along dim 0, other values are passed
    as they are.

    The model runs at ``params`` and ``buffers`` through ``torch.func.functional_call`` (its
    own tensors are never modified), in eval mode (each module's flag restored after each
    chunk), with hooks registered only during each forward and always removed. Eval mode is
    what makes the batched gradient split by sample exactly: no sample's value then depends on
    another sample (BatchNorm in train mode would couple them). Per chunk: one forward, R
    batched backward passes for the hooked parameters, n R for the rest. ``plan``
    (default :func:`hook_plan`) is amended in place when a check moves parameters to the
    per-sample loop; ``check`` runs those checks on the first chunk (see the module's
    docstring) unless the plan passed them before. The Jacobians are detached.
    """
    run, chunks = _prepared(module, names, params, buffers, inputs, fn, args, chunk_size, plan)
    for start, chunk_args, chunk_kwargs, fn_args, rows in chunks:
        jac = run.chunk(chunk_args, chunk_kwargs, fn_args, rows,
                        verify=check and start == 0 and not run.plan.checked)
        yield start, jac


def hooked_layer_calls(
    module: nn.Module,
    names: Sequence[str],
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    inputs: Inputs,
    fn: BatchFn,
    *args: torch.Tensor,
    chunk_size: int = 128,
    plan: HookPlan | None = None,
    check: bool = True,
) -> Iterator[tuple[int, list[LayerCall]]]:
    """Yield ``(start, calls)`` per chunk: every call of the plan's layers in the chunk's
    batched forward, with its saved input and the gradient of ``fn``'s summed values
    (one per sample: (n,) or (n, 1)) with respect to its output (:class:`LayerCall`).

    The same forward as :func:`hooked_jacobians` (arguments, eval mode, lifted one-row
    calls, unfit calls moving their layer to the loop), and one backward per chunk to the
    layer outputs only: no parameter gradient is formed. A layer's per-sample parameter
    gradient is its rule applied to these tensors, summed over its calls. ``check`` first
    runs the plan's checks on the first two samples unless the plan passed them before, so
    a layer whose rule would not give its gradient has left the plan (``plan.moved``); the
    plan may still change on a later chunk (an unfit call), which the caller sees in
    ``plan.moved``. Tensors are detached.
    """
    run, chunks = _prepared(module, names, params, buffers, inputs, fn, args, chunk_size, plan)
    for start, chunk_args, chunk_kwargs, fn_args, rows in chunks:
        if check and start == 0 and not run.plan.checked:
            head = min(rows, 2)
            run.chunk(tuple(_rows_of(v, 0, head) for v in chunk_args),
                      {k: _rows_of(v, 0, head) for k, v in chunk_kwargs.items()},
                      [a[:head] for a in fn_args], head, verify=True)
        yield start, run.layer_calls(chunk_args, chunk_kwargs, fn_args, rows)


_Chunk = tuple[int, tuple, dict, list[torch.Tensor], int]


def _prepared(module: nn.Module, names: Sequence[str], params: Mapping[str, torch.Tensor],
              buffers: Mapping[str, torch.Tensor], inputs: Inputs, fn: BatchFn, args: tuple,
              chunk_size: int, plan: HookPlan | None) -> tuple[_Run, Iterator[_Chunk]]:
    """The run of one call (its plan, leaves and flat layout) and its chunks
    ``(start, positional, keyword, fn's args, rows)``, after the arguments' checks."""
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    call_args, call_kwargs = _as_call(inputs)
    total = _batch_rows(call_args, call_kwargs, args)
    plan = hook_plan(module, names) if plan is None else plan
    if plan.names != list(names):
        raise InputError("the plan was made for other parameter names")
    missing = [n for n in names if n not in params]
    if missing:
        raise InputError(f"params lacks {missing[:3]}")
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    slices, offset = {}, 0
    for n, leaf in leaves.items():
        slices[n] = slice(offset, offset + leaf.numel())
        offset += leaf.numel()
    run = _Run(module, plan, {**params, **leaves, **buffers}, leaves, slices, fn)

    def chunks() -> Iterator[_Chunk]:
        for start in range(0, total, chunk_size):
            stop = start + chunk_size
            yield (start, tuple(_rows_of(v, start, stop) for v in call_args),
                   {k: _rows_of(v, start, stop) for k, v in call_kwargs.items()},
                   [a[start:stop] for a in args], min(stop, total) - start)

    return run, chunks()


def _as_call(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, SampleInputs):
        return inputs.call()
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return tuple(inputs), {}
    raise InputError(f"inputs must be a tensor, a tuple or a dict; got {type(inputs).__name__}")


def _batch_rows(call_args: tuple, call_kwargs: dict, args: tuple) -> int:
    """The number of samples: dim 0 of every batched tensor."""
    tensors = [v for v in (*call_args, *call_kwargs.values()) if isinstance(v, torch.Tensor)]
    if not tensors:
        raise InputError("inputs hold no batched tensor")
    sizes = {tuple(t.shape[:1]) for t in (*tensors, *args)}
    if len(sizes) != 1 or sizes == {()}:
        raise InputError(f"inputs and args must share their first dimension; got {sorted(sizes)}")
    return int(tensors[0].shape[0])


def _rows_of(v: Any, start: int, stop: int) -> Any:
    return v[start:stop] if isinstance(v, torch.Tensor) else v
