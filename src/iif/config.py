"""A run described from outside Python: a user's task function and settings (TOML or flags).

The task function (``--task MODULE:FUNCTION`` or ``--task path/to/file.py:FUNCTION``) takes no
arguments and returns either ``(task, train_data, test_data)`` or a mapping with keys
``task``, ``train``, ``test`` and optionally ``models`` (an ensemble) or ``checkpoints``
(TracIn: a list of :class:`iif.checkpoints.Checkpoint`, or a folder written by
``train_with_checkpoints``). Settings are a mapping (from a TOML file) such as::

    method = "iif"          # iif | if | tracin | trak
    seed = 0
    chunk = 32              # test samples per stored chunk (iif.store)
    test_batch = 8          # any other top-level key is a keyword of the method

    [projection]            # ProjectionSettings
    dim = 256
    structure = "kronecker"

    [baseline]              # BaselineSettings (iif); also [path], [curvature], [cg]
    lam = 0.5

Unknown sections or keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from iif.baseline import BaselineSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, packaged for Python 3.10
    import tomli as tomllib

from iif.curvature import CGSettings, CurvatureSettings
from iif.errors import InputError, UserCodeError
from iif.methods.base import AttributionMethod
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated import IntegratedInfluence
from iif.methods.tracin import TracIn
from iif.methods.trak import TRAK
from iif.projection import ProjectionSettings
from iif.target_path import PathSettings
from iif.task import Task
from iif.validation import Limits, check_value, keyword_names

METHODS: dict[str, type[AttributionMethod]] = {
    "iif": IntegratedInfluence, "if": InfluenceFunction, "tracin": TracIn, "trak": TRAK,
}
SECTIONS: dict[str, type] = {
    "projection": ProjectionSettings, "baseline": BaselineSettings, "path": PathSettings,
    "curvature": CurvatureSettings, "cg": CGSettings,
}
# keys of the run itself, not of the method
RUN_KEYS = ("method", "chunk")


@dataclass
class Job:
    """What a task function returns."""

    task: Task
    train: Any
    test: Any
    models: list[Any] | None = None
    checkpoints: Any = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def load_job(spec: str) -> Job:
    """Call the task function named by ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``.

    A module is looked up on ``sys.path`` and in the current folder. An exception raised by
    the module on import or by the function becomes a :class:`UserCodeError` naming the file
    and line; an :class:`InputError` of iif raised inside the function passes unchanged.
    """
    if ":" not in spec:
        raise InputError(f"--task must look like MODULE:FUNCTION or FILE.py:FUNCTION, got "
                         f"{spec!r}")
    where, name = spec.rsplit(":", 1)
    if not where or not name.isidentifier():
        raise InputError(f"--task must look like MODULE:FUNCTION or FILE.py:FUNCTION, got "
                         f"{spec!r}")
    module = _import(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"{where} has no function {name!r}")
    try:
        value = fn()
    except InputError:
        raise
    except Exception as exc:
        raise UserCodeError(f"calling {spec}", exc, getattr(module, "__file__", None)) from exc
    if isinstance(value, Mapping):
        unknown = set(value) - {"task", "train", "test", "models", "checkpoints"}
        if unknown or not {"task", "train", "test"} <= set(value):
            raise InputError(f"{spec} must return keys task, train, test (and optionally "
                             f"models, checkpoints); got {sorted(map(str, value))}")
        job = Job(value["task"], value["train"], value["test"], value.get("models"),
                  value.get("checkpoints"), spec)
    elif isinstance(value, tuple) and len(value) == 3:
        job = Job(*value, source=spec)
    else:
        raise InputError(f"{spec} must return (task, train_data, test_data) or a mapping with "
                         f"keys task, train, test; got {type(value).__name__}")
    if not isinstance(job.task, Task):
        raise InputError(f"{spec} returned a {type(job.task).__name__} as its task, not an "
                         f"iif.Task")
    return job


def task_module(spec: str) -> ModuleType | None:
    """The module of the task function ``spec`` (``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``)
    once :func:`load_job` has imported it; None before, or for a malformed ``spec``."""
    where = spec.rsplit(":", 1)[0]
    return sys.modules.get(_file_module_name(Path(where)) if where.endswith(".py") else where)


def _file_module_name(path: Path) -> str:
    """The module name a task file is imported under: stable for the file, since hash() of a
    path changes from process to process."""
    return "_iif_task_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def _import(where: str):
    """The module ``where``: a ``.py`` file, or a dotted module name looked up on
    ``sys.path`` with the current folder in front (as ``python -m`` has it)."""
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"no such file: {where}")
        name = _file_module_name(path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserCodeError(f"importing {where}", exc, path) from exc
        return module
    if not all(part.isidentifier() for part in where.split(".")):
        raise InputError(f"--task {where!r} is neither a module name nor a .py file; give "
                         f"MODULE:FUNCTION or path/to/file.py:FUNCTION")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # a console script lacks it
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (where == exc.name or where.startswith(exc.name + ".")):
            raise UserCodeError(f"importing {where}", exc) from exc  # an import inside it
        raise InputError(f"cannot import {where!r} ({exc}); run from its folder or add it to "
                         f"PYTHONPATH") from None
    except Exception as exc:
        raise UserCodeError(f"importing {where}", exc) from exc


def load_settings(path: str | Path | None) -> dict[str, Any]:
    """The settings mapping of a TOML file (empty without a file)."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None


def merge(settings: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with ``overrides`` (dotted keys ``section.key`` allowed) laid over it;
    None values in ``overrides`` are skipped."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in settings.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            section, sub = key.split(".", 1)
            out.setdefault(section, {})[sub] = value
        else:
            out[key] = value
    return out


def check_settings(settings: Mapping[str, Any]) -> tuple[type[AttributionMethod], dict[str, Any]]:
    """The method class of ``settings["method"]`` and its keyword arguments, every key and
    value checked (names, types, ranges, sections) without the task: the command line calls
    it before the task function runs, which may train a model."""
    name = check_value(settings.get("method", "iif"), Literal[tuple(METHODS)], "method")
    if "chunk" in settings:
        check_value(settings["chunk"], int, "chunk", Limits(ge=1))
    cls = METHODS[name]
    # what a settings file may set: the method's keywords (its sections among them) and the
    # run's own keys; the models and checkpoints come from the task function
    keywords = set(keyword_names(cls)) - {"models", "checkpoints"}
    known = sorted(keywords | set(RUN_KEYS))
    kwargs: dict[str, Any] = {}
    for key, value in settings.items():
        if key in RUN_KEYS:
            continue
        if key in SECTIONS:
            if key not in keywords:
                raise InputError(f"method {name!r} takes no settings section {key!r}; its "
                                 f"sections: {sorted(keywords & set(SECTIONS))}")
            if not isinstance(value, Mapping):
                raise InputError(f"[{key}] must be a table of settings, got {value!r}")
            kwargs[key] = _section(key, value)
        elif isinstance(value, Mapping):
            raise InputError(f"unknown settings section [{key}]; known: {sorted(SECTIONS)}")
        elif key in ("models", "checkpoints"):
            raise InputError(f"{key!r} is not a setting: the task function returns it")
        elif key not in keywords:
            raise InputError(f"unknown setting {key!r}; known: {known}")
        else:
            kwargs[key] = cls.check_keyword(key, value)
    return cls, kwargs


def build_method(job: Job, settings: Mapping[str, Any]) -> AttributionMethod:
    """The attribution method ``settings["method"]`` for the job, every setting checked
    (:func:`check_settings`)."""
    cls, kwargs = check_settings(settings)
    if job.models is not None:
        kwargs["models"] = job.models
    if cls is METHODS["tracin"]:
        kwargs["checkpoints"] = _checkpoints(job)
    try:
        return cls(job.task, job.train, **kwargs)
    except TypeError as exc:
        raise InputError(f"method {cls.method!r}: {exc}") from None


def _section(name: str, values: Mapping[str, Any]):
    """The settings dataclass of section ``[name]``; its ``__post_init__`` checks every value
    and names ``[name] key`` (see iif.validation)."""
    cls = SECTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown key(s) {unknown} in [{name}]; known: {sorted(known)}")
    return cls(**values)


def _checkpoints(job: Job):
    from iif.checkpoints import load_checkpoints

    if job.checkpoints is None:
        raise InputError("TracIn needs checkpoints: return them from the task function under "
                         "the key 'checkpoints' (a list, or the folder train_with_checkpoints "
                         "wrote)")
    if isinstance(job.checkpoints, (str, Path)):
        return load_checkpoints(job.checkpoints)
    return job.checkpoints
