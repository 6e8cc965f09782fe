"""Hostile settings: every invalid value is refused with one message naming the key, the value
and what is expected (``iif.validation``), through the Python API and through ``iif attribute
--settings file.toml``, before anything is written; settings changed after construction are
checked again when the method runs.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from iif import (
    TRAK,
    BaselineSettings,
    CGSettings,
    CurvatureSettings,
    InfluenceFunction,
    IntegratedInfluence,
    PathSettings,
    ProjectionSettings,
    Recipe,
    Task,
)
from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.evaluation.retrain import RetrainSettings
from iif.methods.tracin.checkpoints import Checkpoint
from iif.methods.tracin.tracin import TracIn
from iif.results.store import attribute_to
from iif.runs.cli import main
from iif.runs.config import build_method

# The job of every command-line test: an untrained two-layer classifier on 12 samples, so that
# loading it costs nothing and a valid run finishes in well under a second.
JOB = """
import numpy as np
import torch
from torch import nn

import iif


def job():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    y = rng.integers(0, 3, size=12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    task = iif.Task(model, "classification", iif.Recipe(lr=0.1, epochs=1, batch_size=4))
    return task, (x, y), (x[:2], y[:2])
"""

IIF_KEYS = ("['baseline', 'chunk', 'chunk_size', 'curvature', 'feature_dir', "
            "'max_feature_bytes', 'method', 'path', 'progress', 'projection', 'seed', "
            "'test_batch']")


def _problem() -> tuple[Task, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    y = rng.integers(0, 3, size=12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    task = Task(model, "classification", Recipe(lr=0.1, epochs=1, batch_size=4))
    return task, (x, y), (x[:2], y[:2])


@pytest.fixture
def problem():
    return _problem()


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``run(toml) -> (exit code, last line of stderr, output folder)`` of ``iif attribute``
    on the tiny job with ``toml`` as its settings file."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "settings_job.py").write_text(JOB)

    def go(toml: str) -> tuple[int, str, Any]:
        settings = tmp_path / "settings.toml"
        settings.write_text(textwrap.dedent(toml))
        out = tmp_path / "out"
        # no --no-progress: it would override a "progress" key of the file
        code = main(["attribute", "--task", "settings_job:job", "--settings", str(settings),
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        return code, lines[-1] if lines else "", out

    return go


def _nothing_written(out) -> bool:
    return not out.exists() or not any(out.iterdir())


# ---- the command line: iif attribute --settings file.toml ----------------------------------
CLI_CASES = {
    # the reported ones
    "baseline_lr_zero": ("[baseline]\nlr = 0.0",
                         "[baseline] lr must be a finite number > 0 or None, got 0.0"),
    "baseline_negative_batch": ("[baseline]\nbatch_size = -4",
                                "[baseline] batch_size must be an integer >= 1 or None, got -4"),
    "path_sparse_string": ('[path]\nsparse = "no"',
                           "[path] sparse must be a boolean (true or false), got 'no'"),
    "path_steps_float": ("[path]\nsteps = 2.7",
                         "[path] steps must be an integer >= 1, got 2.7"),
    "projection_dim_string": ('[projection]\ndim = "big"',
                              "[projection] dim must be an integer >= 1 or None, got 'big'"),
    "projection_dim_whole_float": ("[projection]\ndim = 2.0",
                                   "[projection] dim must be an integer >= 1 or None, got 2.0"),
    "misspelled_key": ("test_bach = 4", f"unknown setting 'test_bach'; known: {IIF_KEYS}"),
    # the other rules
    "path_sparse_int": ("[path]\nsparse = 1",
                        "[path] sparse must be a boolean (true or false), got 1"),
    "path_epochs_negative": ("[path]\nepochs = -1",
                             "[path] epochs must be an integer >= 0, got -1"),
    "baseline_lam_string": ('[baseline]\nlam = "1"',
                            "[baseline] lam must be a finite number > 0, got '1'"),
    "baseline_lam_bool": ("[baseline]\nlam = true",
                          "[baseline] lam must be a finite number > 0, got True"),
    "baseline_lam_inf": ("[baseline]\nlam = inf",
                         "[baseline] lam must be a finite number > 0, got inf"),
    "baseline_mode": ('[baseline]\nmode = "all"',
                      "[baseline] mode must be one of 'per-test', 'shared', got 'all'"),
    "baseline_stop": ('[baseline]\nstop_test_loss = "median"',
                      "[baseline] stop_test_loss must be a finite number, 'chance', 'auto' or "
                      "None, got 'median'"),
    "curvature_ggn_rank": ("[curvature]\nggn_rank = 0",
                           "[curvature] ggn_rank must be an integer >= 1, 'auto' or None, got 0"),
    "curvature_damping": ("[curvature]\ndamping = -1.0",
                          "[curvature] damping must be a finite number >= 0 or None, got -1.0"),
    "curvature_retry_factor": ("[curvature]\nretry_factor = 1.0",
                               "[curvature] retry_factor must be a finite number > 1, got 1.0"),
    "seed_float": ("seed = 1.5", "seed must be an integer >= 0, got 1.5"),
    "seed_negative": ("seed = -1", "seed must be an integer >= 0, got -1"),
    "chunk_size_zero": ("chunk_size = 0", "chunk_size must be an integer >= 1, got 0"),
    "test_batch_string": ('test_batch = "all"',
                          "test_batch must be an integer >= 1 or 'auto', got 'all'"),
    "progress_string": ('progress = "no"',
                        "progress must be a boolean (true or false) or None, got 'no'"),
    "run_chunk": ("chunk = 2.5", "chunk must be an integer >= 1, got 2.5"),
    "run_method": ('method = "loo"',
                   "method must be one of 'iif', 'if', 'tracin', 'trak', got 'loo'"),
    "run_method_number": ("method = 3",
                          "method must be one of 'iif', 'if', 'tracin', 'trak', got 3"),
    "key_of_another_method": ('solver = "cg"', f"unknown setting 'solver'; known: {IIF_KEYS}"),
    "section_of_another_method": ('method = "trak"\n[path]\nsteps = 2',
                                  "method 'trak' takes no settings section 'path'; its "
                                  "sections: ['projection']"),
    "cg_tol": ('method = "if"\nsolver = "cg"\n[cg]\ntol = 1.5',
               "[cg] tol must be a finite number in (0, 1), got 1.5"),
    "if_solver": ('method = "if"\nsolver = "lu"',
                  "solver must be one of 'auto', 'exact', 'projected', 'cg', got 'lu'"),
    "trak_damping": ('method = "trak"\ndamping = -1.0',
                     "damping must be a finite number >= 0 or None, got -1.0"),
    "models_from_settings": ("models = 2",
                             "'models' is not a setting: the task function returns it"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_invalid_setting_in_toml_is_refused_by_name(case, run):
    toml, message = CLI_CASES[case]
    code, last, out = run(toml)
    assert (code, last) == (1, f"iif: error: {message}")
    assert _nothing_written(out)


def test_valid_toml_still_runs(run):
    """The control: the same job with valid settings of every kind (numbers written as TOML
    integers where floats belong) runs and writes its result."""
    code, last, out = run("""
        seed = 1
        chunk = 2
        test_batch = 1
        [baseline]
        lam = 2
        lr = 0.05
        batch_size = 4
        stop_test_loss = 3
        [path]
        steps = 2
        sparse = false
        [projection]
        dim = 8
        [curvature]
        ggn_rank = "auto"
    """)
    assert code == 0, last
    assert not _nothing_written(out)


# ---- the Python API: the settings dataclasses ------------------------------------------------
DATACLASS_CASES = [
    (PathSettings, {"steps": 2.7}, "[path] steps must be an integer >= 1, got 2.7"),
    (PathSettings, {"steps": 3.0}, "[path] steps must be an integer >= 1, got 3.0"),
    (PathSettings, {"steps": "3"}, "[path] steps must be an integer >= 1, got '3'"),
    (PathSettings, {"steps": True}, "[path] steps must be an integer >= 1, got True"),
    (PathSettings, {"steps": 0}, "[path] steps must be an integer >= 1, got 0"),
    (PathSettings, {"sparse": "no"}, "[path] sparse must be a boolean (true or false), got 'no'"),
    (PathSettings, {"sparse": 0}, "[path] sparse must be a boolean (true or false), got 0"),
    (PathSettings, {"lr": 0.0}, "[path] lr must be a finite number > 0 or None, got 0.0"),
    (PathSettings, {"batch_size": 0},
     "[path] batch_size must be an integer >= 1 or None, got 0"),
    (BaselineSettings, {"lr": 0.0}, "[baseline] lr must be a finite number > 0 or None, got 0.0"),
    (BaselineSettings, {"batch_size": -4},
     "[baseline] batch_size must be an integer >= 1 or None, got -4"),
    (BaselineSettings, {"lam": 0}, "[baseline] lam must be a finite number > 0, got 0"),
    (BaselineSettings, {"lam": float("nan")},
     "[baseline] lam must be a finite number > 0, got nan"),
    (BaselineSettings, {"epochs": 1.5}, "[baseline] epochs must be an integer >= 0, got 1.5"),
    (BaselineSettings, {"divergence_factor": 0.0},
     "[baseline] divergence_factor must be a finite number > 0, got 0.0"),
    (BaselineSettings, {"self_step": -0.1},
     "[baseline] self_step must be a finite number > 0 or None, got -0.1"),
    (BaselineSettings, {"direction": "up"},
     "[baseline] direction must be one of 'unlearn', 'reinforce', got 'up'"),
    (BaselineSettings, {"stop_test_loss": True},
     "[baseline] stop_test_loss must be a finite number, 'chance', 'auto' or None, got True"),
    (CurvatureSettings, {"kind": "lissa"},
     "[curvature] kind must be one of 'fisher', 'ggn', 'hessian', 'ekfac', 'kfac', got "
     "'lissa'"),
    (CurvatureSettings, {"ggn_rank": 2.0},
     "[curvature] ggn_rank must be an integer >= 1, 'auto' or None, got 2.0"),
    (CurvatureSettings, {"ggn_rank": "big"},
     "[curvature] ggn_rank must be an integer >= 1, 'auto' or None, got 'big'"),
    (CurvatureSettings, {"default_damping_ratio": 0.0},
     "[curvature] default_damping_ratio must be a finite number > 0, got 0.0"),
    (CurvatureSettings, {"max_retries": -1},
     "[curvature] max_retries must be an integer >= 0, got -1"),
    (CGSettings, {"max_iter": 0}, "[cg] max_iter must be an integer >= 1, got 0"),
    (CGSettings, {"tol": 0.0}, "[cg] tol must be a finite number in (0, 1), got 0.0"),
    (ProjectionSettings, {"dim": "big"},
     "[projection] dim must be an integer >= 1 or None, got 'big'"),
    (ProjectionSettings, {"dim": 2.0}, "[projection] dim must be an integer >= 1 or None, got 2.0"),
    (ProjectionSettings, {"seed": -1}, "[projection] seed must be an integer >= 0, got -1"),
    (ProjectionSettings, {"structure": "sparse"},
     "[projection] structure must be one of 'dense', 'kronecker', got 'sparse'"),
    (ProjectionSettings, {"block_elements": 0},
     "[projection] block_elements must be an integer >= 1, got 0"),
    (Recipe, {"lr": 0.0}, "recipe lr must be a finite number > 0, got 0.0"),
    (Recipe, {"lr": "0.1"}, "recipe lr must be a finite number > 0, got '0.1'"),
    (Recipe, {"epochs": 2.0}, "recipe epochs must be an integer >= 0, got 2.0"),
    (Recipe, {"batch_size": 0}, "recipe batch_size must be an integer >= 1, got 0"),
    (Recipe, {"momentum": -0.5}, "recipe momentum must be a finite number >= 0, got -0.5"),
    (Recipe, {"weight_decay": float("inf")},
     "recipe weight_decay must be a finite number >= 0, got inf"),
    (RetrainSettings, {"n_subsets": 1}, "retrain n_subsets must be an integer >= 2, got 1"),
    (RetrainSettings, {"fraction": 1.0},
     "retrain fraction must be a finite number in (0, 1), got 1.0"),
    (RetrainSettings, {"epochs": 1.5},
     "retrain epochs must be an integer >= 0 or None, got 1.5"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), DATACLASS_CASES,
                         ids=[f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))!r}"
                              for c, k, _ in DATACLASS_CASES])
def test_settings_dataclass_refuses_invalid_value(cls, kwargs, message):
    with pytest.raises(InputError) as info:
        cls(**kwargs)
    assert str(info.value) == message


def test_numpy_scalars_are_accepted_as_python_numbers():
    path = PathSettings(steps=np.int64(2), lr=np.float32(0.5), sparse=np.bool_(False))
    assert (path.steps, path.lr, path.sparse) == (2, 0.5, False)
    assert (type(path.steps), type(path.lr), type(path.sparse)) == (int, float, bool)
    # an int where a float belongs is that float, so Python and TOML record the same value
    base = BaselineSettings(lam=2, stop_test_loss=3)
    assert (base.lam, base.stop_test_loss) == (2.0, 3.0) and type(base.lam) is float
    assert ProjectionSettings(dim=np.int32(8)).dim == 8
    assert CurvatureSettings(ggn_rank=None).ggn_rank is None
    assert CurvatureSettings(ggn_rank=np.int64(2)).ggn_rank == 2
    assert BaselineSettings(stop_test_loss="chance").stop_test_loss == "chance"


# ---- the Python API: method keywords ---------------------------------------------------------
KEYWORD_CASES = [
    (IntegratedInfluence, {"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
    (IntegratedInfluence, {"chunk_size": 2.5}, "chunk_size must be an integer >= 1, got 2.5"),
    (IntegratedInfluence, {"chunk_size": True}, "chunk_size must be an integer >= 1, got True"),
    (IntegratedInfluence, {"seed": "0"}, "seed must be an integer >= 0, got '0'"),
    (IntegratedInfluence, {"progress": "no"},
     "progress must be a boolean (true or false) or None, got 'no'"),
    (IntegratedInfluence, {"max_feature_bytes": 1e9},
     "max_feature_bytes must be an integer >= 0, got 1000000000.0"),
    (IntegratedInfluence, {"feature_dir": 3},
     "feature_dir must be a string, a PathLike or None, got 3"),
    (IntegratedInfluence, {"test_batch": 0},
     "test_batch must be an integer >= 1 or 'auto', got 0"),
    (IntegratedInfluence, {"path": {"steps": 2}},
     "path must be a PathSettings or None, got {'steps': 2}"),
    (IntegratedInfluence, {"baseline": PathSettings()},
     "baseline must be a BaselineSettings or None, got PathSettings(steps=3, epochs=1, lr=None, "
     "batch_size=None, sparse=True, measur..."),
    (InfluenceFunction, {"solver": "lu"},
     "solver must be one of 'auto', 'exact', 'projected', 'cg', got 'lu'"),
    (InfluenceFunction, {"trace_probes": 0}, "trace_probes must be an integer >= 1, got 0"),
    (InfluenceFunction, {"cg": 5}, "cg must be a CGSettings or None, got 5"),
    (TRAK, {"damping": -1.0}, "damping must be a finite number >= 0 or None, got -1.0"),
    (TRAK, {"damping": "0.1"}, "damping must be a finite number >= 0 or None, got '0.1'"),
    (TRAK, {"projection": 64}, "projection must be a ProjectionSettings or None, got 64"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), KEYWORD_CASES,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in KEYWORD_CASES])
def test_method_keyword_refuses_invalid_value(problem, cls, kwargs, message):
    task, train, _ = problem
    with pytest.raises(InputError) as info:
        cls(task, train, **{"progress": False, **kwargs})
    assert str(info.value) == message


def test_tracin_keywords_are_checked(problem):
    task, train, _ = problem
    checkpoints = [Checkpoint(epoch=1, lr=0.1, state=FunctionalModel(task.model).state())]
    with pytest.raises(InputError) as info:
        TracIn(task, train, checkpoints=checkpoints, projection={"dim": 8})
    assert str(info.value) == "projection must be a ProjectionSettings or None, got {'dim': 8}"
    with pytest.raises(InputError) as info:
        TracIn(task, train, checkpoints=checkpoints, seed=-2)
    assert str(info.value) == "seed must be an integer >= 0, got -2"


def test_misspelled_key_through_build_method(problem):
    task, train, test = problem
    from iif.task.job import Job

    with pytest.raises(InputError) as info:
        build_method(Job(task, train, test), {"test_bach": 4})
    assert str(info.value) == f"unknown setting 'test_bach'; known: {IIF_KEYS}"


# ---- settings changed after construction -----------------------------------------------------
def _iif(task, train) -> IntegratedInfluence:
    return IntegratedInfluence(task, train, progress=False, path=PathSettings(steps=2),
                               projection=ProjectionSettings(dim=8))


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: setattr(m.path, "steps", 2.7), "[path] steps must be an integer >= 1, got 2.7"),
    (lambda m: setattr(m.path, "sparse", "no"),
     "[path] sparse must be a boolean (true or false), got 'no'"),
    (lambda m: setattr(m.baseline, "lr", 0.0),
     "[baseline] lr must be a finite number > 0 or None, got 0.0"),
    (lambda m: setattr(m.curvature, "damping", -1.0),
     "[curvature] damping must be a finite number >= 0 or None, got -1.0"),
    (lambda m: setattr(m.projection, "dim", 2.0),
     "[projection] dim must be an integer >= 1 or None, got 2.0"),
], ids=["path.steps", "path.sparse", "baseline.lr", "curvature.damping", "projection.dim"])
def test_a_settings_field_changed_after_construction_is_refused_at_once(
        problem, change, message):
    """A field of a settings object is checked when it is assigned, with the message of the
    constructor, and the refused value is not kept."""
    task, train, _ = problem
    method = _iif(task, train)
    before = method.settings()
    with pytest.raises(InputError) as info:
        change(method)
    assert str(info.value) == message
    assert method.settings() == before


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: setattr(m, "baseline", {"lam": 2.0}),
     "baseline must be a BaselineSettings, got {'lam': 2.0}"),
    (lambda m: setattr(m, "path", None), "path must be a PathSettings, got None"),
    (lambda m: setattr(m, "seed", -1), "seed must be an integer >= 0, got -1"),
    (lambda m: setattr(m, "chunk_size", 0), "chunk_size must be an integer >= 1, got 0"),
    (lambda m: setattr(m, "test_batch", 2.5),
     "test_batch must be an integer >= 1 or 'auto', got 2.5"),
], ids=["baseline", "path", "seed", "chunk_size", "test_batch"])
def test_setting_changed_after_construction_is_refused_when_the_method_runs(
        problem, change, message):
    task, train, test = problem
    method = _iif(task, train)
    change(method)
    for call in (lambda: method.attribute(test), lambda: method.self_influence([0, 1]),
                 lambda: method.attribute_group(test), method.settings):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == message


def test_valid_change_after_construction_runs(problem):
    task, train, test = problem
    method = _iif(task, train)
    method.path.steps = np.int64(1)  # valid: recorded as the Python int 1
    method.baseline = BaselineSettings(lam=2.0)
    result = method.attribute(test)
    assert result.scores.shape == (2, 12) and np.isfinite(result.scores).all()
    assert result.settings["path"]["steps"] == 1 and type(method.path.steps) is int
    assert result.settings["baseline"]["lam"] == 2.0


def test_changed_setting_is_refused_before_a_store_is_written(problem, tmp_path):
    task, train, test = problem
    method = _iif(task, train)
    method.seed = -1
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"^seed must be an integer >= 0, got -1$"):
        attribute_to(out, method, test)
    assert _nothing_written(out)


def test_other_methods_check_changed_settings_when_they_run(problem):
    task, train, test = problem
    trak = TRAK(task, train, progress=False, projection=ProjectionSettings(dim=8))
    trak.damping = -1.0
    for call in (lambda: trak.attribute(test), lambda: trak.self_influence([0])):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == "damping must be a finite number >= 0 or None, got -1.0"
    influence = InfluenceFunction(task, train, progress=False, solver="cg")
    with pytest.raises(InputError) as info:
        influence.cg.tol = 2
    assert str(info.value) == "[cg] tol must be a finite number in (0, 1), got 2"
    influence.cg.tol = 1e-6
    influence.solver = "lu"
    with pytest.raises(InputError) as info:
        influence.attribute_dampings(test, [0.1])
    assert str(info.value) == "solver must be one of 'auto', 'exact', 'projected', 'cg', got 'lu'"


# ---- a changed setting is applied, never only recorded ----------------------------------------
def _same_scores(a, b) -> None:
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-14)


def test_a_changed_projection_rebuilds_the_projector(problem):
    task, train, test = problem
    method = _iif(task, train)
    method.attribute(test)  # built and used with dim 8
    method.projection = ProjectionSettings(dim=5, seed=3)
    changed = method.attribute(test)
    fresh = IntegratedInfluence(task, train, progress=False, path=PathSettings(steps=2),
                                projection=ProjectionSettings(dim=5, seed=3)).attribute(test)
    assert method.projector.dim == 5 and changed.settings["projection"]["dim"] == 5
    _same_scores(changed, fresh)


def test_a_changed_damping_is_not_served_from_the_cached_fit(problem):
    task, train, test = problem
    method = InfluenceFunction(task, train, progress=False, solver="projected",
                               projection=ProjectionSettings(dim=6))
    before = method.attribute(test)  # fits and caches the projected curvature
    method.curvature = CurvatureSettings(damping=0.5)
    changed = method.attribute(test)
    fresh = InfluenceFunction(task, train, progress=False, solver="projected",
                              projection=ProjectionSettings(dim=6),
                              curvature=CurvatureSettings(damping=0.5)).attribute(test)
    _same_scores(changed, fresh)
    assert not np.allclose(changed.scores, before.scores)
    method.solver = "exact"  # projection dim 6 is still set: the combination is refused
    with pytest.raises(InputError, match="solver 'exact' does not project"):
        method.attribute(test)


def test_a_changed_seed_reaches_every_ensemble_member(problem):
    task, train, test = problem
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double())

    def ensemble(seed: int) -> IntegratedInfluence:
        return IntegratedInfluence(task, train, progress=False, path=PathSettings(steps=2),
                                   projection=ProjectionSettings(dim=8), models=models,
                                   seed=seed)

    method = ensemble(0)
    first = method.attribute(test)  # members copied with seed 0
    method.seed = 7
    changed = method.attribute(test)
    _same_scores(changed, ensemble(7).attribute(test))
    assert not np.allclose(changed.scores, first.scores)
    assert all(m.seed == 7 for m in method.members())
