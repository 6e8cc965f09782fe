"""Fitted state (iif.results.fitted): fit once, attribute many times, save and load bit-equal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IN_DIM, N_CLASSES, OUT_REG, build_mlp

import iif.engine.factored
from iif import InfluenceFunction, ProjectionSettings
from iif.engine.curvature import CurvatureSettings
from iif.engine.engine import Engine
from iif.errors import InputError
from iif.methods.trak.trak import TRAK
from iif.results.fitted import RECORD, TENSORS
from iif.task.task import Task

pytestmark = pytest.mark.usefixtures("single_thread")

IF_MODES: dict[str, dict] = {
    "factored fisher": {},
    "factored ggn": {"curvature": CurvatureSettings(kind="ggn")},
    "exact hessian": {"curvature": CurvatureSettings(kind="hessian")},
    "projected cholesky": {"projection": ProjectionSettings(dim=6)},
    "projected woodbury": {"projection": ProjectionSettings(dim=20)},
    "cg": {"solver": "cg"},
}
TRAK_MODES: dict[str, dict] = {
    "woodbury": {"projection": ProjectionSettings(dim=None)},
    "cholesky": {"projection": ProjectionSettings(dim=8)},
}


def _tests(n: int, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=gen, dtype=torch.float64)
    if kind == "classification":
        return x, torch.arange(n) % N_CLASSES
    return x, torch.randn(n, OUT_REG, generator=gen, dtype=torch.float64)


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Rows featurised by every feature function the methods use (their training side
    included): loss and output features, per-sample gradients, layer factors."""
    rows: list[int] = []

    def wrap(owner: object, name: str, position: int) -> None:
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            rows.append(int(args[position].shape[0]))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    wrap(Engine, "loss_features", 2)
    wrap(Engine, "test_features", 2)
    wrap(Engine, "output_features", 2)
    wrap(Engine, "per_sample_grads", 2)
    wrap(iif.engine.factored, "linear_factors", 2)
    return rows


def _make(kind: str, task: Task, data, options: dict) -> Callable[[], object]:
    cls = InfluenceFunction if kind == "if" else TRAK
    return lambda: cls(task, data, progress=False, **options)


@pytest.mark.parametrize("mode", list(IF_MODES))
def test_if_fit_then_attribute_is_bit_equal_and_featurises_only_tests(
        mode, classification_task, classification_data, counted):
    make = _make("if", classification_task, classification_data, IF_MODES[mode])
    test, other = _tests(5, 10, "classification"), _tests(4, 11, "classification")
    fresh = make().attribute(test).scores
    method = make().fit()
    counted.clear()
    np.testing.assert_array_equal(method.attribute(test).scores, fresh)
    if mode != "cg":  # cg recomputes training gradients chunk by chunk by design
        assert set(counted) == {5}, counted  # the 5 test samples only, never the 12
    np.testing.assert_array_equal(method.attribute(other).scores, make().attribute(other).scores)


@pytest.mark.parametrize("mode", list(TRAK_MODES))
def test_trak_fit_then_attribute_is_bit_equal_and_featurises_only_tests(
        mode, classification_task, classification_data, counted):
    make = _make("trak", classification_task, classification_data, TRAK_MODES[mode])
    test = _tests(5, 10, "classification")
    fresh = make().attribute(test).scores
    method = make().fit()
    counted.clear()
    np.testing.assert_array_equal(method.attribute(test).scores, fresh)
    assert counted == [5]


@pytest.mark.parametrize("kind,mode", [("if", m) for m in IF_MODES]
                         + [("trak", m) for m in TRAK_MODES] + [("trak-reg", "woodbury")])
def test_saved_state_loads_bit_equal_in_a_new_method(kind, mode, tmp_path, classification_task,
                                                    classification_data, regression_data,
                                                    counted):
    if kind == "trak-reg":  # orientations, and Woodbury rows D^(1/2) Phi apart from Phi
        task = Task(build_mlp(out_dim=1, seed=3), "regression")
        make = _make("trak", task, (regression_data[0], regression_data[1][:, :1]),
                     TRAK_MODES[mode])
        x, y = _tests(5, 10, "regression")
        test = (x, y[:, :1])
    else:
        modes = IF_MODES if kind == "if" else TRAK_MODES
        make = _make(kind, classification_task, classification_data, modes[mode])
        test = _tests(5, 10, "classification")
    fresh = make().attribute(test).scores
    make().fit(tmp_path)
    assert (tmp_path / RECORD).exists() and (tmp_path / TENSORS).exists()
    record = json.loads((tmp_path / RECORD).read_text())
    assert "test data" not in record["parts"]
    assert all(len(t["sha256"]) == 64 for t in record["tensors"].values())
    counted.clear()
    loaded = make().fit(tmp_path)
    assert counted == []  # loading featurises nothing
    np.testing.assert_array_equal(loaded.attribute(test).scores, fresh)


def test_another_model_or_setting_is_refused_naming_the_part(tmp_path, classification_data):
    def task(seed: int) -> Task:
        return Task(build_mlp(out_dim=N_CLASSES, seed=seed), "classification")

    InfluenceFunction(task(4), classification_data, progress=False).fit(tmp_path)
    with pytest.raises(InputError, match="model weights"):
        InfluenceFunction(task(5), classification_data, progress=False).fit(tmp_path)
    with pytest.raises(InputError, match=r"settings \(curvature.damping: None -> 0.5"):
        InfluenceFunction(task(4), classification_data, progress=False,
                          curvature=CurvatureSettings(damping=0.5)).fit(tmp_path)
    with pytest.raises(InputError, match="method, settings"):
        TRAK(task(4), classification_data, progress=False).fit(tmp_path)
    x, y = classification_data
    with pytest.raises(InputError, match="training data"):
        InfluenceFunction(task(4), (x, y.flip(0)), progress=False).fit(tmp_path)


def test_a_tampered_tensor_file_is_fitted_again(tmp_path, classification_task,
                                                classification_data, counted):
    make = _make("if", classification_task, classification_data, IF_MODES["projected cholesky"])
    test = _tests(5, 10, "classification")
    fresh = make().attribute(test).scores
    make().fit(tmp_path)
    blob = bytearray((tmp_path / TENSORS).read_bytes())
    blob[-3] ^= 0xFF  # a byte of the last tensor's data
    (tmp_path / TENSORS).write_bytes(bytes(blob))
    counted.clear()
    method = make().fit(tmp_path)
    assert 12 in counted  # recomputed, not served from the changed bytes
    np.testing.assert_array_equal(method.attribute(test).scores, fresh)
    counted.clear()
    make().fit(tmp_path)  # rewritten: the next fit loads again
    assert counted == []


@pytest.mark.parametrize("kind", ["if", "trak"])
def test_a_damping_changed_after_fit_is_honoured(kind, tmp_path, classification_task,
                                                 classification_data):
    options = IF_MODES["projected cholesky"] if kind == "if" else TRAK_MODES["cholesky"]
    make = _make(kind, classification_task, classification_data, options)
    test = _tests(5, 10, "classification")
    method = make().fit(tmp_path)
    before = method.attribute(test).scores
    if kind == "if":
        method.curvature.damping = 0.5
    else:
        method.damping = 0.5
    changed = method.attribute(test).scores
    other = make()
    if kind == "if":
        other.curvature.damping = 0.5
    else:
        other.damping = 0.5
    np.testing.assert_array_equal(changed, other.attribute(test).scores)
    assert not np.allclose(changed, before)
    with pytest.raises(InputError, match="damping"):  # the folder holds the old damping
        method.fit(tmp_path)


def test_methods_without_a_fitted_state_say_so(classification_task, classification_data):
    from iif import IntegratedInfluence

    with pytest.raises(InputError, match="no training-side state"):
        IntegratedInfluence(classification_task, classification_data, progress=False).fit()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path, classification_task,
                                                  classification_data):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        InfluenceFunction(classification_task, classification_data, progress=False).fit(
            tmp_path / "f")


def test_a_file_in_the_path_of_the_folder_is_named(tmp_path: Path, classification_task,
                                                   classification_data):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a "
                                         rf"file, not a folder, so the folder cannot be"):
        InfluenceFunction(classification_task, classification_data, progress=False).fit(
            tmp_path / "f" / "sub")


@pytest.mark.parametrize(("content", "said"), [
    (b"", "has an empty fitted-state record fitted.json (0 bytes, as an interrupted copy"),
    (b'{\n  "format": 1,\n  "meth', "has a damaged fitted-state record fitted.json (cut short"),
    (b"{}", "has a damaged fitted-state record fitted.json (no format field"),
])
def test_an_empty_or_damaged_record_is_fitted_again(content, said, tmp_path, classification_task,
                                                    classification_data, counted, monkeypatch):
    import logging

    make = _make("if", classification_task, classification_data, IF_MODES["projected cholesky"])
    make().fit(tmp_path)
    (tmp_path / RECORD).write_bytes(content)
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("iif.results.fitted")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    counted.clear()
    make().fit(tmp_path)  # never refused as another version's state
    assert 12 in counted  # fitted again
    assert len(warned) == 1 and said in warned[0] and "fitting again" in warned[0], warned
    counted.clear()
    make().fit(tmp_path)  # rewritten: the next fit loads
    assert counted == []


def test_a_full_disk_writing_the_state_is_one_line(tmp_path, classification_task,
                                                   classification_data, monkeypatch):
    import errno
    import os

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    make = _make("if", classification_task, classification_data, IF_MODES["projected cholesky"])
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match=rf"^{tmp_path / TENSORS}: the disk is full \(\d+.*"
                                         rf"needed, .* free\); free some space"):
        make().fit(tmp_path)
    assert not list(tmp_path.iterdir())  # no tensors, no record, no temporary file, no lock
    monkeypatch.undo()
    make().fit(tmp_path)
    assert (tmp_path / RECORD).exists()
