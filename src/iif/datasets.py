"""Data as users hold it: pairs of tensors, a ``Dataset`` or a ``DataLoader``.

:func:`as_pair` turns any of them into ``(inputs, labels)`` for :meth:`iif.task.Task.validate`:

- ``(x, y)`` tensors or arrays, a ``TensorDataset`` of two tensors, or validated ``Data``;
- a map-style ``torch.utils.data.Dataset`` (read in order, in batches, with the default
  collate);
- a ``DataLoader`` (its own ``batch_size`` and ``collate_fn``; tensor, tuple or dictionary
  batches).

Each collated batch becomes ``(inputs, labels)`` by the task's ``batch`` function, or by
:func:`default_batch`. Scores index training samples by their position in the data, so a
loader that shuffles or drops samples is refused: the same sample must have the same column
in every run.

The inputs are gathered into one tensor on the task's device, so the inputs of the whole
training set are held in memory (the features beyond the budget still spill to
``feature_dir``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from iif.errors import InputError, UserCodeError

INPUT_KEYS = ("input_ids", "inputs", "input", "x", "image", "images", "pixel_values")
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
READ_BATCH = 256  # samples per read of a Dataset given without a loader

BatchFn = Callable[[Any], tuple[Any, Any]]


def default_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one collated batch: a pair ``(x, y)`` (a tuple or list of
    two), or a dictionary with one of the keys ``INPUT_KEYS`` and one of ``LABEL_KEYS``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y
        raise InputError(f"a dictionary batch needs an input key (one of {list(INPUT_KEYS)}) "
                         f"and a label key (one of {list(LABEL_KEYS)}); got keys "
                         f"{sorted(map(str, batch))}: give Task(..., batch=fn) mapping a "
                         f"batch to (inputs, labels)")
    raise InputError(f"a batch must be a pair (inputs, labels) or a dictionary, got "
                     f"{type(batch).__name__}: give Task(..., batch=fn) mapping a batch to "
                     f"(inputs, labels)")


def as_pair(data: Any, name: str = "data", batch: BatchFn | None = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of ``data`` (see the module docstring); ``batch`` maps a
    collated batch of a Dataset or DataLoader (None: :func:`default_batch`)."""
    from iif.task import Data

    if isinstance(data, torch.utils.data.TensorDataset):
        if len(data.tensors) != 2:
            raise InputError(f"{name}: a TensorDataset must hold exactly (inputs, labels)")
        return data.tensors
    if isinstance(data, Data):
        return data.x, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if isinstance(data, DataLoader):
        return _gather(data, name, batch)
    if isinstance(data, IterableDataset):
        raise InputError(f"{name} is an IterableDataset: scores index samples by position, "
                         f"so give a map-style Dataset (with __getitem__ and __len__)")
    if isinstance(data, Dataset):
        return _gather(DataLoader(data, batch_size=READ_BATCH, shuffle=False), name, batch)
    raise InputError(f"{name} must be a pair (inputs, labels), a TensorDataset, a Dataset or "
                     f"a DataLoader; got {type(data).__name__}")


def _gather(loader: DataLoader, name: str, batch: BatchFn | None) -> tuple[Any, Any]:
    """Every batch of ``loader`` in order, mapped to (inputs, labels) and concatenated."""
    _check_order(loader, name)
    unpack = default_batch if batch is None else batch
    xs, ys = [], []
    batches = iter(loader)
    for i in itertools.count():
        try:
            item = next(batches)
        except StopIteration:
            break
        except Exception as exc:  # the user's Dataset or collate_fn
            raise UserCodeError(f"reading batch {i} of {name}", exc) from exc
        try:
            x, y = unpack(item)
        except InputError:
            raise
        except Exception as exc:  # the user's batch function
            raise UserCodeError(f"the task's batch function on batch {i} of {name}",
                                exc) from exc
        xs.append(_tensor(x, f"{name} inputs (batch {i})"))
        ys.append(_tensor(y, f"{name} labels (batch {i})"))
    if not xs:
        raise InputError(f"{name} is empty: the loader yields no batch")
    try:
        return torch.cat(xs), torch.cat(ys)
    except RuntimeError as exc:
        raise InputError(f"{name}: batches of different per-sample shapes cannot be joined "
                         f"(pad every sample to one length, e.g. in collate_fn): {exc}") from exc


def _check_order(loader: DataLoader, name: str) -> None:
    if isinstance(loader.dataset, IterableDataset):
        raise InputError(f"{name} reads an IterableDataset: scores index samples by position, "
                         f"so give a map-style Dataset")
    if loader.batch_sampler is not None and not isinstance(loader.sampler, SequentialSampler):
        raise InputError(f"{name}: the DataLoader's sampler is {type(loader.sampler).__name__}; "
                         f"scores index samples by position, so read them in order "
                         f"(shuffle=False, no sampler)")
    if loader.drop_last and len(loader.dataset) % (loader.batch_size or 1):
        raise InputError(f"{name}: the DataLoader drops its last incomplete batch "
                         f"(drop_last=True); every sample must be read")


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except Exception as exc:
        raise InputError(f"{what} cannot be converted to a tensor: {exc}") from exc
