"""Samples with several inputs: :class:`Inputs` holds positional tensors ``args`` and keyword
tensors ``kwargs`` of the same n samples, and reaches the model as ``model(*args, **kwargs)``
(e.g. a Hugging Face classifier's ``input_ids=..., attention_mask=...``).

An ``Inputs`` behaves, where the engine handles inputs, like a tensor of n samples: ``len``,
``shape``, indexing by a slice, an integer or an index tensor (every tensor indexed alike),
``to``, ``detach``, ``cpu``, ``unsqueeze``/``squeeze`` of every tensor, and ``torch.cat`` /
``torch.stack`` of several of them. It is a pytree node, so ``torch.func.vmap`` maps over all
its tensors along dim 0 and a mapped sample is an ``Inputs`` of per-sample tensors.

Its "main" input names the data in messages and gives ``shape``, ``dtype``, ``device`` and
``is_floating_point``: the first positional tensor, else ``input_ids`` (or the first key of
:data:`INPUT_KEYS` present), else the first key. A sample with one input is a
plain tensor, never an ``Inputs``: :func:`joined_inputs` builds one only for two inputs or
more. Samples streamed from a dataset (:class:`iif.task.data.StreamedInputs`) are read as an
``Inputs`` of those samples, and answer ``shape``, ``structure``, ``sample_shapes`` and
``describe`` alike without reading any.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from iif.errors import InputError

# keys that name a dictionary's main input, in order (and the one input of today's batches)
INPUT_KEYS = ("input_ids", "inputs", "input", "x", "image", "images", "pixel_values")

Key = int | str  # a positional input's position, or a keyword input's name


class Inputs:
    """Several inputs of n samples: positional tensors ``args`` and keyword tensors
    ``kwargs``, each of shape (n, ...), passed to a model as ``model(*args, **kwargs)``.

    ``shape`` is ``(n, *per-sample shape of the main input)`` (see the module docstring);
    ``len`` is n. Indexing applies one index to every tensor: ``x[2:5]`` and ``x[idx]`` (an
    index tensor of any shape) give an ``Inputs`` of those samples, ``x[:, None]`` adds a
    dimension after the samples' to every tensor.
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[torch.Tensor] = (),
                 kwargs: Mapping[str, torch.Tensor] | None = None):
        args, kwargs = tuple(args), dict(kwargs or {})
        named = [*enumerate(args), *kwargs.items()]
        if len(named) < 2:
            raise InputError("Inputs holds two inputs or more; pass a single input as the "
                             "tensor itself")
        for key, value in named:
            if not isinstance(value, torch.Tensor):
                raise InputError(f"{_label(key)} is a {type(value).__name__}; every input "
                                 f"must be a tensor")
            if value.ndim == 0:
                raise InputError(f"{_label(key)} is a scalar; every input needs one row per "
                                 f"sample")
        self.args, self.kwargs = args, kwargs
        n, main = len(self), self.main_key
        for key, value in named:
            if value.shape[0] != n:
                raise InputError(f"{_label(key)} holds {value.shape[0]} samples, "
                                 f"{_label(main)} {n}: every input needs one row per sample")

    @classmethod
    def _raw(cls, args: tuple, kwargs: dict) -> Inputs:
        """Without checks: for the pytree (whose leaves may be anything while torch maps
        over them) and for results of indexing, which keep the structure."""
        out = object.__new__(cls)
        out.args, out.kwargs = args, kwargs
        return out

    # ---- what the inputs are ---------------------------------------------------------
    def named(self) -> Iterator[tuple[Key, torch.Tensor]]:
        """``(key, tensor)`` of every input: positions first, then keywords."""
        yield from enumerate(self.args)
        yield from self.kwargs.items()

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def input(self, key: Key) -> torch.Tensor:
        """The input ``key``: a positional input's position or a keyword input's name."""
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    @property
    def main_key(self) -> Key:
        if self.args:
            return 0
        return next((k for k in INPUT_KEYS if k in self.kwargs), next(iter(self.kwargs)))

    @property
    def main(self) -> torch.Tensor:
        """The main input (module docstring)."""
        return self.input(self.main_key)

    def structure(self) -> tuple[int, tuple[str, ...]]:
        """How many positional inputs, and the keyword names in order."""
        return len(self.args), tuple(self.kwargs)

    def sample_shapes(self) -> dict[Key, tuple[int, ...]]:
        """The per-sample shape of every input, by key."""
        return {k: tuple(t.shape[1:]) for k, t in self.named()}

    def describe(self) -> str:
        """``input_ids (6,) int64, attention_mask (6,) int64``: each input's per-sample shape
        and dtype, for messages."""
        return ", ".join(f"{_label(k, short=True)} {tuple(t.shape[1:])} "
                         f"{str(t.dtype).removeprefix('torch.')}" for k, t in self.named())

    def call(self) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """``(args, kwargs)`` to call a model with: ``model(*args, **kwargs)``."""
        return self.args, dict(self.kwargs)

    def __repr__(self) -> str:
        return f"Inputs(n={len(self)}: {self.describe()})"

    # ---- the tensor-like protocol ----------------------------------------------------
    def __len__(self) -> int:
        return int(self.main.shape[0])

    @property
    def shape(self) -> torch.Size:
        """``(n, *per-sample shape of the main input)``."""
        return self.main.shape

    @property
    def ndim(self) -> int:
        return self.main.ndim

    def dim(self) -> int:
        return self.main.ndim

    @property
    def device(self) -> torch.device:
        return self.main.device

    @property
    def dtype(self) -> torch.dtype:
        return self.main.dtype

    def is_floating_point(self) -> bool:
        return self.main.is_floating_point()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """The same inputs with ``fn`` applied to every tensor."""
        return Inputs._raw(tuple(fn(t) for t in self.args),
                           {k: fn(t) for k, t in self.kwargs.items()})

    def __getitem__(self, index: Any) -> Inputs:
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None, non_blocking: bool = False) -> Inputs:
        """Every tensor on ``device``; ``dtype`` converts the floating-point tensors only
        (token ids and masks keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device

        def move(t: torch.Tensor) -> torch.Tensor:
            keep = dtype is None or not t.is_floating_point()
            return t.to(device, None if keep else dtype, non_blocking=non_blocking)

        return self.map(move)

    def detach(self) -> Inputs:
        return self.map(torch.Tensor.detach)

    def cpu(self) -> Inputs:
        return self.map(torch.Tensor.cpu)

    def contiguous(self) -> Inputs:
        return self.map(torch.Tensor.contiguous)

    def unsqueeze(self, dim: int) -> Inputs:
        return self.map(lambda t: t.unsqueeze(dim))

    def squeeze(self, dim: int) -> Inputs:
        return self.map(lambda t: t.squeeze(dim))

    @classmethod
    def cat(cls, parts: Sequence[Inputs], dim: int = 0) -> Inputs:
        """The parts joined along ``dim`` (0: their samples), input by input; parts of other
        inputs are refused, tensors that do not fit raise torch's RuntimeError naming the
        input."""
        return cls._joined(torch.cat, parts, dim)

    @classmethod
    def stack(cls, parts: Sequence[Inputs], dim: int = 0) -> Inputs:
        """The parts stacked along a new dimension ``dim``, input by input."""
        return cls._joined(torch.stack, parts, dim)

    @classmethod
    def _joined(cls, join: Callable, parts: Sequence[Any], dim: int) -> Inputs:
        parts = list(parts)
        if not parts or not all(isinstance(p, Inputs) for p in parts):
            kinds = sorted({type(p).__name__ for p in parts})
            raise InputError(f"inputs of several tensors join only with their like, got "
                             f"{', '.join(kinds) or 'nothing'}")
        first = parts[0]
        for p in parts[1:]:
            if p.structure() != first.structure():
                raise InputError(f"inputs ({p.describe()}) do not match ({first.describe()}): "
                                 f"every sample needs the same inputs")
        out = {}
        for key, _ in first.named():
            try:
                out[key] = join([p.input(key) for p in parts], dim=dim)
            except RuntimeError as exc:
                raise RuntimeError(f"{_label(key)}: {exc}") from exc
        count = len(first.args)
        return Inputs._raw(tuple(out[i] for i in range(count)),
                           {k: out[k] for k in first.kwargs})

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        # torch.cat / torch.stack of chunks, wherever the engine joins inputs
        kwargs = kwargs or {}
        if func is torch.cat:
            return cls.cat(*args, **kwargs)
        if func is torch.stack:
            return cls.stack(*args, **kwargs)
        return NotImplemented


def _label(key: Key, short: bool = False) -> str:
    if isinstance(key, int):
        return f"input {key}" if short else f"positional input {key}"
    return key if short else f"input {key!r}"


def _flatten(x: Inputs) -> tuple[list[Any], tuple[int, tuple[str, ...]]]:
    return [*x.args, *x.kwargs.values()], (len(x.args), tuple(x.kwargs))


def _unflatten(values: Any, context: tuple[int, tuple[str, ...]]) -> Inputs:
    count, keys = context
    values = list(values)
    return Inputs._raw(tuple(values[:count]), dict(zip(keys, values[count:], strict=True)))


pytree.register_pytree_node(Inputs, _flatten, _unflatten,
                            serialized_type_name=f"{__name__}.Inputs")


# ---- building and calling ---------------------------------------------------------------
def joined_inputs(args: Sequence[torch.Tensor] = (),
                  kwargs: Mapping[str, torch.Tensor] | None = None
                  ) -> torch.Tensor | Inputs:
    """The inputs ``args`` and ``kwargs`` of n samples: the tensor itself when there is one
    positional input (or one keyword input: passed positionally), else an :class:`Inputs`."""
    kwargs = dict(kwargs or {})
    if len(args) + len(kwargs) == 1:
        return args[0] if args else next(iter(kwargs.values()))
    return Inputs(args, kwargs)


def call_model(model: Callable[..., Any], x: torch.Tensor | Inputs) -> Any:
    """``model(x)``, or ``model(*args, **kwargs)`` for several inputs."""
    if isinstance(x, Inputs):
        args, kwargs = x.call()
        return model(*args, **kwargs)
    return model(x)


def check_keywords(model: nn.Module, x: Any, name: str = "data") -> None:
    """Refuse keyword inputs that are not parameters of ``model.forward`` (unless it takes
    ``**kwargs``), in one line naming the key and the forward's parameters."""
    if not isinstance(x, Inputs) or not x.kwargs:
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward Python cannot read: the model decides
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in x.kwargs:
        if key not in takes:
            raise InputError(f"{name} has the input {key!r}, which {type(model).__name__}."
                             f"forward does not take (its parameters: {', '.join(takes)}); "
                             f"drop it from the batches or give Task(..., batch=fn)")
