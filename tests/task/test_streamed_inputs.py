"""Samples with several inputs stream as one input does: a read gives an ``Inputs`` of those
samples, the scores and the run key are those of the same data held in memory, no read takes
the whole set, and a sample whose inputs change between reads is refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from iif import TRAK, InfluenceFunction, IntegratedInfluence, PathSettings, ProjectionSettings
from iif.errors import InputError
from iif.results.runkey import data_digest, method_key, tensor_digest
from iif.task.data import CHANGED, Streamed, StreamedInputs
from iif.task.inputs import Inputs
from iif.task.task import Recipe, Task

N, T, VOCAB = 40, 5, 9


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny float64 models: threads only add contention."""


class Texts(Dataset):
    """Token ids padded to one length with their attention mask, as a tokenizer gives them."""

    def __init__(self, n: int = N, seed: int = 3):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=gen)
        self.mask = torch.ones(n, T, dtype=torch.long)
        for i in range(n):
            self.mask[i, T - i % 3:] = 0  # 0, 1 or 2 padded positions
        self.ids[self.mask == 0] = 0
        self.y = (self.ids[:, 0] > VOCAB // 2).long() + (self.ids[:, 1] > 6).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


class MaskedMean(nn.Module):
    """Embedded tokens averaged under the attention mask, then a linear head."""

    def __init__(self, out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 4).double(), nn.Linear(4, out).double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask[..., None].to(self.head.weight.dtype)
        return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1))


class Pieces(Dataset):
    """Tuple samples ``(x1, x2, y)`` of two float inputs."""

    def __init__(self, n: int = N, seed: int = 4):
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        self.b = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        self.y = (self.a[:, 0] + self.b[:, 1] > 0).long() + (self.b[:, 2] > 0.5).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.a[i], self.b[i], self.y[i]


class Halves(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin1, self.lin2 = nn.Linear(5, 4).double(), nn.Linear(4, 3).double()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(torch.cat([a, b], dim=-1))))


RECIPE = Recipe(lr=0.1, epochs=2, batch_size=8)
METHODS = {
    "if": lambda task, train: InfluenceFunction(task, train, chunk_size=16, progress=False),
    "trak": lambda task, train: TRAK(task, train, chunk_size=16, progress=False,
                                     projection=ProjectionSettings(dim=8)),
    "iif": lambda task, train: IntegratedInfluence(task, train, chunk_size=16, progress=False,
                                                   path=PathSettings(steps=2)),
}


def _same(a: Inputs, b: Inputs) -> None:
    assert a.structure() == b.structure()
    for (ka, ta), (kb, tb) in zip(a.named(), b.named(), strict=True):
        assert ka == kb and ta.dtype == tb.dtype and torch.equal(ta, tb), ka


# ---- the scores ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_streamed_several_inputs_give_the_scores_of_held_ones(name, form, reads):
    make = METHODS[name]
    if form == "dict":
        task = Task(MaskedMean(), "classification", RECIPE)
        train, test = Texts(), DataLoader(Texts(3, seed=9), batch_size=2)
    else:
        task = Task(Halves(), "classification", RECIPE)
        train, test = Pieces(), DataLoader(Pieces(3, seed=9), batch_size=2)
    held = make(task, DataLoader(train, batch_size=8))
    want = held.attribute(test).scores
    reads.clear()
    method = make(task, Streamed(DataLoader(train, batch_size=8)))
    got = method.attribute(test).scores
    assert isinstance(method.train.x, StreamedInputs) and method.train.x.several
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
    assert reads and max(reads) < N  # never the whole training set at once
    assert method_key(method).parts["training data"] == method_key(held).parts["training data"]


# ---- what a streamed object is -----------------------------------------------------------------
def test_indexing_reads_every_input_alike():
    data = Texts(12)
    data.mask = data.mask.int()  # int32: read as int64, as held masks are
    task = Task(MaskedMean(), "classification")
    held = task.validate(DataLoader(data, batch_size=5)).x
    x = task.validate(Streamed(DataLoader(data, batch_size=5))).x
    assert isinstance(x, StreamedInputs) and isinstance(held, Inputs)
    assert len(x) == 12 and x.shape == held.shape == (12, T) and x.ndim == 2
    assert x.dtype == torch.int64 and not x.is_floating_point() and x.main_key == "input_ids"
    assert x.structure() == held.structure() and x.sample_shapes() == held.sample_shapes()
    assert x.describe() == held.describe() == f"input_ids ({T},) int64, attention_mask ({T},) int64"
    for index in (slice(2, 7), 3, torch.tensor([4, 0, 2]), torch.tensor([[1, 2], [11, 0]])):
        got = x[index]
        assert isinstance(got, Inputs)
        _same(got, held[index])
    _same(x.view(torch.tensor([5, 1]))[:], held[torch.tensor([5, 1])])
    _same(torch.cat(list(x.chunks(5))), held)
    _same(x.cpu(), held)
    keyed = dict(x.named())
    assert torch.equal(keyed["attention_mask"][:], held.kwargs["attention_mask"])
    assert torch.equal(x.main[[0, 3]], held.kwargs["input_ids"][[0, 3]])


def test_bound_inputs_take_the_dtypes_of_held_ones():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 2, generator=gen), torch.randint(0, 3, (6, 3), dtype=torch.int32)
    mask, y = torch.rand(6, 3, generator=gen) > 0.5, torch.arange(6) % 3

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, a, b, mask):
            return self.lin(torch.cat([a, (b * mask).to(a.dtype)], -1))

    task = Task(Three(), "classification")
    tuples = torch.utils.data.TensorDataset(a, b, mask, y)
    held = task.validate(tuples).x
    streamed = task.validate(Streamed(tuples)).x
    assert [t.dtype for t in held.tensors()] == [torch.float64, torch.int64, torch.bool]
    _same(streamed[:], held)


def test_the_checks_of_held_inputs_hold_for_streamed_ones(reads):
    task = Task(MaskedMean(), "classification")
    train = task.validate(Streamed(DataLoader(Texts(), batch_size=8)), "training data")
    other = Texts(3)
    short = {"input_ids": other.ids[:, :3], "attention_mask": other.mask[:, :3]}
    with pytest.raises(InputError, match=r"test data inputs are input_ids \(3,\), attention_mask "
                                         r"\(3,\), the training inputs input_ids \(5,\)"):
        task.validate((short, other.y), "test data", like=train)

    class Extra(Texts):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "token_type_ids": torch.zeros(T, dtype=torch.long)}

    with pytest.raises(InputError, match="'token_type_ids', which MaskedMean.forward does not"):
        task.validate(Streamed(DataLoader(Extra(), batch_size=8)))

    class NaNs(Pieces):
        def __getitem__(self, i):
            a, b, y = super().__getitem__(i)
            return a, b * float("nan") if i == 30 else b, y

    with pytest.raises(InputError, match=r"training data \(batch 3\): input 1 contains NaN"):
        Task(Halves(), "classification").validate(Streamed(DataLoader(NaNs(), batch_size=8)),
                                                  "training data")


class Tokens(nn.Module):
    """A next-token model: (n, T, V) logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.head = nn.Embedding(VOCAB, 4).double(), nn.Linear(4, VOCAB).double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids) * attention_mask[..., None])


def test_labels_equal_to_the_ids_are_refused_batch_by_batch(reads):
    from iif import causal_lm_labels

    data = Texts()
    data.y = data.ids.clone()
    reads.clear()
    with pytest.raises(InputError, match="the labels equal the input ids"):
        Task(Tokens(), "sequence").validate(Streamed(DataLoader(data, batch_size=8)))
    assert reads and max(reads) < N
    data.y = causal_lm_labels(data.ids, data.mask)
    got = Task(Tokens(), "sequence").validate(Streamed(DataLoader(data, batch_size=8)))
    assert isinstance(got.x, StreamedInputs) and torch.equal(got.labels, data.y)


# ---- samples that change ---------------------------------------------------------------------
class MaskChangesOnSecondRead(Texts):
    """Sample ``late``'s mask differs from its second read on (``grow``: it gets longer)."""

    def __init__(self, late: int, grow: bool = False):
        super().__init__()
        self.late, self.grow, self.reads = late, grow, 0

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == self.late:
            self.reads += 1
            if self.reads > 1:
                mask = item["attention_mask"].clone()
                mask[0] = 1 - mask[0]
                if self.grow:
                    mask = torch.cat([mask, mask[:1]])
                item = {**item, "attention_mask": mask}
        return item


def test_a_mask_that_changes_between_reads_is_refused():
    task = Task(MaskedMean(), "classification")
    late = N - 5
    data = task.validate(Streamed(DataLoader(MaskChangesOnSecondRead(late), batch_size=8)),
                         "training data")
    _same(data.x[:late], task.validate(DataLoader(Texts(), batch_size=8)).x[:late])
    with pytest.raises(InputError) as info:
        data.x[:]
    assert str(info.value) == f"training data: sample {late} changed between two reads; {CHANGED}"
    # the first batch is read again at once
    with pytest.raises(InputError) as info:
        task.validate(Streamed(MaskChangesOnSecondRead(1)), "training data")
    assert str(info.value) == f"training data: sample 1 changed between two reads; {CHANGED}"


def test_a_mask_whose_shape_changes_between_reads_is_refused_in_one_line():
    task = Task(MaskedMean(), "classification")
    data = task.validate(Streamed(DataLoader(MaskChangesOnSecondRead(N - 2, grow=True),
                                             batch_size=8)), "training data")
    with pytest.raises(InputError) as info:
        data.x[N - 2]
    message = str(info.value)
    assert message.startswith(f"training data: samples {N - 2}..{N - 2} read again gave inputs "
                              f"input_ids (1, {T}), attention_mask (1, {T + 1}), first read "
                              f"input_ids (1, {T}), attention_mask (1, {T}); {CHANGED}")
    assert "\n" not in message and "pad every sample" in message


# ---- the run key -----------------------------------------------------------------------------
def test_the_digest_of_streamed_inputs_is_that_of_held_ones(reads):
    task = Task(MaskedMean(), "classification")
    held = task.validate(DataLoader(Texts(), batch_size=8))
    streamed = task.validate(Streamed(DataLoader(Texts(), batch_size=8)))
    reads.clear()
    assert tensor_digest([streamed.x]) == tensor_digest([held.x])
    assert reads and max(reads) < N
    assert data_digest(streamed) == data_digest(held)
    one_mask = Texts()
    one_mask.mask[7, 0] = 1 - one_mask.mask[7, 0]
    changed = task.validate(Streamed(DataLoader(one_mask, batch_size=8)))
    assert tensor_digest([changed.x]) != tensor_digest([streamed.x])
    assert tensor_digest([changed.x]) == tensor_digest(
        [task.validate(DataLoader(one_mask, batch_size=8)).x])
    pieces = Task(Halves(), "classification")
    assert data_digest(pieces.validate(Streamed(Pieces()))) == data_digest(
        pieces.validate(Pieces()))


# ---- large data --------------------------------------------------------------------------------
def test_large_several_inputs_stream_without_asking(monkeypatch, caplog):
    import iif.task.data

    monkeypatch.setattr(iif.task.data, "IN_MEMORY_BYTES", 8 * 2 * T * 8)  # 8 samples
    task = Task(MaskedMean(), "classification")
    with caplog.at_level(logging.WARNING):
        data = task.validate(DataLoader(Texts(), batch_size=8))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert isinstance(data.x, StreamedInputs) and data.x.several
    _same(data.x[:], Inputs(kwargs={"input_ids": Texts().ids, "attention_mask": Texts().mask}))
    # test data are always read in
    assert isinstance(task.validate(DataLoader(Texts(), batch_size=8), stream=False).x, Inputs)
