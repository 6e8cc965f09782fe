"""Jobs from task functions and settings from TOML: every mistake named, nothing ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_job

from iif import TRAK, InfluenceFunction, IntegratedInfluence
from iif.errors import InputError
from iif.runs.config import build_method, load_settings, merge
from iif.task.job import Job, load_job

JOB_FILE = Path(tiny_job.__file__)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_job_from_a_module_or_a_file(tmp_path):
    job = load_job("tiny_job:job")
    assert isinstance(job, Job) and len(job.test[0]) == tiny_job.N_TEST
    assert load_job(f"{JOB_FILE}:job").source.endswith("tiny_job.py:job")
    tuple_file = _write(tmp_path, "t.py", "import tiny_job\n"
                        "def make():\n    return tiny_job.problem(3)\n")
    assert len(load_job(f"{tuple_file}:make").test[0]) == 3


@pytest.mark.parametrize(("body", "match"), [
    ("def f():\n    return 3\n", "must return"),
    ("def f():\n    return {'task': 1, 'train': 2}\n", "keys task, train, test"),
    ("def f():\n    return (1, 2, 3)\n", "not an iif.Task"),
    ("f = 3\n", "no function"),
])
def test_bad_task_functions_are_named(tmp_path, body, match):
    path = _write(tmp_path, "bad.py", body)
    with pytest.raises(InputError, match=match):
        load_job(f"{path}:f")


def test_bad_task_specs(tmp_path):
    with pytest.raises(InputError, match="MODULE:FUNCTION"):
        load_job("tiny_job")
    with pytest.raises(InputError, match="cannot import"):
        load_job("no_such_module_here:job")
    with pytest.raises(InputError, match="no such file"):
        load_job(f"{tmp_path}/missing.py:job")


def test_settings_from_toml_build_the_method(tmp_path):
    settings = load_settings(_write(tmp_path, "s.toml", tiny_job.SETTINGS))
    job = load_job("tiny_job:job")
    method = build_method(job, merge(settings, {"test_batch": 2, "seed": 3}))
    assert isinstance(method, IntegratedInfluence)
    assert method.path.steps == 3 and method.projection.dim == 32
    assert method.test_batch == 2 and method.seed == 3
    # flags win over the file; dotted keys reach sections; None leaves a value alone
    merged = merge(settings, {"projection.dim": 8, "method": None, "chunk": 4})
    assert merged["projection"]["dim"] == 8 and merged["method"] == "iif"
    assert settings["projection"]["dim"] == 32
    assert isinstance(build_method(job, {"method": "trak", "projection": {"dim": 8}}), TRAK)
    with pytest.raises(InputError, match="method 'trak'.*'path'"):
        build_method(job, merge(merged, {"method": "trak"}))  # TRAK has no path
    proj = build_method(job, {"method": "if", "solver": "projected", "projection": {"dim": 8}})
    assert isinstance(proj, InfluenceFunction) and proj.solver == "projected"


@pytest.mark.parametrize(("settings", "match"), [
    ({"method": "loo"}, "method must be one of"),
    ({"projection": {"dims": 3}}, r"unknown key\(s\) \['dims'\] in \[projection\]"),
    ({"baselines": {"lam": 1}}, r"unknown settings section \[baselines\]"),
    ({"projection": 3}, "must be a table"),
    ({"not_an_option": 1}, "not_an_option"),
    ({"method": "tracin"}, "TracIn needs checkpoints"),
    ({"test_batch": 0}, "test_batch"),
])
def test_bad_settings_are_named(settings, match):
    with pytest.raises(InputError, match=match):
        build_method(load_job("tiny_job:job"), settings)


def test_invalid_toml(tmp_path):
    with pytest.raises(InputError, match="not valid TOML"):
        load_settings(_write(tmp_path, "s.toml", "method = \n"))
