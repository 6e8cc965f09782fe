"""Data as users hold it: Datasets and DataLoaders give the same data, and the same scores,
as tensors; loaders that reorder or drop samples are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from iif import InfluenceFunction, IntegratedInfluence
from iif.errors import InputError, UserCodeError


class Pairs(Dataset):
    """A map-style dataset of (x, y) pairs, as a user writes one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fail_at: int | None = None):
        self.x, self.y, self.fail_at = x, y, fail_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise KeyError(f"sample {i} is missing")
        return self.x[i], self.y[i]


class Records(Pairs):
    """Dictionary samples under other keys."""

    def __getitem__(self, i: int):
        return {"pixels": self.x[i], "class": self.y[i], "id": i}


def test_a_dataset_and_a_loader_give_the_tensors(classification_task, classification_data):
    x, y = classification_data
    want = classification_task.validate((x, y))
    for data in (Pairs(x, y), DataLoader(Pairs(x, y), batch_size=5),
                 DataLoader(TensorDataset(x, y), batch_size=4)):
        got = classification_task.validate(data)
        torch.testing.assert_close(got.x, want.x, rtol=0, atol=0)
        torch.testing.assert_close(got.targets, want.targets, rtol=0, atol=0)


def test_dictionary_batches_by_default_keys(classification_task, classification_data):
    x, y = classification_data

    def collate(items):
        return {"inputs": torch.stack([a for a, _ in items]),
                "labels": torch.stack([b for _, b in items])}

    got = classification_task.validate(DataLoader(Pairs(x, y), batch_size=5, collate_fn=collate))
    torch.testing.assert_close(got.x, x)
    with pytest.raises(InputError, match="input key"):
        classification_task.validate(Records(x, y))


def test_a_batch_function_maps_other_batches(classification_task, classification_data):
    x, y = classification_data
    task = classification_task
    task.batch = lambda b: (b["pixels"], b["class"])
    got = task.validate(DataLoader(Records(x, y), batch_size=7))
    torch.testing.assert_close(got.x, x)
    torch.testing.assert_close(got.labels, y)


@pytest.mark.parametrize("make, match", [
    (lambda d: DataLoader(d, batch_size=4, shuffle=True), "RandomSampler"),
    (lambda d: DataLoader(d, batch_size=5, drop_last=True), "drop_last"),
])
def test_loaders_that_reorder_or_drop_samples_are_refused(classification_task,
                                                         classification_data, make, match):
    with pytest.raises(InputError, match=match):
        classification_task.validate(make(Pairs(*classification_data)))


def test_iterable_datasets_and_failing_samples_are_named(classification_task,
                                                        classification_data):
    x, y = classification_data

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    with pytest.raises(InputError, match="map-style"):
        classification_task.validate(Stream())
    with pytest.raises(UserCodeError, match="batch 1 of training data.*KeyError"):
        classification_task.validate(DataLoader(Pairs(x, y, fail_at=6), batch_size=5),
                                     "training data")
    with pytest.raises(InputError, match="Dataset or a DataLoader"):
        classification_task.validate("data.csv")


@pytest.mark.parametrize("method", [IntegratedInfluence, InfluenceFunction])
def test_scores_from_loaders_equal_scores_from_tensors(classification_task,
                                                       classification_data, method):
    x, y = classification_data
    a = method(classification_task, (x, y), progress=False).attribute((x[:2], y[:2]))
    b = method(classification_task, DataLoader(Pairs(x, y), batch_size=5),
               progress=False).attribute(Pairs(x[:2], y[:2]))
    assert np.abs(a.scores).max() > 0
    np.testing.assert_array_equal(a.scores, b.scores)
