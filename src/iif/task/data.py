"""Data as users hold it: pairs of tensors, a ``Dataset`` or a ``DataLoader``.

:func:`as_pair` turns any of them into ``(inputs, labels)`` for :meth:`iif.task.task.Task.validate`:

- ``(x, y)`` tensors or arrays (``x`` may be a tuple of positional inputs or a dictionary of
  keyword inputs), a ``TensorDataset`` ``(x1, ..., y)``, or validated ``Data``;
- a map-style ``torch.utils.data.Dataset`` (read in order, in batches, with the default
  collate);
- a ``DataLoader`` (its own ``batch_size`` and ``collate_fn``; tensor, tuple or dictionary
  batches).

Each collated batch becomes ``(inputs, labels)`` by the task's ``batch`` function, or by
:func:`default_batch`: a pair, a tuple ``(x1, x2, ..., y)`` of positional inputs, or a
dictionary whose entries besides the labels (the task's ``label_key``, else the first of
``LABEL_KEYS``) are keyword inputs, such as a tokenizer's ``input_ids`` and
``attention_mask``. Entries that are not arrays (strings) are named in one warning and not
passed to the model. A sample with several inputs is an :class:`~iif.task.inputs.Inputs`,
with one a plain tensor.

Scores index training samples by their position in the data: column j is sample j of the
dataset, so a loader must yield samples 0..N-1 in order, each once. Its index stream (its
``batch_sampler``, or its ``sampler`` when it does not batch) is read first, indices only, and
a loader that shuffles, skips, repeats or drops samples is refused; where the indices say
nothing about what is yielded (keys that are not positions, a loader with its own
``__iter__``), its first and last batches are compared with the dataset's own samples at
those positions.

Inputs that take more than ``IN_MEMORY_BYTES`` (estimated from the first batch, every input
of a sample counted), or data wrapped in :class:`Streamed`, are not gathered: they become
:class:`StreamedInputs`, which read the samples an operation needs from the dataset (with the
loader's ``collate_fn``) each time, so no N x (input size) tensor is ever held; labels and
targets are held. Samples with several inputs stream as one input does: a read gives an
:class:`~iif.task.inputs.Inputs` of those samples. A dataset read this way must return the
same sample for the same index (no random augmentation): a CRC-32 of every sample (of all its
inputs, in key order) is kept from the first read (4 bytes a sample) and every later read is
compared with it, and the first batch and the last sample are read again at once. Only the
pictures (``iif show``, ``explain``, ``report``) read every input in at once.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    default_collate,
)

from iif.errors import InputError, UserCodeError
from iif.task.inputs import INPUT_KEYS, Inputs, Key, joined_inputs

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
READ_BATCH = 256  # samples per read of a Dataset given without a loader
IN_MEMORY_BYTES = 1 << 30  # inputs beyond this are streamed, not gathered

BatchFn = Callable[[Any], tuple[Any, Any]]
IN_ORDER = ("scores index samples by position, so each sample must be read once, in order: use "
            "shuffle=False and no sampler, or pass the Dataset itself")
CHANGED = ("a dataset read by streaming must return the same sample for the same index (no "
           "random augmentation)")

log = logging.getLogger(__name__)


@dataclass
class Data:
    """Validated data on the task's device: inputs, raw labels and continuous targets."""

    x: torch.Tensor | Inputs | StreamedInputs  # (n, ...); Inputs: several per sample
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



def default_batch(batch: Any, label_key: str | None = None,
                  dropped: dict[str, str] | None = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one collated batch:

    - a pair ``(x, y)`` (a tuple or list of two; ``x`` may itself be a tuple, list or
      dictionary of tensors: see :func:`model_inputs`);
    - a tuple or list ``(x1, x2, ..., y)`` of more: the positional inputs ``(x1, x2, ...)``;
    - a dictionary: its labels under ``label_key`` (None: the first of ``LABEL_KEYS``
      present), every other array entry a keyword input (``input_ids``,
      ``attention_mask``...; a single one is passed positionally, as before). Entries that
      are not arrays (strings) are not passed to the model: ``dropped`` gets their names
      and types, for one warning per data set."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return tuple(batch[:-1]), batch[-1]
    if isinstance(batch, Mapping):
        key = _label_key(batch, label_key)
        rest = {k: v for k, v in batch.items() if k != key}
        return _dict_inputs(rest, "a dictionary batch", dropped), batch[key]
    raise InputError(f"a batch must be a pair (inputs, labels), a tuple (inputs..., labels) "
                     f"or a dictionary, got {type(batch).__name__}: give Task(..., batch=fn) "
                     f"mapping a batch to (inputs, labels)")


def _label_key(batch: Mapping, label_key: str | None) -> Any:
    """The key of a dictionary batch's labels: ``label_key``, or the first of
    ``LABEL_KEYS`` present."""
    keys = sorted(map(str, batch))
    if label_key is not None:
        if label_key in batch:
            return label_key
        raise InputError(f"a dictionary batch has no label key {label_key!r}; got keys {keys}: "
                         f"give Task(..., label_key=...) naming the labels' key")
    key = next((k for k in LABEL_KEYS if k in batch), None)
    if key is None:
        raise InputError(f"a dictionary batch needs a label key (one of {list(LABEL_KEYS)}) "
                         f"beside its input keys; got keys {keys}: give Task(..., "
                         f"label_key=...), or Task(..., batch=fn) mapping a batch to "
                         f"(inputs, labels)")
    return key


def model_inputs(x: Any, what: str, dropped: dict[str, str] | None = None
                 ) -> torch.Tensor | Inputs | StreamedInputs:
    """The inputs ``x`` of a pair as the model takes them: a dictionary's array entries as
    keyword inputs, a tuple or list of tensors as positional inputs (an
    :class:`~iif.task.inputs.Inputs` for two or more, the tensor itself for one), anything
    else as one tensor (:func:`to_tensor`); streamed inputs stay so. ``dropped``: see
    :func:`default_batch`."""
    if isinstance(x, StreamedInputs):
        return x
    if isinstance(x, Inputs):
        return x.detach()
    if isinstance(x, Mapping):
        return _dict_inputs(x, what, dropped)
    if isinstance(x, (tuple, list)) and x and all(isinstance(v, torch.Tensor) for v in x):
        return joined_inputs([v.detach() for v in x])
    return to_tensor(x, what)


def _dict_inputs(entries: Mapping, what: str, dropped: dict[str, str] | None
                 ) -> torch.Tensor | Inputs:
    """The array entries of a dictionary as keyword inputs (a key of ``INPUT_KEYS`` is one
    whatever it holds); the names and types of the others go to ``dropped``."""
    kept = {}
    for key, value in entries.items():
        if _numeric_array(value) or key in INPUT_KEYS:
            kept[str(key)] = to_tensor(value, f"{what} entry {key!r}")
        elif dropped is not None:
            dropped.setdefault(str(key), type(value).__name__)
    if not kept:
        raise InputError(f"{what} holds no input tensor (keys {sorted(map(str, entries))}): "
                         f"give Task(..., batch=fn) mapping a batch to (inputs, labels)")
    return joined_inputs(kwargs=kept)


def _numeric_array(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number)
                                              or value.dtype == np.bool_)


class Streamed:
    """``Streamed(dataset_or_loader)``: read the inputs on demand whatever their size (see
    the module docstring), e.g. to keep a large image set on disk."""

    def __init__(self, data: Dataset | DataLoader):
        if not isinstance(data, (Dataset, DataLoader)):
            raise InputError(f"Streamed wraps a Dataset or a DataLoader, got "
                             f"{type(data).__name__}")
        self.data = data


class StreamedInputs:
    """The inputs of a map-style dataset, read when indexed: ``x[rows]`` (a slice, an integer
    or an index tensor of any shape) loads those samples and returns them as a tensor of shape
    ``(*rows.shape, *sample_shape)``, or for several inputs an :class:`~iif.task.inputs.Inputs`
    of such tensors (every input indexed alike), on ``device``; ``x.view(block)`` is the lazy
    part of a row range. Holds the dataset, not its samples; ``digests``
    (:func:`sample_digests` of every sample, by dataset position) make each read refuse a
    sample that changed since, in a message naming ``name``.

    ``layout`` is what a read of no sample gives (a tensor, or an ``Inputs``, of zero rows):
    every input's per-sample shape, dtype and device. ``shape``, ``dtype`` and
    ``is_floating_point`` are the main input's, as for ``Inputs``; ``named()`` gives each of
    several inputs as streamed inputs of its own (still unread)."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], unpack: BatchFn,
                 rows: Sequence[int], layout: torch.Tensor | Inputs,
                 digests: np.ndarray | None = None, name: str = "streamed inputs"):
        self.dataset, self.collate, self.unpack = dataset, collate, unpack
        self.rows, self.layout = rows, layout
        self.digests, self.name = digests, name
        self.key: Key | None = None  # of several inputs, the only one a read returns

    def _with(self, **changes: Any) -> StreamedInputs:
        """A copy with ``changes`` to its attributes (the dataset and digests shared)."""
        out = copy.copy(self)
        out.__dict__.update(changes)
        return out

    # ---- what the inputs are ---------------------------------------------------------
    @property
    def empty(self) -> torch.Tensor | Inputs:
        """What a read of no sample returns: a tensor or ``Inputs`` of zero rows."""
        return self.layout if self.key is None else self.layout.input(self.key)

    @property
    def several(self) -> bool:
        """Whether a read returns several inputs (an ``Inputs``)."""
        return isinstance(self.empty, Inputs)

    def _inputs(self) -> Inputs:
        if not self.several:
            raise TypeError("streamed inputs of one tensor have no keys")
        return self.empty

    @property
    def main_key(self) -> Key:
        return self._inputs().main_key

    def structure(self) -> tuple[int, tuple[str, ...]]:
        """How many positional inputs, and the keyword names in order."""
        return self._inputs().structure()

    def sample_shapes(self) -> dict[Key, tuple[int, ...]]:
        """The per-sample shape of every input, by key."""
        return self._inputs().sample_shapes()

    def describe(self) -> str:
        """Each input's per-sample shape and dtype, for messages."""
        return self._inputs().describe()

    def named(self) -> Iterator[tuple[Key, StreamedInputs]]:
        """``(key, inputs)`` of every input, each still unread: a read of one returns that
        input's tensor (and checks the whole sample, as any read does)."""
        for key, _ in self._inputs().named():
            yield key, self._with(key=key)

    @property
    def main(self) -> StreamedInputs:
        """The main input, still unread."""
        return self._with(key=self.main_key)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The per-sample shape of the (main) input."""
        return tuple(self.empty.shape[1:])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.sample_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def dim(self) -> int:
        return self.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.empty.dtype

    @property
    def device(self) -> torch.device:
        return self.empty.device

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        what = self.describe() if self.several else \
            f"sample_shape={self.sample_shape}, dtype={self.dtype}"
        return f"StreamedInputs(n={len(self)}, {what}, device={self.device})"

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    # ---- reading -----------------------------------------------------------------------
    def bound(self, device: torch.device, float_dtype: torch.dtype) -> StreamedInputs:
        """The same inputs read onto ``device``: floating point as ``float_dtype``, integer
        token ids (and masks) as int64 (what embeddings take), booleans as they are."""
        return self._with(layout=pytree.tree_map(
            lambda t: t.to(device, bound_dtype(t.dtype, float_dtype)), self.layout))

    def view(self, block: slice | Sequence[int] | torch.Tensor) -> StreamedInputs:
        """The rows ``block`` (a slice or sample indices), still unread."""
        if isinstance(block, slice):
            rows = self.rows[block]
        else:
            rows = [self.rows[i] for i in torch.as_tensor(block).reshape(-1).tolist()]
        return self._with(rows=rows)

    def __getitem__(self, index: Any) -> torch.Tensor | Inputs:
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
        return pytree.tree_map(lambda t: t.reshape(*idx.shape, *t.shape[1:]), rows)

    def cpu(self) -> torch.Tensor | Inputs:
        """Every input read in, on the CPU: what the pictures of ``iif show`` / ``explain`` /
        ``report`` draw from (the only reads of the whole set)."""
        log.info("reading all %d streamed inputs to draw them", len(self))
        return self[:].cpu()

    def chunks(self, size: int | None = None) -> Iterator[torch.Tensor | Inputs]:
        """The inputs in order, ``size`` (default ``READ_BATCH``) samples at a time."""
        size = size or READ_BATCH
        for lo in range(0, len(self), size):
            yield self[lo : lo + size]

    def _read(self, positions: list[int]) -> torch.Tensor | Inputs:
        parts = []
        for lo in range(0, len(positions), READ_BATCH):
            some = positions[lo : lo + READ_BATCH]
            batch = self.collate([self.dataset[p] for p in some])
            part = model_inputs(self.unpack(batch)[0], f"{self.name} inputs")
            self._check_unchanged(some, part)  # every input of the sample, whatever is kept
            parts.append(part if self.key is None else part.input(self.key))
        if not parts:
            return self.empty
        # each input as its layout says: on the device, in its dtype
        return pytree.tree_map(lambda t, like: t.to(like.device, like.dtype),
                               torch.cat(parts), self.empty)

    def check_again(self, positions: Sequence[int]) -> None:
        """Read the samples at dataset ``positions`` again and refuse any that changed since
        their first read."""
        self._read(list(positions))

    def _check_unchanged(self, positions: list[int], x: torch.Tensor | Inputs) -> None:
        """Refuse inputs ``x`` read for ``positions`` that differ from their first read."""
        if self.digests is None:
            return
        if not _fits(x, self.layout, len(positions)):
            raise InputError(f"{self.name}: samples {positions[0]}..{positions[-1]} read again "
                             f"gave inputs {_shapes(x)}, first read "
                             f"{_shapes(self.layout, len(positions))}; {CHANGED} and of one "
                             f"shape (pad every sample to one length, e.g. in collate_fn)")
        changed = np.flatnonzero(sample_digests(x) != self.digests[positions])
        if changed.size:
            raise InputError(f"{self.name}: sample {positions[changed[0]]} changed between two "
                             f"reads; {CHANGED}")


def bound_dtype(dtype: torch.dtype, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype an input of ``dtype`` reaches the model in: floating point as
    ``float_dtype``, booleans (masks) as they are, other integers (token ids, masks) as
    int64."""
    if dtype.is_floating_point:
        return float_dtype
    return dtype if dtype == torch.bool else torch.int64


def several_inputs(x: Any) -> bool:
    """Whether ``x`` holds several inputs per sample, held or streamed."""
    return isinstance(x, Inputs) or (isinstance(x, StreamedInputs) and x.several)


def _layout_of(x: torch.Tensor | Inputs) -> torch.Tensor | Inputs:
    """No sample of ``x``, on the CPU: every input's per-sample shape and dtype (holding
    nothing of the batch it comes from)."""
    return pytree.tree_map(lambda t: torch.empty((0, *t.shape[1:]), dtype=t.dtype), x)


def _fits(x: Any, layout: torch.Tensor | Inputs, n: int) -> bool:
    """Whether inputs ``x`` are ``n`` samples of ``layout``'s inputs and shapes."""
    if isinstance(layout, Inputs):
        return (isinstance(x, Inputs) and x.structure() == layout.structure()
                and len(x) == n and x.sample_shapes() == layout.sample_shapes())
    return (isinstance(x, torch.Tensor) and x.ndim > 0 and len(x) == n
            and x.shape[1:] == layout.shape[1:])


def _shapes(x: Any, n: int | None = None) -> str:
    """``of shape (4, 3)``, or ``input_ids (4, 6), attention_mask (4, 6)``: the shapes of
    inputs ``x`` (with ``n`` rows), for messages."""
    if isinstance(x, Inputs):
        return ", ".join(f"{_name(k)} {(len(x) if n is None else n, *s)}"
                         for k, s in x.sample_shapes().items())
    shape = tuple(getattr(x, "shape", ()))
    return f"of shape {shape if n is None else (n, *shape[1:])}"


def _name(key: Key) -> str:
    return key if isinstance(key, str) else f"input {key}"


def sample_digests(x: torch.Tensor | Inputs) -> np.ndarray:
    """A CRC-32 of the bytes of each sample (row) of ``x``, over every input of several in
    key order: what a streamed sample read again is compared by (exact, whatever the batch it
    is read in)."""
    tensors = x.tensors() if isinstance(x, Inputs) else [x]
    raws = [_row_bytes(t) for t in tensors]
    out = np.empty(len(x), dtype=np.uint32)
    for i in range(len(x)):
        crc = 0
        for raw in raws:
            crc = zlib.crc32(raw[i], crc)
        out[i] = crc
    return out


def _row_bytes(x: torch.Tensor) -> np.ndarray:
    """The bytes of each row of ``x``, (n, row bytes)."""
    rows = x.detach().cpu().contiguous().reshape(len(x), -1)
    return rows.view(torch.uint8).numpy() if rows.shape[1] else np.zeros((len(x), 0), np.uint8)


def take(x: torch.Tensor | StreamedInputs, block: slice | torch.Tensor
         ) -> torch.Tensor | StreamedInputs:
    """Rows ``block`` (a slice or indices) of the inputs: a tensor's rows, or a streamed
    view left unread."""
    if isinstance(x, StreamedInputs):
        return x if block == slice(None) else x.view(block)
    return x[block]


def as_pair(data: Any, name: str = "data", batch: BatchFn | None = None,
            label_key: str | None = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of ``data`` (see the module docstring); ``batch`` maps a
    collated batch of a Dataset or DataLoader (None: :func:`default_batch`, with
    ``label_key``). The inputs are a tensor, an :class:`~iif.task.inputs.Inputs` of several
    per sample, or :class:`StreamedInputs`."""
    if isinstance(data, torch.utils.data.TensorDataset):
        if len(data.tensors) < 2:
            raise InputError(f"{name}: a TensorDataset must hold a pair (inputs, labels), or "
                             f"(inputs..., labels) for several inputs")
        return joined_inputs(data.tensors[:-1]), data.tensors[-1]
    if isinstance(data, Data):
        return data.x, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        dropped: dict[str, str] = {}
        x = model_inputs(data[0], f"{name} inputs", dropped)
        _warn_dropped(dropped, name)
        return x, data[1]
    if isinstance(data, Streamed):
        inner = data.data
        loader = inner if isinstance(inner, DataLoader) else \
            DataLoader(inner, batch_size=READ_BATCH, shuffle=False)
        return _gather(loader, name, _unpacker(batch, label_key), stream=True)
    if isinstance(data, DataLoader):
        return _gather(data, name, _unpacker(batch, label_key))
    if isinstance(data, IterableDataset):
        raise InputError(f"{name} is an IterableDataset: scores index samples by position, "
                         f"so give a map-style Dataset (with __getitem__ and __len__)")
    if isinstance(data, Dataset):
        return _gather(DataLoader(data, batch_size=READ_BATCH, shuffle=False), name,
                       _unpacker(batch, label_key))
    raise InputError(f"{name} must be a pair (inputs, labels), a TensorDataset, a Dataset or "
                     f"a DataLoader; got {type(data).__name__}")


def _unpacker(batch: BatchFn | None, label_key: str | None) -> BatchFn:
    """The task's ``batch`` function, or :func:`default_batch` with ``label_key``."""
    if batch is not None:
        return batch
    return default_batch if label_key is None else \
        functools.partial(default_batch, label_key=label_key)


def _warn_dropped(dropped: dict[str, str], name: str) -> None:
    if dropped:
        entries = ", ".join(f"{k!r} ({t})" for k, t in dropped.items())
        log.warning("%s: the entries %s are not tensors and are not passed to the model",
                    name, entries)


def _gather(loader: DataLoader, name: str, unpack: BatchFn,
            stream: bool = False) -> tuple[Any, Any]:
    """Every batch of ``loader`` in order, mapped to (inputs, labels) by ``unpack``: the
    inputs concatenated, or :class:`StreamedInputs` when ``stream`` or too large to hold; the
    labels concatenated."""
    known = _check_order(loader, name)
    dropped: dict[str, str] = {}
    if unpack is default_batch or (isinstance(unpack, functools.partial)
                                   and unpack.func is default_batch):
        unpack = functools.partial(unpack, dropped=dropped)  # named once, after the loop
    xs, ys, digests, first, last = [], [], [], None, None
    for i, x, y in _batches(loader, name, unpack):
        if first is None:
            first = (x, y)
            stream = _streams(x, name, stream, len(loader.dataset))
        last = (x, y)
        if stream:
            _check_streamed_batch(x, first[0], f"{name} (batch {i})")
            digests.append(sample_digests(x))
        else:
            xs.append(x)
        ys.append(y)
    if first is None:
        raise InputError(f"{name} is empty: the loader yields no batch")
    _warn_dropped(dropped, name)
    y = _joined(ys, name)
    if not known:
        _check_yielded(loader, name, unpack, first, last, len(y))
    if not stream:
        return _joined(xs, name), y
    log.info("%s: %d samples are read from the dataset when needed, not held", name, len(y))
    x0 = first[0]
    inputs = StreamedInputs(loader.dataset, loader.collate_fn, unpack,
                            range(len(loader.dataset)), _layout_of(x0),
                            digests=np.concatenate(digests), name=name)
    if len(inputs) != len(y):
        raise InputError(f"{name}: the loader yields {len(y)} samples of the "
                         f"{len(inputs)} in its dataset; {IN_ORDER}")
    # read again at once, not only when first used: the first batch and the last sample
    inputs.check_again(range(len(x0)))
    inputs.check_again([len(inputs) - 1])
    return inputs, y


def _streams(x: torch.Tensor | Inputs, name: str, asked: bool, n: int) -> bool:
    """Whether inputs whose first batch is ``x`` are streamed: when ``asked`` or beyond
    ``IN_MEMORY_BYTES`` for ``n`` samples (every input of a sample counted)."""
    tensors = x.tensors() if isinstance(x, Inputs) else [x]
    return asked or sum(t[:1].nelement() * t.element_size() for t in tensors) * n > \
        IN_MEMORY_BYTES


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
        yield (i, model_inputs(x, f"{name} inputs (batch {i})"),
               to_tensor(y, f"{name} labels (batch {i})"))


def _joined(parts: list[torch.Tensor] | list[Inputs], name: str) -> torch.Tensor | Inputs:
    try:
        return Inputs.cat(parts) if isinstance(parts[0], Inputs) else torch.cat(parts)
    except RuntimeError as exc:
        raise InputError(f"{name}: batches of different per-sample shapes cannot be joined "
                         f"(pad every sample to one length, e.g. in collate_fn): {exc}") from exc


def _check_streamed_batch(x: torch.Tensor | Inputs, first: torch.Tensor | Inputs,
                          what: str) -> None:
    """What the task checks on gathered inputs, for one batch of streamed ones: the first
    batch's inputs, per-sample shapes and dtypes, and finite floating point values."""
    if _signature(x) != _signature(first):
        if isinstance(x, Inputs) or isinstance(first, Inputs):
            got, want = (v.describe() if isinstance(v, Inputs) else
                         f"one input {tuple(v.shape[1:])} {v.dtype}" for v in (x, first))
            raise InputError(f"{what}: inputs {got} after {want}; every sample needs the same "
                             f"inputs (pad every sample to one length, e.g. in collate_fn)")
        raise InputError(f"{what}: inputs of per-sample shape {tuple(x.shape[1:])} ({x.dtype}) "
                         f"after {tuple(first.shape[1:])} ({first.dtype}); pad every sample "
                         f"to one length, e.g. in collate_fn")
    named = x.named() if isinstance(x, Inputs) else [(None, x)]
    for key, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            which = "inputs contain" if key is None else f"input {key!r} contains"
            raise InputError(f"{what}: {which} NaN or inf")


def _signature(x: torch.Tensor | Inputs) -> tuple:
    """The inputs of a batch without its samples: keys, per-sample shapes and dtypes."""
    named = x.named() if isinstance(x, Inputs) else [(None, x)]
    return tuple((key, tuple(t.shape[1:]), t.dtype) for key, t in named)


def _check_order(loader: DataLoader, name: str) -> bool:
    """Refuse a loader that does not read samples 0..N-1 in order, each once, as far as its
    indices tell (no sample read). False when they do not tell what it yields (keys that are
    not positions, a one-shot sampler, a loader with its own ``__iter__``):
    :func:`_check_yielded` then looks at the batches."""
    if isinstance(loader.dataset, IterableDataset):
        raise InputError(f"{name} reads an IterableDataset: scores index samples by position, "
                         f"so give a map-style Dataset")
    n = len(loader.dataset)
    if loader.drop_last and n % (loader.batch_size or 1):
        raise InputError(f"{name}: the DataLoader drops its last incomplete batch "
                         f"(drop_last=True); every sample must be read: use drop_last=False")
    # a loader with its own __iter__ may yield other than its sampler says
    own_iter = type(loader).__iter__ is not DataLoader.__iter__
    if not (_plainly_in_order(loader, n) or _indices_in_order(loader, name, n)):
        return False
    return not own_iter


def _indices_in_order(loader: DataLoader, name: str, n: int) -> bool:
    """Read the loader's index stream (its batch_sampler, or its sampler when it does not
    batch) and refuse it unless it is 0..n-1 in order; False when it holds keys that are not
    positions, or is a one-shot iterator that reading here would use up."""
    stream = loader.sampler if loader.batch_sampler is None else loader.batch_sampler
    named = ("batch_sampler", stream) if loader.batch_sampler is not None and not (
        type(stream) is BatchSampler and stream.sampler is loader.sampler) else \
        ("sampler", loader.sampler)  # the sampler the user gave, or shuffle=True made
    what = f"{name}: the DataLoader's {named[0]} {_sampler_name(named[1])}"
    if _one_shot(stream):
        return False
    expected = 0
    try:
        for item in stream:
            keys = _positions(item)
            if keys is None:
                return False
            for key in keys:
                if expected == n:
                    raise InputError(f"{what} reads more than the {n} samples of its dataset; "
                                     f"{IN_ORDER}")
                if key != expected:
                    raise InputError(f"{what} reads sample {key} where sample {expected} "
                                     f"belongs; {IN_ORDER}")
                expected += 1
    except InputError:
        raise
    except Exception as exc:  # the user's sampler
        raise UserCodeError(f"reading the sample order of {name}", exc) from exc
    if expected != n:
        raise InputError(f"{what} reads {expected} of the {n} samples; {IN_ORDER}")
    return True


def _plainly_in_order(loader: DataLoader, n: int) -> bool:
    """Whether torch's own samplers read 0..n-1 in order: known without reading the stream
    (exact types only: a subclass may reorder)."""
    sampler = loader.sampler if loader.batch_sampler is None else loader.batch_sampler
    if type(sampler) is BatchSampler:
        if sampler.drop_last and n % sampler.batch_size:
            return False
        sampler = sampler.sampler
        if loader.batch_sampler is None:  # index lists to a dataset that takes them
            return False
    return type(sampler) is SequentialSampler and len(sampler) == n


def _one_shot(sampler: Any) -> bool:
    """Whether ``sampler`` (or the sampler a BatchSampler batches) is an iterator that can be
    read only once."""
    if isinstance(sampler, BatchSampler):
        return _one_shot(sampler.sampler)
    return isinstance(sampler, Iterator)


def _sampler_name(sampler: Any) -> str:
    """``"RandomSampler"``; ``"BatchSampler(RandomSampler)"`` for a batch sampler."""
    if isinstance(sampler, BatchSampler):
        return f"BatchSampler({_sampler_name(sampler.sampler)})"
    return type(sampler).__name__


def _positions(item: Any) -> list[int] | None:
    """The sample positions of one item of an index stream (an index or a list of them), or
    None when they are not integers."""
    if isinstance(item, torch.Tensor):
        item = item.numpy() if item.device.type == "cpu" else item.cpu().numpy()
    if isinstance(item, np.ndarray):
        return item.reshape(-1).tolist() if np.issubdtype(item.dtype, np.integer) else None
    if isinstance(item, (bool, np.bool_)):
        return None
    if isinstance(item, (int, np.integer)):
        return [int(item)]
    if isinstance(item, (list, tuple)):
        keys = [_positions(k) for k in item]
        if any(k is None or len(k) != 1 for k in keys):
            return None
        return [k[0] for k in keys]
    return None


def _check_yielded(loader: DataLoader, name: str, unpack: BatchFn,
                   first: tuple[torch.Tensor, torch.Tensor],
                   last: tuple[torch.Tensor, torch.Tensor], count: int) -> None:
    """For a loader whose indices do not tell its order: refuse unless it yields as many
    samples as its dataset holds and its first and last batches are the dataset's own
    samples at those positions."""
    n = len(loader.dataset)
    if count != n:
        raise InputError(f"{name}: the DataLoader yields {count} samples, its dataset holds "
                         f"{n}; {IN_ORDER}")
    collate = loader.collate_fn if loader.batch_sampler is not None else default_collate
    for where, (x, y), lo in (("first", first, 0), ("last", last, n - len(last[1]))):
        positions = range(lo, lo + len(y))
        try:
            want_x, want_y = unpack(collate([loader.dataset[p] for p in positions]))
            same = all(_same(a, b) for a, b in ((x, want_x), (y, want_y)))
        except Exception:  # a dataset that cannot be read by position at all
            same = False
        if not same:
            raise InputError(f"{name}: the DataLoader's {where} batch is not samples "
                             f"{positions[0]}..{positions[-1]} of its dataset read by position "
                             f"(or the dataset changes its samples between reads); {IN_ORDER}")


def _same(got: torch.Tensor | Inputs, want: Any) -> bool:
    if isinstance(got, Inputs) or isinstance(want, (Inputs, Mapping, tuple, list)):
        want = model_inputs(want, "inputs")
        if not (isinstance(got, Inputs) and isinstance(want, Inputs)):
            return isinstance(got, torch.Tensor) and _same(got, want)
        return got.structure() == want.structure() and all(
            _same(a, b) for a, b in zip(got.tensors(), want.tensors(), strict=True))
    want = torch.as_tensor(want)
    return got.shape == want.shape and torch.equal(got, want.to(got.dtype))


def to_tensor(value: Any, what: str) -> torch.Tensor | Inputs:
    """``value`` (a tensor, an array or nested numbers) as a tensor, or an InputError naming
    ``what`` when it is not numeric; inputs of several tensors stay so, detached."""
    if isinstance(value, (torch.Tensor, Inputs)):
        return value.detach()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{what} cannot be converted to an array: {exc}") from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{what} must be numeric, got an array of dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))
