"""One strict check for every setting: dataclass fields and method keywords against their type
hints, with ranges declared next to the fields.

Rules (the same for Python, TOML and command-line values):

- ``int``: a Python or numpy integer; never a bool, a float (not even 3.0) or a string.
- ``float``: an int, float or numpy number, never a bool or a string; NaN is always refused,
  and so is +-inf unless the field allows it (``finite=False``).
- ``bool``: ``True`` or ``False`` (numpy bools too); never ``"no"``, 0 or 1.
- ``str``: a string; ``Literal[...]``: one of the listed values.
- ``X | None`` allows None; a union accepts what any of its members accepts, and the range
  applies to its numeric members only (``int | Literal["auto"] | None``).
- a settings dataclass: an instance of it, checked again (its ``__post_init__``).

Ranges are declared with :func:`setting` (``steps: int = setting(3, ge=1, doc="K")``) or
passed to :func:`check_value`. Every refusal is an :class:`iif.errors.InputError` that names
the key, the value and what is expected: ``[path] steps must be an integer >= 1, got 2.7``.
Accepted numpy scalars come back as Python numbers, and ints in ``float`` fields as floats, so
that the same setting is recorded the same way whether it came from Python or from TOML.

Every settings dataclass (``PathSettings``, ``Recipe``, ...) derives from :class:`Settings`:
its ``section`` names its keys in messages, its ``__post_init__`` runs these checks (and
assigning a field later runs the field's) and ``to_dict()`` is its record (part of the run
key). Each field is declared with :func:`setting`, whose ``doc=`` is the field's one-line
description, kept in the field's metadata under :data:`DOC`; :func:`describe_settings` lists
them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import operator
import types
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np

from iif.errors import InputError

LIMITS = "iif.limits"  # the key of a dataclass field's metadata that holds its Limits
DOC = "iif.doc"  # the key of a dataclass field's metadata that holds its one-line description

_REJECT = object()  # what a hint answers for a value it does not accept
_UNION_TYPES = (Union, types.UnionType)


@dataclass(frozen=True)
class Limits:
    """The range of a numeric setting: ``ge <= x``, ``gt < x``, ``x <= le``, ``x < lt``;
    ``finite=False`` also admits +-inf (NaN never)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def admits(self, x: float) -> bool:
        if math.isnan(x) or (self.finite and math.isinf(x)):
            return False
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def describe(self) -> str:
        """``">= 1"``, ``"in (0, 1)"`` or ``""``."""
        low = (f"[{self.ge:g}" if self.ge is not None else
               f"({self.gt:g}" if self.gt is not None else None)
        high = (f"{self.le:g}]" if self.le is not None else
                f"{self.lt:g})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""


NO_LIMITS = Limits()


def setting(default: Any, *, doc: str, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, finite: bool = True) -> Any:
    """A dataclass field with its default, its one-line description ``doc`` (see
    :func:`describe_settings`) and the range :func:`check_settings` enforces."""
    return dataclasses.field(default=default,
                             metadata={LIMITS: Limits(ge, gt, le, lt, finite), DOC: doc})


class Settings:
    """The base of the settings dataclasses (``@dataclass class PathSettings(Settings)``).

    - ``section`` (a class attribute): how messages name the class's keys, e.g. ``"[path]"``
      for a TOML section (``[path] steps must be ...``) or ``"recipe"``.
    - ``__post_init__``: every field checked against its type hint and the range of its
      :func:`setting` (:func:`check_settings`); a subclass with further checks calls
      ``super().__post_init__()`` first.
    - assignment: ``settings.lr = 0.0`` is checked as construction checks the field (same
      message; the refused value is not kept), so a setting changed after construction is
      never used unchecked. A rule on one field belongs in its hint and range, so that it
      holds for both.
    - ``to_dict()``: the fields as a dict (``dataclasses.asdict``), the form recorded in
      results and digested by the run key.
    - :meth:`describe`: each field's name, accepted values, default and description.

    Every field is declared with :func:`setting` and its one-line ``doc``.
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_settings(self, self.section)

    def __setattr__(self, name: str, value: Any) -> None:
        field = _declared(type(self)).get(name)
        if field is not None:  # the dataclass's __init__ assigns through here too
            value = check_value(value, _field_hints(type(self))[name],
                                f"{self.section} {name}", field.metadata.get(LIMITS))
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[SettingDoc]:
        """:func:`describe_settings` of this class."""
        return describe_settings(cls)


@dataclass(frozen=True)
class SettingDoc:
    """One field of a settings dataclass, as :func:`describe_settings` lists it."""

    name: str
    """The field's (and keyword's, and TOML key's) name."""
    accepts: str
    """What it accepts, in words: ``"an integer >= 1"``."""
    default: Any
    """Its default value."""
    doc: str
    """Its one-line description (``setting(..., doc=...)``); empty when none was given."""

    def line(self) -> str:
        """``"epochs: training epochs (an integer >= 0; default 10)"`` (a ``Recipe`` field)."""
        return f"{self.name}: {self.doc} ({self.accepts}; default {self.default!r})"


def describe_settings(cls: type) -> list[SettingDoc]:
    """The fields of the settings dataclass ``cls`` in declaration order, each with what it
    accepts, its default and its ``doc``."""
    hints = _field_hints(cls)
    return [SettingDoc(f.name, describe(hints[f.name], f.metadata.get(LIMITS)),
                       None if f.default is dataclasses.MISSING else f.default,
                       f.metadata.get(DOC, ""))
            for f in dataclasses.fields(cls)]


def check_value(value: Any, hint: Any, name: str, limits: Limits | None = None) -> Any:
    """``value`` checked against the type ``hint`` and ``limits``; returns it with numpy
    scalars as Python values (and ints as floats where a float is expected). Raises
    :class:`InputError` ``"{name} must be ..., got {value!r}"``."""
    limits = limits or NO_LIMITS
    for alternative in _alternatives(hint):
        accepted = _accept(value, alternative, limits)
        if accepted is not _REJECT:
            return accepted
    raise InputError(f"{name} must be {describe(hint, limits)}, got {_show(value)}")


def check_settings(obj: Any, label: str) -> None:
    """Check every field of the settings dataclass ``obj`` against its type hint and the
    range declared with :func:`setting`; numpy scalars are replaced by Python values in
    place. Messages name ``"{label} {field}"``, e.g. ``[path] steps``."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(value, hints[f.name], f"{label} {f.name}",
                              f.metadata.get(LIMITS))
        if type(checked) is not type(value):
            object.__setattr__(obj, f.name, checked)


def revalidate(obj: Any) -> None:
    """Run the checks of a settings dataclass again (its fields may have been assigned since
    it was made)."""
    post_init = getattr(obj, "__post_init__", None)
    if post_init is not None:
        post_init()


def keyword_hint(cls: type, name: str) -> Any:
    """The type hint of keyword ``name`` of ``cls``'s constructor (or of a base class's)."""
    hints = _init_hints(cls)
    if name not in hints:
        raise KeyError(f"{cls.__name__} has no annotated keyword {name!r}")
    return hints[name]


def keyword_names(cls: type) -> list[str]:
    """The keyword-only arguments of ``cls``'s constructor and of the base constructors it
    passes ``**kwargs`` on to, sorted."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break  # this constructor passes nothing further up
    return sorted(names)


def without_none(hint: Any) -> Any:
    """``hint`` with None removed from it (``X | None`` -> ``X``)."""
    rest = [a for a in _alternatives(hint) if a is not type(None)]
    return functools.reduce(operator.or_, rest)


def describe(hint: Any, limits: Limits | None = None) -> str:
    """What ``hint`` accepts, in words: ``"an integer >= 1, 'auto' or None"``."""
    limits = limits or NO_LIMITS
    alternatives = _alternatives(hint)
    words: list[str] = []
    for a in alternatives:
        if get_origin(a) is Literal:
            values = [repr(v) for v in get_args(a)]
            words += values if len(alternatives) > 1 or len(values) == 1 else [
                "one of " + ", ".join(values)]
        else:
            words.append(_describe_one(a, limits))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ---- internals ---------------------------------------------------------------------------
def _alternatives(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in _UNION_TYPES else (hint,)


def _accept(value: Any, hint: Any, limits: Limits) -> Any:
    """``value`` (normalised) if the single, non-union ``hint`` accepts it, else _REJECT."""
    if hint is Any:
        return value
    if hint is type(None):
        return value if value is None else _REJECT
    if get_origin(hint) is Literal:
        return _accept_literal(value, hint)
    if any(hint is t for t in (bool, int, float, str)):  # identity: hints may be odd objects
        return _accept_scalar(value, hint, limits)
    return _accept_other(value, hint)


def _accept_literal(value: Any, hint: Any) -> Any:
    """The ``Literal[...]`` choice equal to ``value``, else _REJECT."""
    for v in get_args(hint):
        # same kind of value: True == 1 and 1.0 == 1, but neither is the other's setting
        if (isinstance(value, type(v)) and isinstance(value, bool) == isinstance(v, bool)
                and value == v):
            return v
    return _REJECT


def _accept_scalar(value: Any, hint: type, limits: Limits) -> Any:
    """``value`` as a ``bool``, ``int``, ``float`` or ``str`` (``hint``) within ``limits``,
    else _REJECT; booleans are never numbers here."""
    if hint is str:
        return value if isinstance(value, str) else _REJECT
    if hint is bool:
        return bool(value) if isinstance(value, (bool, np.bool_)) else _REJECT
    if isinstance(value, (bool, np.bool_)):
        return _REJECT
    if hint is int:
        if not isinstance(value, (int, np.integer)):
            return _REJECT
        return int(value) if limits.admits(int(value)) else _REJECT
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return _REJECT
    return float(value) if limits.admits(float(value)) else _REJECT


def _accept_other(value: Any, hint: Any) -> Any:
    """``value`` checked against a callable, dataclass or class ``hint``, else _REJECT; a
    hint this layer does not understand is left to the code that uses it."""
    origin = get_origin(hint)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return value if callable(value) else _REJECT
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, hint):
            return _REJECT
        revalidate(value)  # its own message, naming its section and field
        return value
    cls = origin or hint
    if isinstance(cls, type):
        return value if isinstance(value, cls) else _REJECT
    return value


def _describe_one(hint: Any, limits: Limits) -> str:
    rng = limits.describe()
    if hint is int:
        return f"an integer {rng}".rstrip()
    if hint is float:
        return f"{'a finite' if limits.finite else 'a'} number {rng}".rstrip()
    if hint is bool:
        return "a boolean (true or false)"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "None"
    if get_origin(hint) is collections.abc.Callable or hint is collections.abc.Callable:
        return "a callable"
    cls = get_origin(hint) or hint
    return f"a {getattr(cls, '__name__', cls)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _declared(cls: type) -> dict[str, dataclasses.Field]:
    """The dataclass fields of ``cls`` by name (none before the dataclass is made)."""
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _init_hints(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass's hint wins over its base's
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            hints.update(get_type_hints(init))
    hints.pop("return", None)
    return hints


__all__ = ["DOC", "LIMITS", "Limits", "SettingDoc", "Settings", "check_settings",
           "check_value", "describe", "describe_settings", "keyword_hint", "keyword_names",
           "revalidate", "setting", "without_none"]
