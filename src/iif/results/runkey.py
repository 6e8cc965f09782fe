"""The run key: one digest of everything that determines an attribution's scores.

A key is made of named parts, each a SHA-256:

- ``method``, ``settings``: the method's name and every setting (``method.settings()``,
  which holds the task's kind, recipe, dtype and device),
- ``model weights``: parameters and buffers of every model attributed (theta*, frozen when
  the method was built),
- ``model structure``: the module tree (each module's name, class, ``extra_repr()``, public
  scalar attributes such as ``p`` or ``eps``, train/eval mode, parameter names, shapes and
  whether they train) and the source code of every module class not from ``torch`` (and of
  a custom loss function), where Python can find it,
- ``training data``, ``test data``: inputs, labels and targets in their order,
- ``checkpoints`` (TracIn): the contents of every checkpoint, not its path,
- ``software``: the versions of iif and torch.

The result store (:mod:`iif.results.store`) keeps the key in its manifest and in every chunk record,
so a chunk is only ever reused by the run that made it, and a refusal names the parts that differ.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iif.io import jsonable
from iif.version import __version__

PARTS = ("method", "settings", "model weights", "model structure", "training data",
         "test data", "checkpoints", "software")


@dataclass(frozen=True)
class RunKey:
    """The named part digests of a run and the digest of them all (``digest``)."""

    parts: dict[str, str]

    @property
    def digest(self) -> str:
        return text_digest(json.dumps(self.parts, sort_keys=True))

    def differences(self, other: Mapping[str, str] | None) -> list[str]:
        """Names of the parts whose digests differ from ``other`` (a stored ``parts``)."""
        other = other if isinstance(other, Mapping) else {}
        names = sorted(set(self.parts) | set(other), key=_part_order)
        return [n for n in names if self.parts.get(n) != other.get(n)]


def _part_order(name: str) -> int:
    return PARTS.index(name) if name in PARTS else len(PARTS)


# ---- digests ---------------------------------------------------------------------------------
def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensors: Iterable[torch.Tensor | np.ndarray], digest=None) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``, in order."""
    digest = digest or hashlib.sha256()
    for t in tensors:
        if hasattr(t, "chunks"):  # streamed inputs: the same bytes, read a chunk at a time
            kind = torch.empty((), dtype=t.dtype).numpy().dtype.str
            digest.update(f"{kind}{tuple(t.shape)}".encode())
            for part in t.chunks():
                digest.update(part.detach().cpu().contiguous().numpy().tobytes())
            continue
        a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else \
            np.ascontiguousarray(t)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def settings_digest(settings: Mapping[str, Any]) -> str:
    return text_digest(json.dumps(jsonable(settings), sort_keys=True, allow_nan=False))


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(data: Any) -> str:
    """Digest of validated data (:class:`iif.task.task.Data`): inputs, labels and targets."""
    return tensor_digest([data.x, data.labels, data.targets])


# ---- the model's structure -------------------------------------------------------------------
def structure_text(model: nn.Module) -> str:
    """A text that changes whenever the module tree or a custom module's code changes.

    Weights are left out (they are their own part); the mode is in, since unlearning and path
    training run in the model's mode."""
    lines: list[str] = []
    classes: dict[str, type] = {}
    for name, module in model.named_modules():
        cls = type(module)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.__module__.startswith("torch."):
            # by name and source, not module: a task file's module name depends on how it
            # was imported (``mytask`` or ``path/to/mytask.py``), its code does not
            qual = cls.__qualname__
            classes[qual] = cls
        attrs = {k: v for k, v in sorted(vars(module).items())
                 if not k.startswith("_") and k != "training" and _plain(v)}
        params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad)
                  for n, p in module.named_parameters(recurse=False)]
        buffers = [(n, tuple(b.shape), str(b.dtype))
                   for n, b in module.named_buffers(recurse=False)]
        lines.append(f"{name or '<model>'}: {qual}({module.extra_repr()}) mode="
                     f"{'train' if module.training else 'eval'} attrs={attrs!r} "
                     f"params={params!r} buffers={buffers!r}")
    for qual, cls in sorted(classes.items()):
        lines.append(f"source of {qual}:\n{class_source(cls)}")
    return "\n".join(lines)


def class_source(cls: type) -> str:
    """The source of ``cls`` and of its custom base classes, with each of their functions
    read through its own code object (a class found by name alone could be another one)."""
    texts = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch") or klass.__module__ == "builtins":
            continue
        texts.append(source_of(klass))
        for name, value in sorted(vars(klass).items()):
            func = getattr(value, "__func__", value)
            if inspect.isfunction(func):
                texts.append(f"{name}: {source_of(func)}")
    return "\n".join(texts)


def _plain(value: Any) -> bool:
    if isinstance(value, (str, bool, numbers.Number)) or value is None:
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


def source_of(obj: Any) -> str:
    """The source code of a class or function, or a marker when Python cannot find it."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"<source of {getattr(obj, '__qualname__', type(obj).__name__)} unavailable>"


def model_structure_digest(models: Iterable[nn.Module], loss: Any = None,
                           measurement: Any = None) -> str:
    """The models' structure, with the source of a custom loss and of a measurement (its
    class, its public values and, for a function measurement, the function)."""
    texts = [structure_text(m) for m in models]
    if loss is not None:
        texts.append("loss:\n" + source_of(loss))
    if measurement is not None:
        values = {k: v for k, v in vars(measurement).items()
                  if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
        texts.append(f"measurement: {values} higher_is_better={measurement.higher_is_better}\n"
                     + source_of(type(measurement)) + source_of(getattr(measurement, "fn", None)))
    return text_digest("\n\n".join(texts))


# ---- the key of a run ------------------------------------------------------------------------
def software_versions() -> dict[str, str]:
    return {"iif": __version__, "torch": torch.__version__}


def run_key(method: Any, test: Any) -> RunKey:
    """The key of ``method`` (an :class:`iif.methods.base.AttributionMethod`) attributing the
    validated test data ``test``; the method adds parts of its own (``key_parts``)."""
    return RunKey({**method_key(method).parts, "test data": data_digest(test)})


def method_key(method: Any) -> RunKey:
    """The key of everything but the test data: what a method's fitted training-side state
    (:mod:`iif.results.fitted`) depends on."""
    members = method.members()
    weights = []
    for member in members:
        weights += list(member.state.params.values()) + list(member.state.buffers.values())
    parts = {
        "method": text_digest(method.method),
        "settings": settings_digest(method.settings()),
        "model weights": tensor_digest(weights),
        "model structure": model_structure_digest(
            [m for member in members for m in member.models], method.task.loss,
            method.task.measurement),
        "training data": data_digest(method.train),
        "software": settings_digest(software_versions()),
        **method.key_parts(),
    }
    return RunKey(parts)
