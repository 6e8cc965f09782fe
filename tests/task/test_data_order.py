"""Scores index training samples by position: a loader is accepted only when what it yields is
samples 0..N-1 of its dataset in order, each once, and a streamed dataset must give the same
sample every time the same index is read."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

from iif.errors import InputError
from iif.task.data import Streamed


class Pairs(Dataset):
    """A map-style dataset of (x, y) pairs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Batched(Pairs):
    """A dataset read a list of indices at a time (a loader with auto-collation off)."""

    def __getitem__(self, index):
        index = torch.as_tensor(index)
        return self.x[index], self.y[index]


class InOrder:
    """A batch sampler of its own that yields [0..3], [4..7], ...: the samples in order."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __iter__(self):
        return (list(range(lo, min(lo + self.size, self.n))) for lo in range(0, self.n, self.size))

    def __len__(self) -> int:
        return -(-self.n // self.size)


def _accepted_loaders(x, y):
    n = len(x)
    return {
        "shuffle=False": DataLoader(Pairs(x, y), batch_size=5, shuffle=False),
        "batch of one": DataLoader(Pairs(x, y), batch_size=1),
        "SequentialSampler": DataLoader(Pairs(x, y), batch_size=4,
                                        sampler=SequentialSampler(range(n))),
        "custom sampler in order": DataLoader(Pairs(x, y), batch_size=4, sampler=list(range(n))),
        "one-shot sampler in order": DataLoader(Pairs(x, y), batch_size=4, sampler=iter(range(n))),
        "batch_sampler in order": DataLoader(Pairs(x, y), batch_sampler=InOrder(n, 4)),
        "sampler of index lists in order": DataLoader(
            Batched(x, y), batch_size=None,
            sampler=BatchSampler(SequentialSampler(range(n)), 4, False)),
    }


@pytest.mark.parametrize("kind", list(_accepted_loaders(torch.zeros(1, 1), torch.zeros(1))))
def test_loaders_that_read_every_sample_in_order_are_accepted(classification_task,
                                                              classification_data, kind):
    x, y = classification_data
    data = classification_task.validate(_accepted_loaders(x, y)[kind], "training data")
    torch.testing.assert_close(data.x, x, rtol=0, atol=0)
    torch.testing.assert_close(data.labels, y, rtol=0, atol=0)


class Skipping:
    """In order, but every other sample."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self) -> int:
        return len(range(0, self.n, 2))


SHUFFLED = r"reads sample \d+ where sample \d+ belongs"  # which one: as the shuffle fell


def _refused_loaders(x, y):
    n = len(x)
    return {
        "shuffling batch_sampler": (
            DataLoader(Pairs(x, y), batch_sampler=BatchSampler(RandomSampler(range(n)), 4, False)),
            rf"batch_sampler BatchSampler\(RandomSampler\) {SHUFFLED}"),
        "shuffled index lists": (
            DataLoader(Batched(x, y), batch_size=None,
                       sampler=BatchSampler(RandomSampler(range(n)), 4, False)),
            rf"sampler BatchSampler\(RandomSampler\) {SHUFFLED}"),
        "shuffle=True": (DataLoader(Pairs(x, y), batch_size=4, shuffle=True),
                         rf"sampler RandomSampler {SHUFFLED}"),
        "skipping sampler": (DataLoader(Pairs(x, y), batch_size=4, sampler=Skipping(n)),
                             "sampler Skipping reads sample 2 where sample 1 belongs"),
        "repeating sampler": (DataLoader(Pairs(x, y), batch_size=4,
                                         sampler=[0, 1, 1, *range(2, n)]),
                              "sampler list reads sample 1 where sample 2 belongs"),
        "short sampler": (DataLoader(Pairs(x, y), batch_size=4,
                                     sampler=SequentialSampler(range(n - 3))),
                          f"sampler SequentialSampler reads {n - 3} of the {n} samples"),
        "batch_sampler dropping the last batch": (
            DataLoader(Pairs(x, y), batch_sampler=BatchSampler(SequentialSampler(range(n)), 5,
                                                               drop_last=True)),
            rf"batch_sampler BatchSampler\(SequentialSampler\) reads {n - n % 5} of the {n} "),
        "long sampler": (DataLoader(Pairs(x, y), batch_size=4, sampler=[*range(n), 0]),
                         f"sampler list reads more than the {n} samples of its dataset"),
    }


@pytest.mark.parametrize("kind", list(_refused_loaders(torch.zeros(1, 1), torch.zeros(1))))
def test_loaders_that_reorder_skip_or_repeat_samples_are_refused(classification_task,
                                                                 classification_data, kind):
    loader, problem = _refused_loaders(*classification_data)[kind]
    with pytest.raises(InputError) as info:
        classification_task.validate(loader, "training data")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("training data: the DataLoader's ")
    assert "shuffle=False" in message and "pass the Dataset" in message
    assert re.search(problem, message), message


class Reversed(DataLoader):
    """A loader whose own ``__iter__`` yields its batches last to first: its sampler says
    nothing about what it yields."""

    def __iter__(self):
        return iter(list(super().__iter__())[::-1])


class Plain(DataLoader):
    """A loader subclass that yields what a DataLoader yields."""

    def __iter__(self):
        return super().__iter__()


def test_a_loader_whose_order_cannot_be_read_is_checked_on_what_it_yields(
        classification_task, classification_data):
    x, y = classification_data
    with pytest.raises(InputError) as info:
        classification_task.validate(Reversed(Pairs(x, y), batch_size=5), "training data")
    message = str(info.value)
    assert message.startswith("training data: the DataLoader's first batch is not samples 0..")
    assert "\n" not in message and "shuffle=False" in message
    data = classification_task.validate(Plain(Pairs(x, y), batch_size=5), "training data")
    torch.testing.assert_close(data.x, x, rtol=0, atol=0)


# ---- streamed datasets that change their samples ---------------------------------------------
class ChangesOnSecondRead(Pairs):
    """Sample ``late`` is different from its second read on."""

    def __init__(self, x, y, late: int):
        super().__init__(x, y)
        self.late, self.reads = late, 0

    def __getitem__(self, i):
        if i == self.late:
            self.reads += 1
            if self.reads > 1:
                return self.x[i] + 1.0, self.y[i]
        return super().__getitem__(i)


def test_a_streamed_sample_that_changes_after_the_first_batch_is_refused(
        classification_task, classification_data):
    x, y = classification_data
    late = len(x) - 2
    data = classification_task.validate(
        Streamed(DataLoader(ChangesOnSecondRead(x, y, late), batch_size=4)), "training data")
    torch.testing.assert_close(data.x[:late], x[:late].to(data.x.dtype), rtol=0, atol=0)
    with pytest.raises(InputError) as info:
        data.x[:]
    assert str(info.value) == (
        f"training data: sample {late} changed between two reads; a dataset read by streaming "
        f"must return the same sample for the same index (no random augmentation)")


def test_the_first_batch_read_again_is_named_the_same_way(classification_task,
                                                          classification_data):
    x, y = classification_data
    with pytest.raises(InputError) as info:
        classification_task.validate(Streamed(ChangesOnSecondRead(x, y, 1)), "training data")
    assert str(info.value).startswith("training data: sample 1 changed between two reads; ")
