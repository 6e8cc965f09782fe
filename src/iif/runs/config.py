"""A run described from outside Python: a user's task function and settings (TOML or flags).

The task function (``--task MODULE:FUNCTION`` or ``--task path/to/file.py:FUNCTION``) takes no
arguments and returns either ``(task, train_data, test_data)`` or a mapping with keys
``task``, ``train``, ``test`` and optionally ``models`` (an ensemble) or ``checkpoints``
(TracIn: a list of :class:`iif.methods.tracin.checkpoints.Checkpoint`, or a folder written by
``train_with_checkpoints``). Settings are a mapping (from a TOML file) such as::

    method = "iif"          # iif | if | tracin | trak
    seed = 0
    chunk = 32              # test samples per stored chunk (iif.results.store)
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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from iif.methods.integrated.baseline import BaselineSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, packaged for Python 3.10
    import tomli as tomllib

from iif.engine.curvature import CGSettings, CurvatureSettings
from iif.engine.projection import ProjectionSettings
from iif.errors import InputError
from iif.methods.base import AttributionMethod
from iif.methods.influence import InfluenceFunction
from iif.methods.integrated.integrated import IntegratedInfluence
from iif.methods.integrated.target_path import PathSettings
from iif.methods.tracin.tracin import TracIn
from iif.methods.trak.trak import TRAK
from iif.task.job import Job
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
    from iif.methods.tracin.checkpoints import load_checkpoints

    if job.checkpoints is None:
        raise InputError("TracIn needs checkpoints: return them from the task function under "
                         "the key 'checkpoints' (a list, or the folder train_with_checkpoints "
                         "wrote)")
    if isinstance(job.checkpoints, (str, Path)):
        return load_checkpoints(job.checkpoints)
    return job.checkpoints
