"""A task function named from outside Python: ``--task MODULE:FUNCTION`` or
``--task path/to/file.py:FUNCTION``, as ``iif attribute``, ``show``, ``explain`` and ``report``
load it.

The function takes no arguments and returns either ``(task, train_data, test_data)`` or a
mapping with keys ``task``, ``train``, ``test`` and optionally ``models`` (an ensemble) or
``checkpoints`` (TracIn). Its module is imported under a name stable across processes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from iif.errors import InputError, UserCodeError
from iif.task.task import Task


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
