"""Training checkpoints: model versions recorded during training, in memory or on disk.

TracIn (:class:`iif.methods.tracin.tracin.TracIn`) sums gradient products over the checkpoints of
one training run, each weighted by the learning rate in use at that point of training.

On disk a checkpoint is ``epoch_XXXX.pt``, a plain dict of tensors
``{"params": {name: tensor}, "buffers": {name: tensor}}`` readable with
``torch.load(path, weights_only=True)``; the folder's ``checkpoints.json`` lists the epochs,
learning rates and file names (no pickle): files of that folder, each listed once. Files are
written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted
run never leaves a truncated checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.training import fit, seeded
from iif.errors import InputError
from iif.io import atomic_write, read_json_file, regular_file
from iif.task.task import Task
from iif.validation import Limits, check_value

log = logging.getLogger(__name__)

INDEX_FILE = "checkpoints.json"
FORMAT_VERSION = 1


def checkpoint_file(epoch: int) -> str:
    """File name of the checkpoint taken after ``epoch`` epochs."""
    return f"epoch_{int(epoch):04d}.pt"


@dataclass
class Checkpoint:
    """One model version of a training run and the learning rate in use there.

    Exactly one of ``state`` (in memory) and ``path`` (a file written by
    :func:`train_with_checkpoints` or :func:`save_checkpoint`, or a flat ``state_dict()`` saved
    with ``torch.save``) is set.
    """

    epoch: int
    lr: float
    state: ModelState | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.state is None) == (self.path is None):
            raise InputError(f"checkpoint at epoch {self.epoch}: give exactly one of state "
                             f"(in memory) and path (on disk)")
        if self.state is not None and not isinstance(self.state, ModelState):
            raise InputError(f"checkpoint at epoch {self.epoch}: state must be a ModelState, "
                             f"got {type(self.state).__name__}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real):
            raise InputError(f"checkpoint at epoch {self.epoch}: lr must be a number, "
                             f"got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"checkpoint at epoch {self.epoch}: lr must be positive and "
                             f"finite, got {self.lr!r}")
        self.lr = float(self.lr)
        self.epoch = int(self.epoch)
        if self.path is not None:
            self.path = Path(self.path)

    def describe(self) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return f"checkpoint at epoch {self.epoch}{where}"

    def load(self, fmodel: FunctionalModel) -> ModelState:
        """The checkpoint's parameters and buffers on ``fmodel``'s device and dtype.

        Raises :class:`InputError` when the checkpoint does not fit ``fmodel`` (other parameter
        names or shapes). Floating-point tensors are cast to the model's dtype. From a flat
        state dict, buffers it lacks keep the module's values and frozen parameters
        (``requires_grad=False``) are ignored: the module's own are used.
        """
        ref = fmodel.module.get_parameter(fmodel.names[0])
        if self.state is not None:
            raw: Any = {"params": self.state.params, "buffers": self.state.buffers}
        else:
            if not self.path.exists():
                raise InputError(f"{self.describe()}: no such file")
            regular_file(self.path, "a checkpoint")  # a FIFO or /dev/zero: refused
            try:
                raw = torch.load(self.path, weights_only=True, map_location=ref.device)
            except Exception as exc:
                raise InputError(f"{self.describe()} cannot be read as a dict of tensors "
                                 f"(torch.load with weights_only=True): {exc}") from exc
        return _conform(raw, fmodel, self.describe(), ref.device, ref.dtype)


def _conform(raw: Any, fmodel: FunctionalModel, what: str, device: torch.device,
             dtype: torch.dtype) -> ModelState:
    """Split and check a saved dict against the model: names, shapes, then device and dtype."""
    if not isinstance(raw, dict):
        raise InputError(f"{what} must hold a dict of tensors, got {type(raw).__name__}")
    if set(raw) == {"params", "buffers"} and all(isinstance(v, dict) for v in raw.values()):
        params_in, buffers_in = dict(raw["params"]), dict(raw["buffers"])
        frozen: set[str] = set()
    else:  # a flat state dict: trainable parameters, frozen ones and persistent buffers
        params_in = {k: v for k, v in raw.items() if k in fmodel.names}
        buffers_in = {k: v for k, v in raw.items() if k not in params_in}
        frozen = set(fmodel.frozen)
    module_buffers = dict(fmodel.module.named_buffers())
    missing = [n for n in fmodel.names if n not in params_in]
    unknown = [n for n in params_in if n not in fmodel.names]
    unknown += [n for n in buffers_in if n not in module_buffers and n not in frozen]
    if missing or unknown:
        raise InputError(
            f"{what} does not fit the task model: missing parameters {missing[:3]}, unknown "
            f"entries {unknown[:3]} (the checkpoint must come from the same architecture)"
        )
    want = dict(zip(fmodel.names, fmodel.shapes, strict=True))
    want.update({n: b.shape for n, b in module_buffers.items()})
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for out, source in ((params, params_in), (buffers, buffers_in)):
        for name, value in source.items():
            if name in frozen:
                continue
            if not isinstance(value, torch.Tensor):
                raise InputError(f"{what}: entry {name!r} is a {type(value).__name__}, not a "
                                 f"tensor")
            if tuple(value.shape) != tuple(want[name]):
                raise InputError(
                    f"{what} does not fit the task model: {name!r} has shape "
                    f"{tuple(value.shape)} in the checkpoint but {tuple(want[name])} in the "
                    f"model (parameter shapes must match)"
                )
            value = value.detach().to(device)
            out[name] = value.to(dtype) if value.is_floating_point() else value
    params = {n: params[n] for n in fmodel.names}  # the engine's order
    for name, value in module_buffers.items():
        buffers.setdefault(name, value.detach().clone())
    return ModelState(params, buffers)


def save_checkpoint(state: ModelState, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` as ``{"params": {...}, "buffers": {...}}`` (CPU tensors),
    atomically. The file loads with ``torch.load(path, weights_only=True)``."""
    path = Path(path)
    payload = {
        "params": {k: v.detach().cpu() for k, v in state.params.items()},
        "buffers": {k: v.detach().cpu() for k, v in state.buffers.items()},
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def _write_index(directory: Path, checkpoints: list[Checkpoint]) -> None:
    index = {
        "format": FORMAT_VERSION,
        "checkpoints": [{"epoch": c.epoch, "lr": c.lr, "file": c.path.name}
                        for c in checkpoints],
    }
    text = json.dumps(index, indent=2, allow_nan=False)
    atomic_write(directory / INDEX_FILE, lambda f: f.write(text.encode()))


def train_with_checkpoints(
    task: Task,
    data: Any,
    *,
    epochs: int | None = None,
    every: int = 1,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[Checkpoint]:
    """Train ``task.model`` in place like :func:`iif.engine.training.train` and record checkpoints.

    The trained model is the same as ``train(task, data, epochs=epochs, seed=seed)`` gives.
    A checkpoint is taken after every ``every``-th epoch and always after the last one (after
    epoch 0, the untrained model, when there are no epochs). With ``directory`` the checkpoints
    are written there as ``epoch_XXXX.pt`` with the index ``checkpoints.json`` (rewritten after
    each one; files of an earlier run in the folder stay but are no longer listed) and only
    their paths are kept in memory; otherwise they hold their states.

    ``lr`` of every checkpoint is the recipe's learning rate: training uses a constant rate
    (there are no learning-rate schedules yet).

    Returns the checkpoints sorted by epoch.
    """
    every = check_value(every, int, "every", Limits(ge=1))
    epochs = check_value(task.recipe.epochs if epochs is None else epochs, int, "epochs",
                         Limits(ge=0))
    d = task.validate(data, "training data")
    folder = None if directory is None else Path(directory)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _write_index(folder, [])  # an index of an earlier run in the folder no longer applies
    lr = float(task.recipe.lr)
    recorded: list[Checkpoint] = []

    def record(epoch: int, state: ModelState) -> None:
        if folder is None:
            recorded.append(Checkpoint(epoch, lr, state=state))
            return
        path = save_checkpoint(state, folder / checkpoint_file(epoch))
        recorded.append(Checkpoint(epoch, lr, path=path))
        _write_index(folder, recorded)

    def on_epoch(epoch: int, state: ModelState) -> None:
        if epoch % every == 0:
            record(epoch, state)

    fmodel = FunctionalModel(task.model, task.output)
    gen = torch.Generator().manual_seed(seed)  # as in iif.engine.training.train
    with seeded(seed, task.device):
        res = fit(task, fmodel, fmodel.state(), d.x, d.targets, epochs=epochs, generator=gen,
                  on_epoch=on_epoch, progress=progress, desc="training")
    if not res.finite:
        log.warning("training broke down (NaN/inf) after %d of %d epochs; the model and the "
                    "last checkpoint hold the last sound epoch", res.epochs, epochs)
    if not recorded or recorded[-1].epoch != res.epochs:
        record(res.epochs, res.state.clone())
    fmodel.load_into_module(res.state)
    return recorded


def load_checkpoints(directory: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints listed in ``directory/checkpoints.json``, sorted by epoch.

    Their tensors stay on disk until :meth:`Checkpoint.load`.
    """
    folder = Path(directory)
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        raise InputError(f"{folder} holds no {INDEX_FILE}: not a checkpoint folder written by "
                         f"train_with_checkpoints")
    try:
        index = read_json_file(index_path, "a checkpoint index")
        entries = [(str(e["file"]), int(e["epoch"]), float(e["lr"]))
                   for e in index["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{index_path} is not a valid checkpoint index: {exc}") from exc
    checkpoints = []
    seen: dict[Path, tuple[str, int]] = {}
    for name, epoch, lr in entries:
        path = _indexed_file(folder, index_path, name)
        c = Checkpoint(epoch, lr, path=path)
        if not path.exists():
            raise InputError(f"{c.describe()} is listed in {index_path} but missing")
        regular_file(path, "a checkpoint")
        # a file listed twice would count twice in TracIn's sum over checkpoints
        resolved = path.resolve()
        if resolved in seen:
            first, first_epoch = seen[resolved]
            raise InputError(f"{index_path}: entry {name!r} (epoch {epoch}) names the same file "
                             f"as entry {first!r} (epoch {first_epoch}); list each checkpoint "
                             f"once")
        seen[resolved] = (name, epoch)
        checkpoints.append(c)
    return sorted(checkpoints, key=lambda c: c.epoch)


def _indexed_file(folder: Path, index_path: Path, name: str) -> Path:
    """``folder / name`` for an index entry ``name``; refused when it leads out of ``folder``
    (an absolute path, ``..`` or a symbolic link pointing elsewhere): an index describes the
    files of its own folder, and a copied or downloaded folder must not read others."""
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symbolic link loop
        raise InputError(f"{index_path}: entry {name!r} cannot be resolved: {exc}") from exc
    if Path(name).is_absolute() or not inside:
        raise InputError(f"{index_path}: entry {name!r} is outside the checkpoint folder "
                         f"{folder}; an index may only name files in its own folder")
    return path
