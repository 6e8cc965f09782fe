"""A method's fitted state: what depends only on theta* and the training set, kept in a folder.

``method.fit(folder)`` (:meth:`iif.methods.base.AttributionMethod.fit`) computes the training
side of a method once (projected training features, the factored curvature or kernel, per-sample
weights) and writes it here; a later ``fit(folder)`` of the same run loads it, so attributing new
test samples only featurises them. Layout of the folder::

    fitted.safetensors   every tensor of every ensemble member, ``m{i}/{name}`` (no pickle)
    fitted.json          format, method, the run key without the test data
                         (:func:`iif.results.runkey.method_key`) and its parts, the settings, each
                         member's JSON metadata (dampings, retries, solver kinds) and each
                         tensor's shape, dtype and SHA-256
    .iif-lock            present while a process fits into the folder

A folder holding the state of another run (other settings, model weights or structure,
training data, checkpoints, software) is refused, naming the parts that differ, as the result
store refuses (:mod:`iif.results.store`). A state whose files do not match their record (a changed
byte, a truncated file, an unreadable record) is computed again and rewritten: the record
names the run it belongs to and the state is a deterministic function of that run, so
recomputing gives exactly what was lost, where a refusal would only ask the user to delete
it; an empty record, or one cut short or without its format (an interrupted copy, a full disk),
is such a damaged state, not another version's. Both files are written to temporary names and
renamed into place, the record last, so a crash leaves the old state or none; a full disk is
one line naming the file. Loading reads JSON and safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from iif.engine.linalg import CholeskySolver, Solver, WoodburySolver, column_blocks
from iif.errors import InputError
from iif.io import jsonable, read_file
from iif.results.chunks import (
    FolderLock,
    make_folder,
    read_json,
    remove_temporary_files,
    write_file,
)
from iif.results.runkey import RunKey, tensor_digest

if TYPE_CHECKING:
    from iif.engine.curvature import CurvatureSettings
    from iif.engine.factored import FactoredInfluence, Factors
    from iif.engine.functional import FunctionalModel

log = logging.getLogger(__name__)

RECORD = "fitted.json"
TENSORS = "fitted.safetensors"
FORMAT = 1
REFIT = "free some space or use a folder on another disk, then fit again"


@dataclass
class FittedState:
    """One model's fitted state: named tensors and JSON-safe metadata (floats, ints, str)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# ---- the folder ------------------------------------------------------------------------------
def fit_folder(folder: str | os.PathLike, key: RunKey, settings: dict[str, Any], name: str,
               n_members: int, compute: Callable[[], list[FittedState]],
               load: Callable[[list[FittedState]], None]) -> str:
    """Load the fitted states of a method's members from ``folder``, or compute and save them
    there; the method hands over its run key without test data (``method_key``), its ``settings``,
    its ``name``, its number of members, ``compute`` (the members' states, computed and kept) and
    ``load`` (takes the members' states read from the folder, on the CPU). Returns ``"loaded"`` or
    ``"saved"``; raises :class:`InputError` when the folder holds the state of another run."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a folder for the fitted state")
    make_folder(path)
    lock = FolderLock(path)
    try:
        remove_temporary_files(path)
        states = read_states(path, key, settings, n_members, name)
        if states is not None:
            load(states)
            log.info("%s: fitted state loaded from %s", name, path)
            return "loaded"
        write_states(path, key, settings, compute(), name)
        log.info("%s: fitted state saved to %s", name, path)
        return "saved"
    finally:
        lock.release()


def write_states(folder: Path, key: RunKey, settings: dict[str, Any],
                 states: list[FittedState], method: str) -> None:
    """Write the members' states: the tensors, then the record that vouches for them."""
    tensors: dict[str, torch.Tensor] = {}
    for i, state in enumerate(states):
        for name, t in state.tensors.items():
            # safetensors stores CPU tensors that own their storage (no shared views)
            tensors[f"m{i}/{name}"] = t.detach().cpu().contiguous().clone()
    blob = save_tensors(tensors)
    record = {
        "format": FORMAT,
        "method": method,
        "key": key.digest,
        "parts": dict(key.parts),
        "settings": jsonable(settings),
        "members": [jsonable(s.meta) for s in states],
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                           "sha256": tensor_digest([t])} for name, t in tensors.items()},
    }
    text = json.dumps(record, indent=2, allow_nan=False)
    # the record last: a record on disk always describes the tensors beside it
    (folder / RECORD).unlink(missing_ok=True)
    write_file(folder / TENSORS, lambda f: f.write(blob), len(blob), REFIT)
    data = text.encode()
    write_file(folder / RECORD, lambda f: f.write(data), len(data), REFIT)


def read_states(folder: Path, key: RunKey, settings: dict[str, Any], n_members: int,
                method: str) -> list[FittedState] | None:
    """The members' states in ``folder``; None when there is none or it is damaged (then it
    is computed again); :class:`InputError` when it belongs to another run."""
    if not (folder / RECORD).exists():
        return None
    record = read_json(folder / RECORD, "fitted-state record")
    if isinstance(record, str):
        log.warning("%s %s; fitting again", folder, record)
        return None
    if not isinstance(record.get("format"), int):  # every version of iif writes one
        log.warning("%s has a damaged fitted-state record %s (no format field, which every "
                    "record has); fitting again", folder, RECORD)
        return None
    if record["format"] != FORMAT:
        raise InputError(f"{folder} holds a fitted state of another version of iif (format "
                         f"{record.get('format')!r}, this one reads {FORMAT}); use a fresh "
                         f"folder")
    differs = key.differences(record.get("parts"))
    if differs:
        from iif.results.store import describe_differences

        what = describe_differences(differs, record.get("settings"), jsonable(settings))
        raise InputError(f"{folder} holds the fitted state of another run ({record.get('method')}"
                         f"): {what}; use a fresh folder for {method}")
    problem = _tensor_problem(folder, record)
    if isinstance(problem, str):
        log.warning("fitted state in %s %s; fitting again", folder, problem)
        return None
    metas = record.get("members")
    if not isinstance(metas, list) or len(metas) != n_members:
        log.warning("fitted state in %s has a malformed record; fitting again", folder)
        return None
    states = [FittedState({}, dict(m)) for m in metas]
    for name, t in problem.items():
        member, _, part = name.partition("/")
        states[int(member[1:])].tensors[part] = t
    return states


def _tensor_problem(folder: Path, record: dict[str, Any]) -> dict[str, torch.Tensor] | str:
    """The tensors of ``folder`` checked against the record, or what is wrong with them."""
    try:  # read_file refuses a FIFO or /dev/zero (InputError) instead of reading it
        tensors = load_tensors(read_file(folder / TENSORS, "the fitted tensors"))
    except InputError:
        raise
    except (OSError, SafetensorError, ValueError) as exc:
        return f"has unreadable tensors ({exc})"
    expected = record.get("tensors")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        return "does not hold the tensors its record lists"
    for name, t in tensors.items():
        want = expected[name]
        if not isinstance(want, dict) or list(t.shape) != want.get("shape") \
                or tensor_digest([t]) != want.get("sha256"):
            return f"has a tensor {name} that does not match its record (changed bytes)"
    return tensors


# ---- solvers ---------------------------------------------------------------------------------
def solver_state(solver: Solver, prefix: str, rows: torch.Tensor | None = None
                 ) -> FittedState:
    """A Cholesky or Woodbury solver as tensors and metadata. ``rows``: the Woodbury rows when
    the caller saves them anyway (the training features), so they are not stored twice."""
    meta = {"dim": solver.dim, "damping": solver.damping, "retries": solver.retries,
            "kind": solver.kind, "details": solver.details}
    tensors = {f"{prefix}factor": solver.factor}
    if isinstance(solver, WoodburySolver):
        meta["type"] = "woodbury"
        meta["rows_shared"] = solver.rows is rows
        if solver.rows is not rows:
            tensors[f"{prefix}rows"] = solver.rows
    elif isinstance(solver, CholeskySolver):
        meta["type"] = "cholesky"
    else:
        raise InputError(f"a {type(solver).__name__} has no state to save")
    return FittedState(tensors, {prefix: meta})


def load_solver(state: FittedState, prefix: str, rows: torch.Tensor | None = None) -> Solver:
    """The solver :func:`solver_state` saved, on its factor as saved (no refactoring)."""
    meta = state.meta[prefix]
    solver: Solver
    if meta["type"] == "woodbury":
        solver = WoodburySolver.__new__(WoodburySolver)
        solver.rows = rows if meta["rows_shared"] else state.tensors[f"{prefix}rows"]
        solver.blocks = column_blocks(*solver.rows.shape)
    else:
        solver = CholeskySolver.__new__(CholeskySolver)
    solver.factor = state.tensors[f"{prefix}factor"]
    Solver.__init__(solver, int(meta["dim"]), float(meta["damping"]), int(meta["retries"]),
                    kind=meta["kind"])
    solver.details = dict(meta["details"])
    return solver


def merged(*states: FittedState) -> FittedState:
    """One state of several parts (their names do not overlap)."""
    out = FittedState()
    for s in states:
        out.tensors.update(s.tensors)
        out.meta.update(s.meta)
    return out


# ---- exact solves from layer factors ---------------------------------------------------------
def factored_state(fit: FactoredInfluence) -> FittedState:
    """Exact influence functions from layer factors
    (:class:`iif.engine.factored.FactoredInfluence`): the training factors per layer, the
    curvature's factors when they are others (the Gauss-Newton rows), its Gram matrix K (n, n) and
    the Cholesky factor of K + n delta I."""
    solver, fisher = fit.solver, fit.solver.fisher
    if solver.cholesky is None:
        raise InputError("only a Cholesky-factored solve has a state to save")
    tensors = {"kuu": fisher.kuu, "cholesky": solver.cholesky}
    tensors.update(_factor_tensors("train", fit.train))
    own = fisher.factors is fit.train
    if not own:
        tensors.update(_factor_tensors("curvature", fisher.factors))
    meta = {"factored": {"n": fisher.n, "row": fisher.row, "effective_dim": fisher.effective_dim,
                         "damping": solver.damping, "retries": solver.retries,
                         "kernel": fit.kernel is not None, "curvature_is_train": own,
                         "layers": len(fit.train.layers)}}
    return FittedState(tensors, meta)


def load_factored(state: FittedState, fmodel: FunctionalModel, settings: CurvatureSettings
                  ) -> FactoredInfluence:
    """The :class:`iif.engine.factored.FactoredInfluence` :func:`factored_state` saved."""
    from iif.engine.factored import FactoredFisher, FactoredInfluence, Factors, linear_layers

    meta = state.meta["factored"]
    layers = linear_layers(fmodel)
    if layers is None or len(layers) != meta["layers"]:
        raise InputError("the fitted factored state does not fit this model's layers")

    def factors(prefix: str) -> Factors:
        return Factors(layers, [state.tensors[f"{prefix}.inputs.{i}"] for i in range(len(layers))],
                       [state.tensors[f"{prefix}.grads.{i}"] for i in range(len(layers))])

    train = factors("train")
    curvature = train if meta["curvature_is_train"] else factors("curvature")
    kuu = state.tensors["kuu"]
    fisher = FactoredFisher(fmodel, curvature, settings, int(meta["effective_dim"]),
                            n=int(meta["n"]), row=int(meta["row"]), gram=kuu)
    solver = fisher.cholesky_solver(state.tensors["cholesky"], float(meta["damping"]),
                                    int(meta["retries"]))
    return FactoredInfluence(train, solver, kuu if meta["kernel"] else None)


def _factor_tensors(prefix: str, factors: Factors) -> dict[str, torch.Tensor]:
    out = {}
    for i, (a, d) in enumerate(zip(factors.inputs, factors.grads, strict=True)):
        out[f"{prefix}.inputs.{i}"] = a
        out[f"{prefix}.grads.{i}"] = d
    return out
