"""Data as users hold it: Datasets and DataLoaders give the same data, and the same scores,
as tensors; loaders that reorder or drop samples are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from iif import TRAK, InfluenceFunction, IntegratedInfluence, ProjectionSettings
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


# ---- streamed inputs ------------------------------------------------------------------------
def _bigger_problem():
    """60 samples: more than a chunk of 16, so that every method reads in parts."""
    from conftest import build_mlp

    from iif import Recipe, Task, train

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    task = Task(build_mlp(out_dim=3, seed=6), "classification", Recipe(lr=0.1, epochs=3,
                                                                        batch_size=8))
    train(task, (x, y), seed=0)
    return task, x, y


@pytest.mark.parametrize("name, make", [
    ("iif", lambda t, d: IntegratedInfluence(t, d, chunk_size=16, progress=False)),
    ("if projected", lambda t, d: InfluenceFunction(t, d, chunk_size=16, progress=False,
                                                    projection=ProjectionSettings(dim=8))),
    ("if exact", lambda t, d: InfluenceFunction(t, d, chunk_size=16, progress=False)),
    ("trak", lambda t, d: TRAK(t, d, chunk_size=16, progress=False,
                               projection=ProjectionSettings(dim=8))),
])
def test_streamed_training_data_give_the_same_scores_in_parts(name, make, reads):
    from iif.task.data import Streamed

    task, x, y = _bigger_problem()
    test = (x[:3] + 0.1, y[:3])
    want = make(task, (x, y)).attribute(test).scores
    reads.clear()
    method = make(task, Streamed(Pairs(x, y)))
    got = method.attribute(test).scores
    np.testing.assert_array_equal(got, want)
    assert reads and max(reads) < len(x)  # never the whole training set at once
    from iif.results.runkey import method_key

    assert method_key(method).parts["training data"] == \
        method_key(make(task, (x, y))).parts["training data"]


def test_streamed_training_trains_the_same_model(reads):
    from iif import train
    from iif.task.data import Streamed

    task, x, y = _bigger_problem()
    a, b = copy.deepcopy(task), copy.deepcopy(task)
    train(a, (x, y), seed=1)
    reads.clear()
    train(b, Streamed(DataLoader(Pairs(x, y), batch_size=7)), seed=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert reads and max(reads) <= 8


def test_a_dataset_that_changes_its_samples_cannot_be_streamed(classification_task,
                                                              classification_data):
    from iif.task.data import Streamed

    x, y = classification_data

    class Augmented(Pairs):
        def __getitem__(self, i):
            return self.x[i] + 0.01 * torch.randn(self.x.shape[1], dtype=self.x.dtype), self.y[i]

    with pytest.raises(InputError, match="same sample for the same index"):
        classification_task.validate(Streamed(Augmented(x, y)))


def test_large_inputs_are_streamed_without_asking(classification_task, classification_data,
                                                  monkeypatch):
    import iif.task.data
    from iif.task.data import StreamedInputs

    x, y = classification_data
    monkeypatch.setattr(iif.task.data, "IN_MEMORY_BYTES", 8 * x.shape[1] * 4)
    data = classification_task.validate(Pairs(x, y))
    assert isinstance(data.x, StreamedInputs)
    torch.testing.assert_close(data.x[:], x, rtol=0, atol=0)
    # test data are always read in
    assert isinstance(classification_task.validate(Pairs(x, y), stream=False).x, torch.Tensor)


def test_checkpoints_tracin_and_retraining_stream_too(reads):
    from iif import TracIn
    from iif.evaluation.retrain import train_batch, train_one
    from iif.methods.tracin.checkpoints import train_with_checkpoints
    from iif.task.data import Streamed

    task, x, y = _bigger_problem()
    streamed = Streamed(Pairs(x, y))
    checkpoints = train_with_checkpoints(copy.deepcopy(task), streamed, every=1, seed=0)
    test = (x[:2], y[:2])
    a = TracIn(task, (x, y), checkpoints=checkpoints, chunk_size=16,
               progress=False).attribute(test).scores
    b = TracIn(task, streamed, checkpoints=checkpoints, chunk_size=16,
               progress=False).attribute(test).scores
    np.testing.assert_array_equal(a, b)
    masks = np.zeros((3, len(x)), bool)
    for row, order in zip(masks, np.random.default_rng(0).permuted(
            np.tile(np.arange(len(x)), (3, 1)), axis=1), strict=True):
        row[order[:30]] = True
    want, got = train_batch(task, (x, y), masks, [0, 1, 2]), train_batch(task, streamed, masks,
                                                                         [0, 1, 2])
    for name in want.params:
        torch.testing.assert_close(got.params[name], want.params[name], rtol=0, atol=0)
    one, other = train_one(task, (x, y), masks[0], 0), train_one(task, streamed, masks[0], 0)
    for p, q in zip(one.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert max(reads) < len(x)
