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
- ``training data``, ``test data``: inputs (each of several with its key), labels and
  targets in their order,
- ``checkpoints`` (TracIn): the contents of every checkpoint, not its path,
- ``model behaviour``: what every model attributed computes (see below),
- ``custom functions``: the code and captured values of the task's callables (below),
- ``software``: the versions of iif and torch.

**Behaviour.** Weights, structure and source do not see a module's plain tensor or list
attributes, module-level globals a ``forward`` reads, or values captured by closures. So the key
also holds a behavioural fingerprint: for every ensemble member (at its theta*, as the engine
calls it: eval mode, no gradients, the CPU generator and the task's CUDA device's generator
seeded with 0 inside a forked random state), the outputs on a fixed probe (the first
``PROBE`` training samples and, in :func:`run_key`, the first ``PROBE`` test samples; streamed
inputs read only those rows), the task's per-sample losses there and, with a measurement, its
values. Each value is rounded to 40 significant bits (about 12 digits) before it is hashed.
**Custom functions**: for a custom loss, a :class:`~iif.task.measurements.FunctionMeasurement`'s
function and a callable recipe optimizer, :func:`callable_digest` hashes the source, the
closure cells, the defaults and the globals the code names (plain values, tensors and arrays
by value, Python functions followed three levels deep, torch's and numpy's functions by
name, anything else by its type's name). A refusal names ``model behaviour`` only when no
other part differs (other parts explain it: :meth:`RunKey.differences`). Folders written
before these two parts existed hold keys without them, and their resume is refused.

What the key still does not see:

- state that changes the model's outputs, loss or measurement only on inputs outside the probe
  (e.g. a hidden attribute consulted only for rare inputs or for batch positions past the
  probe's), or changes them by less than the rounding (about 1e-12 relative);
- behaviour in train mode only (a changed dropout implementation; the structure still holds
  rates), although path training and unlearning epochs run in train mode;
- randomness inside ``forward`` in eval mode that does not come from torch's CPU or
  CUDA device's generator (Python's ``random``, numpy, another accelerator), which makes
  every key differ (a resume is then refused, never mixed);
- a callable's captured value that is neither plain, a tensor, an array nor a Python function
  (an object, a dict of objects): only its type's name; and a custom optimizer's effect
  beyond its code and captured values (e.g. a global that is an optimizer class modified
  elsewhere);
- the task's ``batch`` function (its effect on the data is hashed with the data);
- numerical noise: two machines (or thread counts) whose results differ past the rounding get
  different keys, and a value on a rounding boundary can flip: a resume is then refused,
  never mixed.

The result store (:mod:`iif.results.store`) keeps the key in its manifest and in every chunk record,
so a chunk is only ever reused by the run that made it, and a refusal names the parts that differ.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import numbers
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iif.engine.training import seeded
from iif.io import jsonable, open_regular
from iif.task.data import several_inputs, take
from iif.task.inputs import Inputs
from iif.version import __version__

PARTS = ("method", "settings", "model weights", "model structure", "model behaviour",
         "custom functions", "training data", "test data", "checkpoints", "software")
DERIVED = ("model behaviour",)  # named only when nothing else differs (RunKey.differences)
PROBE = 8  # training (and test) samples of the behavioural fingerprint
ROUND_BITS = 40  # significant bits of a probed value (about 12 decimal digits)
CALLABLE_DEPTH = 3  # Python functions followed from a custom callable's globals and cells


@dataclass(frozen=True)
class RunKey:
    """The named part digests of a run and the digest of them all (``digest``)."""

    parts: dict[str, str]

    @property
    def digest(self) -> str:
        return text_digest(json.dumps(self.parts, sort_keys=True))

    def differences(self, other: Mapping[str, str] | None) -> list[str]:
        """Names of the parts whose digests differ from ``other`` (a stored ``parts``).
        ``model behaviour`` is named only when no other part differs: it follows from the
        weights, structure, code and data (new test data give new probe outputs), and alone
        it names the state that only the behaviour shows."""
        other = other if isinstance(other, Mapping) else {}
        names = sorted(set(self.parts) | set(other), key=_part_order)
        differ = [n for n in names if self.parts.get(n) != other.get(n)]
        differ = [n for n in differ if n not in DERIVED] or differ
        if not other:
            return differ
        # a part the stored key lacks was added to the key after that folder was written: say
        # so, or the refusal reads as if something the user changed differs
        return [f"{n} (not recorded: written by an earlier version of iif)"
                if n in self.parts and n not in other else n for n in differ]


def _part_order(name: str) -> int:
    return PARTS.index(name) if name in PARTS else len(PARTS)


# ---- digests ---------------------------------------------------------------------------------
def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensors: Iterable[torch.Tensor | np.ndarray | Inputs], digest=None) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``, in order; several inputs
    (:class:`~iif.task.inputs.Inputs`) add each of their tensors after its key. Streamed
    inputs give the digest of the same inputs held: read a chunk at a time, and once per
    input when they are several (a hash takes its bytes in order, input after input)."""
    digest = digest or hashlib.sha256()
    for t in tensors:
        if several_inputs(t):
            for key, tensor in t.named():
                digest.update(f"input {key!r}".encode())
                tensor_digest([tensor], digest)
            continue
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


def file_digest(path: str | Path, what: str = "a file") -> str:
    """SHA-256 of the regular file ``path`` (:func:`iif.io.open_regular`: a FIFO or a device
    such as /dev/zero raises :class:`~iif.errors.InputError` instead of being hashed forever;
    ``what`` names its role)."""
    digest = hashlib.sha256()
    with open_regular(path, what) as (f, _):
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
    return RunKey({**_key_parts(method, test), "test data": data_digest(test)})


def method_key(method: Any) -> RunKey:
    """The key of everything but the test data: what a method's fitted training-side state
    (:mod:`iif.results.fitted`) depends on (its behaviour probed on training samples only)."""
    return RunKey(_key_parts(method, None))


def _key_parts(method: Any, test: Any) -> dict[str, str]:
    members = method.members()
    weights = []
    for member in members:
        weights += list(member.state.params.values()) + list(member.state.buffers.values())
    return {
        "method": text_digest(method.method),
        "settings": settings_digest(method.settings()),
        "model weights": tensor_digest(weights),
        "model structure": model_structure_digest(
            [m for member in members for m in member.models], method.task.loss,
            method.task.measurement),
        "model behaviour": behaviour_digest(method, test),
        "custom functions": functions_digest(method.task),
        "training data": data_digest(method.train),
        "software": settings_digest(software_versions()),
        **method.key_parts(),
    }


# ---- behaviour -------------------------------------------------------------------------------
def behaviour_digest(method: Any, test: Any = None) -> str:
    """The behavioural fingerprint (module docstring): every member's outputs, per-sample losses
    and measurement values on the first ``PROBE`` training (and ``test``) samples, rounded.
    The models are called functionally at theta*, in eval mode: nothing of them changes."""
    task = method.task
    probes = [_probe(method.train)] + ([] if test is None else [_probe(test)])
    digest = hashlib.sha256()
    seen: set[int] = set()
    for member in method.members():
        if id(member.engine) in seen:  # TracIn's runs share one model at theta*
            continue
        seen.add(id(member.engine))
        for x, targets in probes:
            with seeded(0, task.device), torch.no_grad():
                out = member.fmodel.outputs(member.state, x, chunk_size=member.chunk_size)
                values = [out, task.sample_loss(out, targets)]
                if task.measurement is not None:
                    values.append(task.measure(out, targets))
            rounded_digest(values, digest)
    return digest.hexdigest()


def _probe(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``PROBE`` inputs (read, when streamed) and targets of validated data."""
    x = take(data.x, slice(0, PROBE))
    return (x if isinstance(x, (torch.Tensor, Inputs)) else x[:]), data.targets[:PROBE]


def rounded_digest(tensors: Iterable[torch.Tensor], digest: Any) -> None:
    """Add ``tensors`` to ``digest`` as float64 rounded to ``ROUND_BITS`` significant bits
    (NaN and signed zeros made canonical), a block at a time."""
    block = 1 << 20
    for t in tensors:
        digest.update(f"{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        for lo in range(0, flat.numel(), block):
            a = flat[lo : lo + block].to("cpu", torch.float64).numpy()
            mantissa, exponent = np.frexp(a)
            r = np.ldexp(np.round(mantissa * 2.0**ROUND_BITS), exponent - ROUND_BITS)
            digest.update((np.where(np.isnan(r), np.nan, r) + 0.0).tobytes())


# ---- custom functions ------------------------------------------------------------------------
def functions_digest(task: Any) -> str:
    """Digests of the task's custom callables: its loss, a function measurement's function, a
    callable recipe optimizer and an output function (:func:`callable_digest`)."""
    optimizer = getattr(getattr(task, "recipe", None), "optimizer", None)
    fns = {"loss": task.loss, "measurement": getattr(task.measurement, "fn", None),
           "optimizer": optimizer if callable(optimizer) else None}
    if getattr(task, "output", None) is not None:  # only then: earlier keys stay as they were
        fns["output"] = task.output
    return settings_digest({k: None if f is None else callable_digest(f)
                            for k, f in fns.items()})


def callable_digest(fn: Any) -> str:
    """SHA-256 of a callable's source (its bytecode when Python cannot find the source), its
    defaults, closure cell values and the globals its code names: plain values (numbers,
    strings, None), tensors, arrays and lists, tuples and dicts of those by value, Python
    functions followed ``CALLABLE_DEPTH`` levels deep, modules by name, anything else by its
    type's name. A ``functools.partial`` adds its arguments; a bound method its object's
    type; another callable object its class's source and public plain attributes."""
    return text_digest(_callable_text(fn, CALLABLE_DEPTH, set()))


def _callable_text(fn: Any, depth: int, seen: set[int]) -> str:
    if isinstance(fn, functools.partial):
        return (f"partial({_callable_text(fn.func, depth, seen)}, "
                f"{_value_text(fn.args, depth, seen)}, {_value_text(fn.keywords, depth, seen)})")
    func = getattr(fn, "__func__", fn)  # a bound method: its function
    if not _instance(func) and _library(func):  # torch's own functions: by name
        return f"<{func.__module__}.{getattr(func, '__qualname__', type(func).__name__)}>"
    if not inspect.isfunction(func):  # a callable object (a loss module): class and values
        cls = type(fn)
        values = {k: v for k, v in sorted(vars(fn).items()) if not k.startswith("_")} \
            if hasattr(fn, "__dict__") else {}
        code = "" if _library(cls) else source_of(cls)
        return f"{cls.__module__}.{cls.__qualname__}\n{code}\n{_value_text(values, depth, seen)}"
    seen = seen | {id(func)}
    code = func.__code__
    source = source_of(func)
    lines = [source if "unavailable>" not in source else code.co_code.hex()]
    if hasattr(fn, "__self__"):
        lines.append(f"bound to {type(fn.__self__).__qualname__}")
    lines.append(f"defaults {_value_text(func.__defaults__, depth, seen)} "
                 f"{_value_text(func.__kwdefaults__, depth, seen)}")
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later)
            value = "<empty cell>"
        lines.append(f"cell {name} = {_value_text(value, depth, seen)}")
    for name in sorted(_code_names(code)):
        if name in func.__globals__:
            lines.append(f"global {name} = {_value_text(func.__globals__[name], depth, seen)}")
    return "\n".join(lines)


def _instance(obj: Any) -> bool:
    """Whether ``obj`` is a callable object, not a function, builtin or class."""
    return not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or isinstance(obj, type))


def _library(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in ("builtins", "torch", "numpy", "functools")


def _code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names of ``code`` and of the code nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _value_text(value: Any, depth: int, seen: set[int]) -> str:
    if isinstance(value, (str, bool, numbers.Number)) or value is None:
        return repr(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"tensor {tensor_digest([value])}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[" + ", ".join(
            _value_text(v, depth, seen) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_value_text(v, depth, seen)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, types.ModuleType):
        return f"<module {value.__name__}>"
    if inspect.isfunction(value) or isinstance(value, functools.partial):
        if depth > 1 and id(value) not in seen:
            return f"function {text_digest(_callable_text(value, depth - 1, seen))}"
        return f"<function {getattr(value, '__qualname__', 'partial')}>"
    return f"<{type(value).__qualname__}>"
