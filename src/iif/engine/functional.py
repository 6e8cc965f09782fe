"""The model as a pure function of its state: :class:`FunctionalModel` calls a module as
``f(params, buffers, x)`` with ``torch.func.functional_call``, never modifying the module's own
tensors; :class:`ModelState` holds the trainable parameters and buffers of one model version
(theta*, theta', theta_k ...). Also the modes a module runs in: :func:`module_mode` (train or
eval for a block of calls) and :func:`lone_samples_use_running_stats` (BatchNorm on a
minibatch of one sample), and :func:`quiet_attention_fallback` (torch's note on attention
under ``vmap``, which the engine does not pass on).

Flat vectors follow the order of ``FunctionalModel.names`` (the trainable parameters in
``named_parameters()`` order). Gradients of the model are in :mod:`iif.engine.grads`.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from iif.errors import InputError
from iif.task.inputs import Inputs
from iif.task.outputs import OutputFn, model_output


@dataclass
class ModelState:
    """Trainable parameters and buffers of one model version (theta*, theta', theta_k...)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def clone(self) -> ModelState:
        return ModelState(
            {k: v.detach().clone() for k, v in self.params.items()},
            {k: v.detach().clone() for k, v in self.buffers.items()},
        )

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())


# torch's note, at every call under vmap, that its attention kernels run sample by sample there
# (no batching rule): the results are exact, and on small transformers the fallback ran faster
# than attention written out in plain operations, so the note leaves the user nothing to do
_ATTENTION_FALLBACK = re.compile(
    r"There is a performance drop because we have not yet implemented the batching rule for "
    r"aten::_?scaled_dot_product_", re.I)


@contextlib.contextmanager
def quiet_attention_fallback() -> Iterator[None]:
    """Within this block, drop torch's UserWarning that ``scaled_dot_product_attention`` has
    no batching rule under ``vmap``; every other warning is untouched.

    The filter is put in front of ``warnings.filters`` and taken out again without
    ``warnings.catch_warnings``: that would mark the filters changed on every call, so a
    warning the user's filters show once (Python's default) would come back at every chunk.
    """
    item = ("ignore", _ATTENTION_FALLBACK, UserWarning, None, 0)
    filters = warnings.filters  # the list in force now, even if another block replaces it
    filters.insert(0, item)
    try:
        yield
    finally:
        for i, f in enumerate(filters):
            if f is item:
                del filters[i]
                break


def hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's layer), if transformers is imported:
    a model holding one has imported it, and no import here keeps transformers optional and
    off the import path of models that do not use it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily put every submodule in train or eval mode, restoring each one's flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def lone_samples_use_running_stats(module: nn.Module) -> Iterator[None]:
    """For a block of train-mode forwards: a BatchNorm layer that gets one value per channel
    (a minibatch of one sample, e.g. the last of an epoch when N % batch_size == 1) normalises
    it with its running statistics, as in eval mode, and leaves them unchanged.

    PyTorch refuses batch statistics of one value ("Expected more than 1 value per channel
    when training"); running statistics are the estimate the model has for a lone sample. Any
    other call keeps the layer's train mode exactly as PyTorch runs it (a single image of a
    BatchNorm2d still has statistics over its positions), so models without BatchNorm, and
    minibatches of two or more samples, are unaffected. Under ``vmap`` the shape seen is one
    copy's. A layer without running statistics (``track_running_stats=False``) cannot
    normalise a lone sample in any mode and still raises.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flipped: list[nn.Module] = []

    def before(m: nn.Module, args: tuple) -> None:
        inp = args[0] if args else None
        if (m.training and m.running_mean is not None and isinstance(inp, torch.Tensor)
                and inp.dim() >= 2 and inp.numel() == inp.shape[1]):
            m.training = False
            flipped.append(m)

    def after(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if m in flipped:
            flipped.remove(m)
            m.training = True

    handles = [h for m in norms
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in flipped:
            m.training = True


class FunctionalModel:
    """A module called as ``f(state, x)``; the module's own tensors are never modified."""

    def __init__(self, module: nn.Module, output: OutputFn | None = None):
        self.module = module
        self.output = output  # what the forward returns -> its output tensor (model_output)
        # how per-sample gradients are taken (iif.engine.grads.gradient_route): None until a
        # probe decides "vmap" or "hooks"; the note says why not vmap; the hooks' layer plans
        self.route: str | None = None
        self.route_note: str | None = None
        self.hook_plans: dict[tuple[str, ...], Any] = {}  # by the parameters they cover
        named = dict(module.named_parameters())
        self.names = [n for n, p in named.items() if p.requires_grad]
        if not self.names:
            raise InputError("the model has no trainable parameters (requires_grad=True)")
        self.frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.num_params = sum(self.sizes)

    def state(self) -> ModelState:
        """A detached copy of the module's current parameters and buffers."""
        named = self.module.named_parameters()
        params = {n: p.detach().clone() for n, p in named if n in self.names}
        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        return ModelState(params, buffers)

    def load_into_module(self, state: ModelState) -> None:
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in state.params:
                    p.copy_(state.params[n])
            for n, b in self.module.named_buffers():
                if n in state.buffers:
                    b.copy_(state.buffers[n])

    def __call__(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
        x: torch.Tensor | Inputs,
    ) -> torch.Tensor:
        """Outputs (n, d) for inputs ``x`` (n, ...): a tensor, the model's one argument, or
        :class:`~iif.task.inputs.Inputs`, its positional and keyword arguments."""
        state = {**params, **self.frozen, **buffers}
        # the forward's note rises here; the backward's rises in autograd, outside this call,
        # so the vmapped calls that differentiate the model are wrapped as well
        with quiet_attention_fallback():
            if isinstance(x, Inputs):
                out = functional_call(self.module, state, *x.call())
            else:
                out = functional_call(self.module, state, (x,))
        out = model_output(out, self.output)
        return out.reshape(out.shape[0], -1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten_batched(self, tree: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Concatenate per-parameter tensors with ``lead`` leading batch dims into (..., M)."""
        return torch.cat(
            [tree[n].reshape(*tree[n].shape[:lead], -1) for n in self.names], dim=lead
        )

    def outputs(self, state: ModelState, x: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Model outputs (n, d) in eval mode, without gradients."""
        with torch.no_grad(), module_mode(self.module, False):
            return torch.cat(
                [self(state.params, state.buffers, x[i : i + chunk_size])
                 for i in range(0, x.shape[0], chunk_size)]
            )
