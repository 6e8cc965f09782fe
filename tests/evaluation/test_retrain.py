"""Batched retraining for the LDS ground truth: equivalence with one-by-one training, the
on-disk cache (reuse, keys, resuming) and divergence handling."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from iif.engine.functional import FunctionalModel
from iif.engine.stacked import StackedState
from iif.errors import InputError
from iif.evaluation import lds, random_subsets
from iif.evaluation import retrain as rt
from iif.evaluation.retrain import (
    GroundTruth,
    RetrainDiverged,
    RetrainSettings,
    cache_key,
    ground_truth,
    model_seed,
    train_batch,
    train_one,
)
from iif.task.task import Recipe, Task

N_TRAIN, N_TEST, N_CLASSES = 16, 5, 3


def _data(n: int, seed: int, classes: int = N_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


@pytest.fixture
def train_data():
    return _data(N_TRAIN, 10)


@pytest.fixture
def test_data():
    return _data(N_TEST, 11)


def _task(mlp_factory, recipe: Recipe | None = None, **kw) -> Task:
    recipe = recipe or Recipe(lr=0.2, batch_size=3, epochs=2, momentum=0.5)
    return Task(mlp_factory(out_dim=N_CLASSES, seed=4, **kw), "classification", recipe)


def _reference_losses(task, train_data, test_data, subsets, settings):
    """(M, R, n_test) test losses of models trained one by one with ``train_one``."""
    d = task.validate(test_data)
    out = np.empty((settings.n_subsets, settings.repeats, N_TEST))
    for m in range(settings.n_subsets):
        for r in range(settings.repeats):
            model = train_one(task, train_data, subsets[m], model_seed(settings.seed, m, r),
                              settings.epochs).eval()
            with torch.no_grad():
                out[m, r] = task.sample_loss(model(d.x), d.targets).numpy()
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"n_subsets": 1}, {"n_subsets": 2.5}, {"fraction": 0.0}, {"fraction": 1.0},
    {"fraction": True}, {"repeats": 0}, {"seed": -1}, {"batch_models": 0},
    {"epochs": -1}, {"epochs": 1.5},
])
def test_settings_reject_bad_values(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        RetrainSettings(**bad)


def test_settings_round_trip_and_model_seeds():
    s = RetrainSettings(n_subsets=7, fraction=0.3, repeats=2, seed=5, batch_models=3, epochs=4)
    assert RetrainSettings(**s.to_dict()) == s
    seeds = {model_seed(s, m, r) for s in range(3) for m in range(20) for r in range(3)}
    assert len(seeds) == 180
    assert model_seed(1, 2, 3) == model_seed(1, 2, 3)
    assert 0 <= model_seed(1, 2, 3) < 2**63


# ---- batched training equals one-by-one training --------------------------------------------
@pytest.mark.parametrize("recipe", [
    Recipe(lr=0.3, batch_size=3, epochs=3, momentum=0.9, weight_decay=0.02),
    Recipe(lr=0.05, batch_size=3, epochs=3, optimizer="adam", weight_decay=0.01),
], ids=["sgd-momentum", "adam"])
def test_train_batch_matches_train_one(mlp_factory, train_data, recipe):
    task = _task(mlp_factory, recipe)
    masks = random_subsets(3, N_TRAIN, 0.5, seed=1)  # 8 samples: minibatches of 3, 3, 2
    seeds = [11, 12, 13]
    stacked = train_batch(task, train_data, masks, seeds)
    assert len(stacked) == 3
    for b in range(3):
        ref = FunctionalModel(train_one(task, train_data, masks[b], seeds[b])).state()
        init = FunctionalModel(rt.reinitialised(task.model, seeds[b])).state()
        assert _max_diff(stacked.member(b).params, ref.params) < 1e-10
        assert _max_diff(init.params, ref.params) > 1e-3  # training moved the parameters
    assert _max_diff(stacked.member(0).params, stacked.member(1).params) > 1e-3


def test_train_batch_with_batchnorm_updates_running_statistics_per_model(
        mlp_factory, train_data):
    # SGD: under Adam the bias in front of BatchNorm (true gradient zero) amplifies rounding
    task = _task(mlp_factory, Recipe(lr=0.2, batch_size=3, epochs=2, momentum=0.9),
                 batchnorm=True)
    masks = random_subsets(3, N_TRAIN, 0.5, seed=2)
    seeds = [4, 5, 6]
    stacked = train_batch(task, train_data, masks, seeds)
    for b in range(3):
        ref = FunctionalModel(train_one(task, train_data, masks[b], seeds[b])).state()
        got = stacked.member(b)
        assert _max_diff(got.params, ref.params) < 1e-10
        assert _max_diff(got.buffers, ref.buffers) < 1e-10
        assert int(got.buffers["1.num_batches_tracked"]) == 2 * 3
        assert float(got.buffers["1.running_mean"].abs().max()) > 1e-3  # reset to 0, updated
    assert _max_diff({"m": stacked.buffers["1.running_mean"][0]},
                     {"m": stacked.buffers["1.running_mean"][1]}) > 1e-3


def test_train_batch_with_batchnorm_and_a_last_minibatch_of_one(mlp_factory, train_data):
    """8 samples in minibatches of 7: the last one holds a single sample, which BatchNorm
    normalises with its running statistics (batch statistics of one value do not exist), in
    the batched loop as in train_one."""
    task = _task(mlp_factory, Recipe(lr=0.2, batch_size=7, epochs=2), batchnorm=True)
    masks = random_subsets(2, N_TRAIN, 0.5, seed=2)
    stacked = train_batch(task, train_data, masks, [4, 5])
    for b in range(2):
        ref = FunctionalModel(train_one(task, train_data, masks[b], b + 4)).state()
        assert _max_diff(stacked.member(b).params, ref.params) < 1e-10
        assert _max_diff(stacked.member(b).buffers, ref.buffers) < 1e-10
        # the lone samples did not update the running statistics: one update per epoch
        assert int(stacked.member(b).buffers["1.num_batches_tracked"]) == 2


def test_batchnorm_cumulative_average_is_trained_one_by_one(train_data):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Tanh(),
                          nn.Linear(4, N_CLASSES)).double()
    task = Task(model, "classification", Recipe(lr=0.1, batch_size=4, epochs=1))
    masks = random_subsets(2, N_TRAIN, 0.5, seed=3)
    stacked = train_batch(task, train_data, masks, [1, 2])
    for b in range(2):
        ref = FunctionalModel(train_one(task, train_data, masks[b], b + 1)).state()
        assert _max_diff(stacked.member(b).params, ref.params) == 0.0
        assert _max_diff(stacked.member(b).buffers, ref.buffers) == 0.0


def test_train_batch_reinitialises_and_keeps_frozen_parameters_per_model(train_data):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, N_CLASSES)).double()
    model[2].requires_grad_(False)
    task = Task(model, "classification", Recipe(lr=0.05, batch_size=3, epochs=2,
                                                optimizer="adam"))
    masks = random_subsets(2, N_TRAIN, 0.5, seed=1)
    stacked = train_batch(task, train_data, masks, [7, 8])
    assert isinstance(stacked, StackedState)
    assert set(stacked.frozen) == {"2.weight", "2.bias"}
    for b in range(2):
        ref = train_one(task, train_data, masks[b], 7 + b)
        assert _max_diff(stacked.member(b).params, FunctionalModel(ref).state().params) < 1e-10
        assert torch.equal(stacked.frozen["2.weight"][b], ref[2].weight)  # never trained
    assert not torch.equal(stacked.frozen["2.weight"][0], stacked.frozen["2.weight"][1])


def test_train_batch_names_the_model_that_diverged(train_data):
    x, y = train_data
    y = torch.randn(N_TRAIN, 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    y[0] = 1e200  # squared, an inf loss for every model that trains on sample 0
    task = Task(nn.Linear(3, 2).double(), "regression", Recipe(lr=0.1, batch_size=4,
                                                               epochs=2))
    masks = np.zeros((3, N_TRAIN), dtype=bool)
    masks[:, 1:9] = True
    masks[1, 1], masks[1, 0] = False, True
    with pytest.raises(RetrainDiverged, match="epoch 1 of 2") as caught:
        train_batch(task, (x, y), masks, [1, 2, 3])
    assert caught.value.index == 1


def test_train_batch_rejects_bad_subsets(mlp_factory, train_data):
    task = _task(mlp_factory)
    masks = random_subsets(2, N_TRAIN, 0.5, seed=0)
    masks[1, np.flatnonzero(~masks[1])[0]] = True
    with pytest.raises(InputError, match="one size"):
        train_batch(task, train_data, masks, [0, 1])
    with pytest.raises(InputError, match="one row per seed"):
        train_batch(task, train_data, masks[:1], [0, 1])
    with pytest.raises(InputError, match="boolean"):
        train_batch(task, train_data, masks.astype(int), [0, 1])


# ---- the ground truth -----------------------------------------------------------------------
def test_ground_truth_matches_one_by_one_reference(mlp_factory, train_data, test_data):
    task = _task(mlp_factory)
    before = FunctionalModel(task.model).state()
    settings = RetrainSettings(n_subsets=3, repeats=2, seed=7, batch_models=4)  # chunks 4 + 2
    gt = ground_truth(task, train_data, test_data, settings)
    assert isinstance(gt, GroundTruth)
    np.testing.assert_array_equal(gt.subsets, random_subsets(3, N_TRAIN, 0.5, 7))
    assert gt.losses.shape == (3, N_TEST) and gt.losses.dtype == np.float64
    ref = _reference_losses(task, train_data, test_data, gt.subsets, settings)
    np.testing.assert_allclose(gt.repeat_losses, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gt.losses, ref.mean(axis=1), rtol=0, atol=1e-10)
    assert np.abs(ref[:, 0] - ref[:, 1]).max() > 1e-3  # repeats are different models
    assert gt.info["trained_models"] == 6 and gt.info["n_chunks"] == 2
    assert gt.key == cache_key(task, train_data, test_data, settings)
    # the template is untouched
    assert _max_diff(FunctionalModel(task.model).state().params, before.params) == 0.0
    assert not task.model.training
    # the result does not depend on how many models train together
    single = ground_truth(task, train_data, test_data,
                          dataclasses.replace(settings, batch_models=1))
    np.testing.assert_allclose(single.losses, gt.losses, rtol=0, atol=1e-10)
    scores = np.random.default_rng(0).normal(size=(N_TEST, N_TRAIN))
    assert gt.evaluate(scores).mean == pytest.approx(lds(scores, gt.subsets, gt.losses).mean)


def test_second_call_reads_the_cache(mlp_factory, train_data, test_data, tmp_path,
                                     monkeypatch):
    task = _task(mlp_factory)
    settings = RetrainSettings(n_subsets=4, batch_models=3, seed=1)
    first = ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    assert first.info["trained_models"] == 4 and first.seconds > 0
    folder = tmp_path / first.key
    assert sorted(p.name for p in folder.iterdir()) == [
        "losses_0000.json", "losses_0000.npy", "losses_0001.json", "losses_0001.npy",
        "manifest.json", "subsets.json", "subsets.npy"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == first.key and manifest["settings"] == settings.to_dict()
    assert np.load(folder / "losses_0001.npy", allow_pickle=False).shape == (1, N_TEST)
    record = json.loads((folder / "losses_0001.json").read_text())
    assert record["key"] == first.key and record["shape"] == [1, N_TEST]

    def no_training(*args, **kwargs):
        raise AssertionError("trained although everything is cached")

    monkeypatch.setattr(rt, "train_batch", no_training)
    second = ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    assert second.info["trained_models"] == 0 and second.info["cached_chunks"] == 2
    np.testing.assert_array_equal(second.losses, first.losses)
    np.testing.assert_array_equal(second.subsets, first.subsets)
    assert second.seconds == pytest.approx(first.seconds)


def _done(folder) -> list[str]:
    """The finished chunks of losses in a cache folder."""
    return sorted(p.stem for p in folder.glob("losses_*.json")
                  if p.with_suffix(".npy").exists())


def test_a_damaged_or_foreign_cache_chunk_is_trained_again(mlp_factory, train_data,
                                                           test_data, tmp_path, monkeypatch):
    task = _task(mlp_factory)
    settings = RetrainSettings(n_subsets=4, batch_models=2, seed=1)
    first = ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    folder = tmp_path / first.key
    chunk = folder / "losses_0001.npy"
    np.save(chunk, np.zeros((2, N_TEST)), allow_pickle=False)  # edited: checksum mismatch
    calls = []
    real = rt.train_batch
    monkeypatch.setattr(rt, "train_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    assert len(calls) == 1 and again.info["cached_chunks"] == 1
    np.testing.assert_array_equal(again.losses, first.losses)


def _changed(name, task, train, test, settings):
    """Inputs with one thing changed."""
    task = dataclasses.replace(task, model=copy.deepcopy(task.model),
                               recipe=copy.deepcopy(task.recipe))
    train = (train[0].clone(), train[1].clone())
    test = (test[0].clone(), test[1].clone())
    if name == "train input":
        train[0][3, 1] += 1e-9
    elif name == "train label":
        train[1][5] = (train[1][5] + 1) % N_CLASSES
    elif name == "test input":
        test[0][0, 0] += 1e-9
    elif name == "test label":
        test[1][2] = (test[1][2] + 1) % N_CLASSES
    elif name == "lr":
        task.recipe.lr = 0.21
    elif name == "recipe epochs":
        task.recipe.epochs = 3
    elif name == "optimizer":
        task.recipe.optimizer = "adam"
    elif name == "template parameter":
        with torch.no_grad():
            task.model[0].weight[0, 0] += 1e-9
    elif name == "architecture":
        task.model[1] = nn.Sigmoid()
    elif name in ("seed", "n_subsets", "fraction", "repeats", "epochs", "batch_models"):
        value = {"seed": 1, "n_subsets": 5, "fraction": 0.25, "repeats": 2, "epochs": 1,
                 "batch_models": 2}[name]
        settings = dataclasses.replace(settings, **{name: value})
    return task, train, test, settings


@pytest.mark.parametrize("name", [
    "train input", "train label", "test input", "test label", "lr", "recipe epochs",
    "optimizer", "template parameter", "architecture", "seed", "n_subsets", "fraction",
    "repeats", "epochs", "batch_models",
])
def test_any_change_gives_a_new_key(mlp_factory, train_data, test_data, name):
    task = _task(mlp_factory)
    settings = RetrainSettings(n_subsets=4)
    base = cache_key(task, train_data, test_data, settings)
    same = cache_key(*_changed("nothing", task, train_data, test_data, settings))
    assert same == base and len(base) == 64
    assert cache_key(*_changed(name, task, train_data, test_data, settings)) != base


def test_regression_and_classification_keys_differ(mlp_factory, train_data, test_data):
    reg = Task(mlp_factory(out_dim=N_CLASSES, seed=4), "regression", Recipe())
    cls = Task(mlp_factory(out_dim=N_CLASSES, seed=4), "classification", Recipe())
    one_hot = [(x, torch.nn.functional.one_hot(y, N_CLASSES).double())
               for x, y in (train_data, test_data)]
    assert torch.equal(reg.validate(one_hot[0]).targets, cls.validate(train_data).targets)
    s = RetrainSettings()
    assert cache_key(reg, *one_hot, s) != cache_key(cls, train_data, test_data, s)


def test_interrupted_run_resumes_with_the_missing_chunks(mlp_factory, train_data, test_data,
                                                         tmp_path, monkeypatch):
    task = _task(mlp_factory)
    settings = RetrainSettings(n_subsets=3, batch_models=1, seed=2)
    real = rt.train_batch
    calls: list[list[int]] = []

    def failing(task, data, masks, seeds, epochs=None):
        calls.append(list(seeds))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(task, data, masks, seeds, epochs)

    monkeypatch.setattr(rt, "train_batch", failing)
    with pytest.raises(RuntimeError, match="killed"):
        ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    folder = tmp_path / cache_key(task, train_data, test_data, settings)
    assert _done(folder) == ["losses_0000"]

    calls.clear()
    monkeypatch.setattr(rt, "train_batch", lambda *a, **k: calls.append(list(a[3])) or real(*a))
    resumed = ground_truth(task, train_data, test_data, settings, cache_dir=tmp_path)
    assert calls == [[model_seed(2, 1, 0)], [model_seed(2, 2, 0)]]
    assert resumed.info["trained_models"] == 2 and resumed.info["cached_chunks"] == 1
    monkeypatch.setattr(rt, "train_batch", real)
    whole = ground_truth(task, train_data, test_data, settings)
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=0, atol=1e-12)
    assert _done(folder) == ["losses_0000", "losses_0001", "losses_0002"]


# ---- divergence -----------------------------------------------------------------------------
def test_diverged_training_raises_and_is_not_cached(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = 100 * torch.randn(12, 2, generator=gen, dtype=torch.float64)
    task = Task(nn.Linear(3, 2).double(), "regression", Recipe(lr=100.0, batch_size=4,
                                                               epochs=50))
    with pytest.raises(InputError, match=r"subset 0 \(repeat 0\) diverged"):
        ground_truth(task, (x, y), (x[:3], y[:3]), RetrainSettings(n_subsets=2),
                     cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert not list(folder.glob("losses_*.npy"))
    assert _done(folder) == []


def test_divergence_message_names_the_subset_of_the_failing_model(
        mlp_factory, train_data, test_data, monkeypatch):
    task = _task(mlp_factory)
    real = rt.train_batch
    calls = []

    def diverging(*args):
        calls.append(1)
        if len(calls) == 2:  # models 2, 3 = (subset 1, repeat 0), (subset 1, repeat 1)
            raise RetrainDiverged(1, "NaN/inf training loss")
        return real(*args)

    monkeypatch.setattr(rt, "train_batch", diverging)
    with pytest.raises(InputError, match=r"subset 1 \(repeat 1\)"):
        ground_truth(task, train_data, test_data,
                     RetrainSettings(n_subsets=3, repeats=2, batch_models=2))


def test_nan_test_loss_raises(train_data, test_data):
    def loss(output, target):  # finite on the training targets, NaN on a huge test target
        bad = torch.where(target.abs().max(dim=1).values > 1e3, float("nan"), 1.0)
        return (output - target).pow(2).mean(dim=1) * bad

    task = Task(nn.Linear(3, 1).double(), "regression", Recipe(lr=0.1, batch_size=4, epochs=1),
                loss=loss)
    y_train = train_data[0][:, :1].clone()
    y_test = test_data[0][:, :1].clone()
    y_test[2, 0] = 1e4
    with pytest.raises(InputError, match="subset 0 .*NaN/inf test loss"):
        ground_truth(task, (train_data[0], y_train), (test_data[0], y_test),
                     RetrainSettings(n_subsets=2))


# ---- dropout --------------------------------------------------------------------------------
def test_dropout_models_train_reproducibly(train_data, test_data):
    def build(p):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(p),
                             nn.Linear(8, N_CLASSES)).double()

    recipe = Recipe(lr=0.2, batch_size=4, epochs=2)
    settings = RetrainSettings(n_subsets=3, batch_models=3)
    with_dropout = Task(build(0.5), "classification", recipe)
    a = ground_truth(with_dropout, train_data, test_data, settings)
    b = ground_truth(with_dropout, train_data, test_data, settings)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert np.all(np.isfinite(a.losses))
    plain = ground_truth(Task(build(0.0), "classification", recipe), train_data, test_data,
                         settings)
    assert np.abs(plain.losses - a.losses).max() > 1e-3  # dropout was active in training


class _Branching(nn.Module):
    """A forward that branches on its input's values (as Hugging Face's mask builders do),
    which ``torch.func.vmap`` cannot run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body, self.head = nn.Linear(3, 4).double(), nn.Linear(4, N_CLASSES).double()

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if bool((x[:, 0] > 0).all()):  # data-dependent control flow
            h = h * 2
        return self.head(h)


def test_ground_truth_of_a_model_that_cannot_run_under_vmap(train_data, test_data, caplog):
    task = Task(_Branching(), "classification", Recipe(lr=0.2, batch_size=3, epochs=2))
    settings = RetrainSettings(n_subsets=3, repeats=1, seed=7, batch_models=3)
    with caplog.at_level("INFO", logger="iif.evaluation.retrain"):
        gt = ground_truth(task, train_data, test_data, settings)
    ref = _reference_losses(task, train_data, test_data, gt.subsets, settings)
    np.testing.assert_allclose(gt.repeat_losses, ref, rtol=0, atol=1e-10)
    assert np.abs(ref[:, 0] - ref[0, 0]).max() > 1e-3  # three different models
    assert any("retraining 3 models one at a time: the model's forward cannot run under "
               "torch.func.vmap" in r.getMessage() for r in caplog.records)
