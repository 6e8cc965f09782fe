"""Checkpoint recording: the same model as ``iif.train``, checkpoints after the right epochs,
and plain tensor files on disk that round-trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import iif
from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.methods.tracin.checkpoints import (
    INDEX_FILE,
    Checkpoint,
    checkpoint_file,
    load_checkpoints,
    save_checkpoint,
    train_with_checkpoints,
)
from iif.task.task import Recipe, Task

pytestmark = pytest.mark.usefixtures("single_thread")


def net(seed: int = 0, hidden: int = 6) -> nn.Module:
    """BatchNorm (buffers) and dropout (global RNG) make training sensitive to every seed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Dropout(0.3),
        nn.Linear(hidden, 2),
    ).double()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(20, 2, generator=gen, dtype=torch.float64)


def recipe(epochs: int = 5) -> Recipe:
    return Recipe(lr=0.05, epochs=epochs, batch_size=6, momentum=0.9)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- same training as iif.train ------------------------------------------------------------
@pytest.mark.parametrize("directory", [False, True])
def test_same_final_model_as_train(data, tmp_path, directory):
    reference, recorded = net(), net()
    iif.train(Task(reference, "regression", recipe()), data, seed=3)
    torch.manual_seed(123)  # the global RNG state must not matter: training seeds it
    checkpoints = train_with_checkpoints(Task(recorded, "regression", recipe()), data, seed=3,
                                         directory=tmp_path if directory else None, every=2)
    assert_same_state(recorded.state_dict(), reference.state_dict())
    assert not torch.equal(recorded[0].weight, net()[0].weight)  # it did train
    last = checkpoints[-1].load(FunctionalModel(recorded))
    assert checkpoints[-1].epoch == 5
    assert_same_state({**last.params, **last.buffers}, reference.state_dict())


def test_intermediate_checkpoint_equals_shorter_training(data):
    checkpoints = train_with_checkpoints(Task(net(), "regression", recipe()), data, seed=1)
    shorter = net()
    iif.train(Task(shorter, "regression", recipe()), data, epochs=2, seed=1)
    state = checkpoints[1].state
    assert checkpoints[1].epoch == 2
    assert_same_state({**state.params, **state.buffers}, shorter.state_dict())


@pytest.mark.parametrize(
    ("epochs", "every", "expected"),
    [(5, 1, [1, 2, 3, 4, 5]), (5, 2, [2, 4, 5]), (6, 3, [3, 6]), (5, 7, [5]), (0, 1, [0])],
)
def test_number_of_checkpoints_follows_every(data, epochs, every, expected):
    task = Task(net(), "regression", recipe())
    checkpoints = train_with_checkpoints(task, data, epochs=epochs, every=every)
    assert [c.epoch for c in checkpoints] == expected
    assert all(c.lr == 0.05 and c.path is None for c in checkpoints)
    flats = [c.state.flat() for c in checkpoints]
    assert all(not torch.equal(a, b) for a, b in zip(flats, flats[1:], strict=False))


# ---- on disk -------------------------------------------------------------------------------
def test_checkpoints_on_disk_round_trip(data, tmp_path):
    folder = tmp_path / "run"
    model = net()
    on_disk = train_with_checkpoints(Task(model, "regression", recipe()), data, every=2,
                                     directory=folder)
    in_memory = train_with_checkpoints(Task(net(), "regression", recipe()), data, every=2)
    names = [checkpoint_file(e) for e in (2, 4, 5)]
    assert sorted(p.name for p in folder.iterdir()) == [INDEX_FILE, *names]  # no temp files
    assert [c.path for c in on_disk] == [folder / n for n in names]
    assert all(c.state is None for c in on_disk)
    index = json.loads((folder / INDEX_FILE).read_text())
    assert [(e["epoch"], e["lr"], e["file"]) for e in index["checkpoints"]] == [
        (2, 0.05, names[0]), (4, 0.05, names[1]), (5, 0.05, names[2])]

    loaded = load_checkpoints(folder)
    assert [(c.epoch, c.lr, c.path) for c in loaded] == [(c.epoch, c.lr, c.path) for c in on_disk]
    fmodel = FunctionalModel(model)
    for disk, memory in zip(loaded, in_memory, strict=True):
        state = disk.load(fmodel)
        assert_same_state(state.params, memory.state.params)
        assert_same_state(state.buffers, memory.state.buffers)
        raw = torch.load(disk.path, weights_only=True)  # plain tensors, no pickled objects
        assert set(raw) == {"params", "buffers"}
        assert "1.running_mean" in raw["buffers"]


def test_load_checkpoints_sorts_by_epoch(data, tmp_path):
    train_with_checkpoints(Task(net(), "regression", recipe(3)), data, directory=tmp_path)
    index_path = tmp_path / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["checkpoints"].reverse()
    index_path.write_text(json.dumps(index))
    assert [c.epoch for c in load_checkpoints(tmp_path)] == [1, 2, 3]


def test_flat_state_dict_and_other_dtype_load(tmp_path):
    model = net(seed=4)
    path = tmp_path / "flat.pt"
    torch.save(copy.deepcopy(model).float().state_dict(), path)  # float32, flat
    state = Checkpoint(3, 0.1, path=path).load(FunctionalModel(net(seed=5)))
    for name, value in model.state_dict().items():
        got = {**state.params, **state.buffers}[name]
        assert got.dtype == value.dtype
        torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-6)


def test_save_checkpoint_writes_plain_tensors(tmp_path):
    fmodel = FunctionalModel(net())
    path = save_checkpoint(fmodel.state(), tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    raw = torch.load(path, weights_only=True)
    assert_same_state(raw["params"], fmodel.state().params)


# ---- bad inputs ----------------------------------------------------------------------------
def test_bad_inputs_raise_input_errors(data, tmp_path):
    task = Task(net(), "regression", recipe())
    with pytest.raises(InputError, match="every must be an integer >= 1"):
        train_with_checkpoints(task, data, every=0)
    with pytest.raises(InputError, match="epochs must be an integer >= 0"):
        train_with_checkpoints(task, data, epochs=-1)
    with pytest.raises(InputError, match=f"holds no {INDEX_FILE}"):
        load_checkpoints(tmp_path)
    state = FunctionalModel(task.model).state()
    with pytest.raises(InputError, match="exactly one of state"):
        Checkpoint(1, 0.1)
    with pytest.raises(InputError, match="exactly one of state"):
        Checkpoint(1, 0.1, state=state, path=tmp_path / "a.pt")
    with pytest.raises(InputError, match="lr must be positive"):
        Checkpoint(1, 0.0, state=state)
    with pytest.raises(InputError, match="no such file"):
        Checkpoint(1, 0.1, path=tmp_path / "missing.pt").load(FunctionalModel(task.model))
    wide = Checkpoint(1, 0.1, state=FunctionalModel(net(hidden=7)).state())
    with pytest.raises(InputError, match=r"'0.weight' has shape \(7, 3\)"):
        wide.load(FunctionalModel(task.model))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        Checkpoint(1, 0.1, path=tmp_path / "junk.pt").load(FunctionalModel(task.model))


# ---- the index: each checkpoint once, and only files of its own folder ------------------------
def _rewrite_index(folder, files: list[str]) -> None:
    """List ``files`` in the index of ``folder``, as epochs 1, 2, ..."""
    entries = [{"epoch": i + 1, "lr": 0.05, "file": f} for i, f in enumerate(files)]
    (folder / INDEX_FILE).write_text(json.dumps({"format": 1, "checkpoints": entries}))


def test_an_index_listing_a_checkpoint_twice_is_refused(data, tmp_path):
    folder = tmp_path / "run"
    train_with_checkpoints(Task(net(), "regression", recipe(2)), data, directory=folder)
    (folder / "alias.pt").symlink_to(folder / "epoch_0001.pt")
    for twice in ("epoch_0001.pt", "./epoch_0001.pt", "alias.pt"):
        _rewrite_index(folder, ["epoch_0001.pt", "epoch_0002.pt", twice])
        with pytest.raises(InputError, match=rf"{INDEX_FILE}: entry '{twice}' \(epoch 3\) names "
                                             rf"the same file as entry 'epoch_0001.pt' "
                                             rf"\(epoch 1\)"):
            load_checkpoints(folder)
    _rewrite_index(folder, ["epoch_0002.pt", "epoch_0001.pt"])
    assert [c.path.name for c in load_checkpoints(folder)] == ["epoch_0002.pt", "epoch_0001.pt"]


def test_an_index_naming_a_file_outside_its_folder_is_refused(data, tmp_path):
    folder = tmp_path / "run"
    train_with_checkpoints(Task(net(), "regression", recipe(1)), data, directory=folder)
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes((folder / "epoch_0001.pt").read_bytes())
    (folder / "link.pt").symlink_to(outside)
    for entry in ("../elsewhere.pt", str(outside), "link.pt"):
        _rewrite_index(folder, [entry])
        with pytest.raises(InputError, match=rf"{INDEX_FILE}: entry '{entry}' is outside the "
                                             rf"checkpoint folder"):
            load_checkpoints(folder)
