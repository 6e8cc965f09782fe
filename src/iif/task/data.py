"""Data as users hold it: pairs of tensors, a ``Dataset`` or a ``DataLoader``.

:func:`as_pair` turns any of them into ``(inputs, labels)`` for :meth:`iif.task.task.Task.validate`:

- ``(x, y)`` tensors or arrays, a ``TensorDataset`` of two tensors, or validated ``Data``;
- a map-style ``torch.utils.data.Dataset`` (read in order, in batches, with the default
  collate);
- a ``DataLoader`` (its own ``batch_size`` and ``collate_fn``; tensor, tuple or dictionary
  batches).

Each collated batch becomes ``(inputs, labels)`` by the task's ``batch`` function, or by
:func:`default_batch`. Scores index training samples by their position in the data, so a
loader that shuffles or drops samples is refused: the same sample must have the same column
in every run.

Inputs that take more than ``IN_MEMORY_BYTES`` (estimated from the first batch), or data
wrapped in :class:`Streamed`, are not gathered: they become :class:`StreamedInputs`, which
read the samples an operation needs from the dataset (with the loader's ``collate_fn``) each
time, so no N x (input size) tensor is ever held; labels and targets are held. A dataset read
this way must return the same sample for the same index (no random augmentation): the first
batch is read twice to check. Only the pictures (``iif show``, ``explain``, ``report``) read
every input in at once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from iif.errors import InputError, UserCodeError

INPUT_KEYS = ("input_ids", "inputs", "input", "x", "image", "images", "pixel_values")
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
READ_BATCH = 256  # samples per read of a Dataset given without a loader
IN_MEMORY_BYTES = 1 << 30  # inputs beyond this are streamed, not gathered

BatchFn = Callable[[Any], tuple[Any, Any]]

log = logging.getLogger(__name__)


@dataclass
class Data:
    """Validated data on the task's device: inputs, raw labels and continuous targets."""

    x: torch.Tensor
    labels: torch.Tensor  # (n,) int64 for classification, (n, d) float for regression
    targets: torch.Tensor  # (n, d) float: one-hot or regression values

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (f"Data(n={len(self)}, inputs={tuple(self.x.shape[1:])}, "
                f"targets={tuple(self.targets.shape[1:])})")

    def subset(self, index: torch.Tensor | np.ndarray | list[int] | slice) -> Data:
        if not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if isinstance(index, list) else index)
            if index.dtype == torch.bool:  # a mask, not the indices 0 and 1
                if index.shape != (len(self.x),):
                    raise InputError(f"a boolean mask must have shape ({len(self.x)},), got "
                                     f"{tuple(index.shape)}")
                index = index.nonzero().flatten()
            index = index.to(device=self.x.device, dtype=torch.long)
        return Data(self.x[index], self.labels[index], self.targets[index])



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


class Streamed:
    """``Streamed(dataset_or_loader)``: read the inputs on demand whatever their size (see
    the module docstring), e.g. to keep a large image set on disk."""

    def __init__(self, data: Dataset | DataLoader):
        if not isinstance(data, (Dataset, DataLoader)):
            raise InputError(f"Streamed wraps a Dataset or a DataLoader, got "
                             f"{type(data).__name__}")
        self.data = data


class StreamedInputs:
    """The inputs of a map-style dataset, read when indexed: ``x[rows]`` (a slice, or an
    index tensor of any shape) loads those samples and returns them as a tensor of shape
    ``(*rows.shape, *sample_shape)`` on ``device``; ``x.view(block)`` is the lazy part of a
    row range. Holds the dataset, not its samples."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], unpack: BatchFn,
                 rows: Sequence[int], sample_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | None = None):
        self.dataset, self.collate, self.unpack = dataset, collate, unpack
        self.rows, self.sample_shape = rows, tuple(sample_shape)
        self.dtype, self.device = dtype, device or torch.device("cpu")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.sample_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"StreamedInputs(n={len(self)}, sample_shape={self.sample_shape}, "
                f"dtype={self.dtype}, device={self.device})")

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def bound(self, device: torch.device, float_dtype: torch.dtype) -> StreamedInputs:
        """The same inputs read onto ``device``: floating point as ``float_dtype``, integer
        token ids as int64 (what embeddings take)."""
        dtype = float_dtype if self.dtype.is_floating_point else torch.int64
        return StreamedInputs(self.dataset, self.collate, self.unpack, self.rows,
                              self.sample_shape, dtype, device)

    def view(self, block: slice | Sequence[int] | torch.Tensor) -> StreamedInputs:
        """The rows ``block`` (a slice or sample indices), still unread."""
        if isinstance(block, slice):
            rows = self.rows[block]
        else:
            rows = [self.rows[i] for i in torch.as_tensor(block).reshape(-1).tolist()]
        return StreamedInputs(self.dataset, self.collate, self.unpack, rows,
                              self.sample_shape, self.dtype, self.device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):
            raise TypeError("streamed inputs are indexed by samples only (one index)")
        if isinstance(index, slice):
            return self._read(list(self.rows[index]))
        if isinstance(index, int):
            return self._read([self.rows[index]])[0]
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            raise TypeError("index streamed inputs with sample indices, not a mask")
        rows = self._read([self.rows[i] for i in idx.reshape(-1).tolist()])
        return rows.reshape(*idx.shape, *self.sample_shape)

    def cpu(self) -> torch.Tensor:
        """Every input read in, on the CPU: what the pictures of ``iif show`` / ``explain`` /
        ``report`` draw from (the only reads of the whole set)."""
        log.info("reading all %d streamed inputs to draw them", len(self))
        return self[:].cpu()

    def chunks(self, size: int | None = None):
        """The inputs in order, ``size`` (default ``READ_BATCH``) samples at a time."""
        size = size or READ_BATCH
        for lo in range(0, len(self), size):
            yield self[lo : lo + size]

    def _read(self, positions: list[int]) -> torch.Tensor:
        parts = []
        for lo in range(0, len(positions), READ_BATCH):
            batch = self.collate([self.dataset[p] for p in positions[lo : lo + READ_BATCH]])
            parts.append(to_tensor(self.unpack(batch)[0], "streamed inputs"))
        if not parts:
            return torch.empty((0, *self.sample_shape), dtype=self.dtype, device=self.device)
        return torch.cat(parts).to(self.device, self.dtype)


def take(x: torch.Tensor | StreamedInputs, block: slice | torch.Tensor
         ) -> torch.Tensor | StreamedInputs:
    """Rows ``block`` (a slice or indices) of the inputs: a tensor's rows, or a streamed
    view left unread."""
    if isinstance(x, StreamedInputs):
        return x if block == slice(None) else x.view(block)
    return x[block]


def as_pair(data: Any, name: str = "data", batch: BatchFn | None = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of ``data`` (see the module docstring); ``batch`` maps a
    collated batch of a Dataset or DataLoader (None: :func:`default_batch`)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        if len(data.tensors) != 2:
            raise InputError(f"{name}: a TensorDataset must hold exactly (inputs, labels)")
        return data.tensors
    if isinstance(data, Data):
        return data.x, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if isinstance(data, Streamed):
        inner = data.data
        loader = inner if isinstance(inner, DataLoader) else \
            DataLoader(inner, batch_size=READ_BATCH, shuffle=False)
        return _gather(loader, name, batch, stream=True)
    if isinstance(data, DataLoader):
        return _gather(data, name, batch)
    if isinstance(data, IterableDataset):
        raise InputError(f"{name} is an IterableDataset: scores index samples by position, "
                         f"so give a map-style Dataset (with __getitem__ and __len__)")
    if isinstance(data, Dataset):
        return _gather(DataLoader(data, batch_size=READ_BATCH, shuffle=False), name, batch)
    raise InputError(f"{name} must be a pair (inputs, labels), a TensorDataset, a Dataset or "
                     f"a DataLoader; got {type(data).__name__}")


def _gather(loader: DataLoader, name: str, batch: BatchFn | None,
            stream: bool = False) -> tuple[Any, Any]:
    """Every batch of ``loader`` in order, mapped to (inputs, labels): the inputs
    concatenated, or :class:`StreamedInputs` when ``stream`` or too large to hold; the
    labels concatenated."""
    _check_order(loader, name)
    unpack = default_batch if batch is None else batch
    xs, ys, first = [], [], None
    for i, x, y in _batches(loader, name, unpack):
        if first is None:
            first = x
            stream = stream or x[:1].nelement() * x.element_size() * len(loader.dataset) \
                > IN_MEMORY_BYTES
        if stream:
            _check_streamed_batch(x, first, f"{name} (batch {i})")
        else:
            xs.append(x)
        ys.append(y)
    if first is None:
        raise InputError(f"{name} is empty: the loader yields no batch")
    y = _joined(ys, name)
    if not stream:
        return _joined(xs, name), y
    log.info("%s: %d samples are read from the dataset when needed, not held", name, len(y))
    inputs = StreamedInputs(loader.dataset, loader.collate_fn, unpack,
                            range(len(loader.dataset)), tuple(first.shape[1:]), first.dtype)
    if len(inputs) != len(y) or not torch.equal(inputs[: len(first)], first.to(inputs.dtype)):
        raise InputError(f"{name}: reading the first samples again gave other inputs; a "
                         f"streamed dataset must return the same sample for the same index "
                         f"(no random augmentation)")
    return inputs, y


def _batches(loader: DataLoader, name: str, unpack: BatchFn):
    """``(i, inputs, labels)`` of every batch, errors of the user's code named."""
    batches = iter(loader)
    for i in itertools.count():
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # the user's Dataset or collate_fn
            raise UserCodeError(f"reading batch {i} of {name}", exc) from exc
        try:
            x, y = unpack(item)
        except InputError:
            raise
        except Exception as exc:  # the user's batch function
            raise UserCodeError(f"the task's batch function on batch {i} of {name}",
                                exc) from exc
        yield (i, to_tensor(x, f"{name} inputs (batch {i})"),
               to_tensor(y, f"{name} labels (batch {i})"))


def _joined(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    try:
        return torch.cat(parts)
    except RuntimeError as exc:
        raise InputError(f"{name}: batches of different per-sample shapes cannot be joined "
                         f"(pad every sample to one length, e.g. in collate_fn): {exc}") from exc


def _check_streamed_batch(x: torch.Tensor, first: torch.Tensor, what: str) -> None:
    """What the task checks on gathered inputs, for one batch of streamed ones."""
    if x.shape[1:] != first.shape[1:] or x.dtype != first.dtype:
        raise InputError(f"{what}: inputs of per-sample shape {tuple(x.shape[1:])} ({x.dtype}) "
                         f"after {tuple(first.shape[1:])} ({first.dtype}); pad every sample "
                         f"to one length, e.g. in collate_fn")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{what}: inputs contain NaN or inf")


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


def to_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` (a tensor, an array or nested numbers) as a tensor, or an InputError naming
    ``what`` when it is not numeric."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{what} cannot be converted to an array: {exc}") from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{what} must be numeric, got an array of dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))
