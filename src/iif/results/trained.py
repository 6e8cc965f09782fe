"""A trained model kept on disk under the key of everything that made it.

:func:`train_cached` is for task functions that ``iif attribute``, ``show`` and ``explain``
each call: the model is trained on the first call only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from iif.engine.functional import FunctionalModel
from iif.engine.training import train
from iif.io import atomic_write
from iif.results.runkey import (
    data_digest,
    settings_digest,
    software_versions,
    structure_text,
    tensor_digest,
    text_digest,
)
from iif.task.task import Task

log = logging.getLogger(__name__)


def train_cached(
    task: Task,
    data,
    path: str | os.PathLike,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> bool:
    """:func:`train` once, keeping the trained weights in the file ``path``; later calls with
    the same inputs load them instead of training again. Returns whether it trained.

    For a task function that ``iif attribute``, ``show`` and ``explain`` each call: the model
    is trained on the first call only. The file is used only if it was made from the same
    model structure and *initial* weights (seed the model's construction), data, recipe,
    epochs, seed and versions; otherwise, or if it cannot be read, the model is trained
    again and the file replaced. It holds plain tensors and strings
    (``torch.load(..., weights_only=True)``), written atomically.
    """
    path = Path(path)
    d = task.validate(data, "training data")
    start = FunctionalModel(task.model).state()
    key = text_digest(" ".join([
        text_digest(structure_text(task.model)),
        tensor_digest(list(start.params.values()) + list(start.buffers.values())),
        data_digest(d),
        settings_digest({"recipe": task.recipe.to_dict(), "epochs": epochs, "seed": seed,
                         "kind": task.kind, "versions": software_versions()}),
    ]))
    if path.is_file():
        try:
            saved = torch.load(path, map_location=task.device, weights_only=True)
            if isinstance(saved, dict) and saved.get("key") == key:
                task.model.load_state_dict(saved["state"])
                log.info("loaded the trained model from %s", path)
                return False
            log.info("%s was trained from other inputs; training again", path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is replaced
            log.warning("cannot use %s (%s); training again", path, exc)
    train(task, data, epochs=epochs, seed=seed, progress=progress)
    state = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"key": key, "state": state}, f))
    return True
