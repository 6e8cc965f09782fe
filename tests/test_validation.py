"""The settings base class (``iif.validation.Settings``): every settings dataclass derives from
it, documents each field and keeps its labels, checks and records."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pickle
import pkgutil
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

import iif
from iif import (
    BaselineSettings,
    CGSettings,
    CurvatureSettings,
    PathSettings,
    ProjectionSettings,
    Recipe,
)
from iif.errors import InputError
from iif.evaluation.retrain import RetrainSettings
from iif.runs.config import SECTIONS
from iif.validation import (
    DOC,
    LIMITS,
    SettingDoc,
    Settings,
    describe_settings,
    setting,
)

ALL = {
    BaselineSettings: "[baseline]",
    PathSettings: "[path]",
    CurvatureSettings: "[curvature]",
    CGSettings: "[cg]",
    ProjectionSettings: "[projection]",
    Recipe: "recipe",
    RetrainSettings: "retrain",
}


def _core_dataclasses() -> set[type]:
    """Every dataclass defined in a module of the ``iif`` package."""
    found: set[type] = set()
    for info in pkgutil.walk_packages(iif.__path__, "iif."):
        if info.name == "iif.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == info.name and dataclasses.is_dataclass(obj):
                found.add(obj)
    return found


def test_every_settings_class_derives_from_settings():
    """The listed classes, every class a TOML section builds, and every dataclass of the
    package that declares a field with ``setting(...)`` or is named ``*Settings``."""
    declared = {cls for cls in _core_dataclasses()
                if cls.__name__.endswith("Settings")
                or any(LIMITS in f.metadata or DOC in f.metadata for f in dataclasses.fields(cls))}
    assert declared == set(ALL)
    assert set(SECTIONS.values()) <= set(ALL)
    for cls, section in ALL.items():
        assert issubclass(cls, Settings) and dataclasses.is_dataclass(cls)
        assert cls.section == section
        assert "section" not in {f.name for f in dataclasses.fields(cls)}
    for name, cls in SECTIONS.items():
        assert cls.section == f"[{name}]"


@pytest.mark.parametrize("cls", list(ALL), ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_doc(cls):
    described = describe_settings(cls)
    assert [d.name for d in described] == [f.name for f in dataclasses.fields(cls)]
    assert cls.describe() == described
    for d, f in zip(described, dataclasses.fields(cls), strict=True):
        assert isinstance(d, SettingDoc)
        assert d.doc and d.doc == f.metadata[DOC], f"{cls.__name__}.{d.name} has no doc"
        assert "\n" not in d.doc and d.doc == d.doc.strip()
        assert d.default == f.default and d.accepts
        assert d.line().startswith(f"{d.name}: {d.doc} (")


# The run key digests to_dict(): the records of the defaults must stay exactly these.
DEFAULT_RECORDS = {
    BaselineSettings: {"mode": "per-test", "direction": "unlearn", "objective": "auto",
                       "lam": 1.0, "epochs": 1, "lr": None, "batch_size": None,
                       "divergence_factor": 10.0, "stop_test_loss": "auto", "self_step": None},
    PathSettings: {"steps": 3, "epochs": 1, "lr": None, "batch_size": None, "sparse": True,
                   "measure_end": True},
    CurvatureSettings: {"kind": "fisher", "damping": None, "ggn_rank": "auto",
                        "default_damping_ratio": 0.3, "path_fit": "auto", "max_retries": 8,
                        "retry_factor": 10.0},
    CGSettings: {"max_iter": 200, "tol": 1e-8},
    ProjectionSettings: {"dim": None, "kind": "gaussian", "seed": 0, "structure": "dense",
                         "block_elements": 1 << 22},
    Recipe: {"lr": 0.01, "epochs": 10, "batch_size": 64, "optimizer": "sgd", "momentum": 0.0,
             "weight_decay": 0.0},
    RetrainSettings: {"n_subsets": 100, "fraction": 0.5, "repeats": 1, "seed": 0,
                      "batch_models": 16, "epochs": None},
}


@pytest.mark.parametrize("cls", list(ALL), ids=lambda c: c.__name__)
def test_records_and_labels_are_unchanged(cls):
    record = cls().to_dict()
    assert record == DEFAULT_RECORDS[cls]
    assert list(record) == [f.name for f in dataclasses.fields(cls)]
    assert cls(**record) == cls()
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(InputError, match=rf"^{re.escape(ALL[cls])} {first} must "):
        cls(**{first: object()})


def test_a_subclass_keeps_its_own_checks_after_the_generic_ones():
    with pytest.raises(InputError, match=r"^recipe lr must be a finite number > 0, got 0"):
        Recipe(lr=0)
    with pytest.raises(InputError, match=r"^recipe optimizer must be 'sgd', 'adam', 'adamw' "
                                         r"or a callable, got 'lbfgs'"):
        Recipe(optimizer="lbfgs")

    def custom(tensors):
        return None

    assert Recipe(optimizer=custom).to_dict()["optimizer"] == "custom"


def test_a_new_settings_class_gets_checks_records_and_docs_from_the_base():
    @dataclass
    class Toy(Settings):
        section = "[toy]"

        count: int = setting(2, ge=1, doc="how many")
        kind: Literal["a", "b"] = setting("a", doc="which one")

    assert Toy().to_dict() == {"count": 2, "kind": "a"}
    assert [f.name for f in dataclasses.fields(Toy)] == ["count", "kind"]
    with pytest.raises(InputError, match=r"^\[toy\] count must be an integer >= 1, got 0$"):
        Toy(count=0)
    with pytest.raises(InputError, match=r"^\[toy\] kind must be one of 'a', 'b', got 'c'$"):
        Toy(kind="c")
    assert describe_settings(Toy) == [SettingDoc("count", "an integer >= 1", 2, "how many"),
                                      SettingDoc("kind", "one of 'a', 'b'", "a", "which one")]
    with pytest.raises(TypeError, match="doc"):
        setting(1, ge=0)  # type: ignore[call-arg]  # a field without its doc is refused


@pytest.mark.parametrize("cls", list(ALL), ids=lambda c: c.__name__)
def test_assigning_a_setting_is_checked_as_construction_checks_it(cls):
    first, bad = dataclasses.fields(cls)[0].name, object()
    with pytest.raises(InputError) as made:
        cls(**{first: bad})
    settings = cls()
    with pytest.raises(InputError) as assigned:
        setattr(settings, first, bad)
    assert str(assigned.value) == str(made.value)
    assert settings == cls()  # a refused value is not kept


def test_assigned_values_are_recorded_as_constructed_ones():
    recipe = Recipe()
    recipe.epochs = np.int64(3)
    recipe.lr = 1
    assert type(recipe.epochs) is int and type(recipe.lr) is float
    assert recipe.to_dict() == Recipe(epochs=3, lr=1.0).to_dict()
    with pytest.raises(InputError, match=r"^recipe optimizer must be 'sgd', 'adam', 'adamw' "
                                         r"or a callable, got 'lbfgs'$"):
        recipe.optimizer = "lbfgs"
    assert recipe.optimizer == "sgd"
    recipe.other = "not a setting"  # attributes that are not fields are left alone
    assert recipe.other == "not a setting"


@pytest.mark.parametrize("cls", list(ALL), ids=lambda c: c.__name__)
def test_copies_and_records_still_make_settings(cls):
    settings = cls()
    assert dataclasses.replace(settings) == settings
    assert copy.deepcopy(settings) == settings and copy.copy(settings) == settings
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert cls(**settings.to_dict()) == settings
