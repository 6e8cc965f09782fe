"""The result format: JSON schema, the report, atomic files, the registry."""

from __future__ import annotations

import json

import pytest

from iif.errors import InputError
from iif_paper.experiments import EXPERIMENTS, get_experiment, run_experiment
from iif_paper.experiments.base import ExperimentResult


def _result(**changes) -> ExperimentResult:
    fields = {
        "name": "demo_table",
        "scale": "smoke",
        "title": "A table",
        "settings": {"n": 3, "nested": {"x": float("nan")}},
        "results": {"IIF": {"a": 0.5, "b": float("inf")}, "IF": {"a": 0.25, "b": 0.125}},
        "paper": {"IIF": {"a": 0.75, "b": None}, "IF": {"a": 0.5, "b": 0.3}},
        "stderr": {"IIF": {"a": 0.01, "b": None}, "IF": {"a": 0.02, "b": 0.03}},
        "protocol": "We ran it.",
        "differences": "Ours are lower.",
    }
    fields.update(changes)
    return ExperimentResult(**fields)


def test_json_schema_and_report(tmp_path):
    result = _result(variants={"IIF (lambda=2)": {"a": 0.4}}, seconds=1.25)
    result.write(tmp_path)
    doc = json.loads((tmp_path / "demo_table.json").read_text())
    assert set(doc) == {"name", "scale", "settings", "results", "paper", "stderr", "variants",
                        "seconds", "notes", "files"}
    assert doc["name"] == "demo_table" and doc["scale"] == "smoke"
    assert doc["results"]["IIF"] == {"a": 0.5, "b": None}  # inf is not JSON: null
    assert doc["settings"]["nested"]["x"] is None
    assert doc["paper"]["IF"] == {"a": 0.5, "b": 0.3}
    assert doc["notes"][0] == "Ours are lower."
    assert doc["files"] == ["demo_table.md"]
    report = (tmp_path / "demo_table.md").read_text()
    assert "# A table" in report and "We ran it." in report and "Ours are lower." in report
    assert "| IF | 0.250 ± 0.020 (0.500) | 0.125 ± 0.030 (0.300) |" in report
    assert "IIF (lambda=2)" in report
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_minimal_result_has_only_the_required_keys(tmp_path):
    result = _result(stderr=None, differences="", name="bare")
    doc = json.loads(json.dumps(result.to_dict()))
    assert set(doc) == {"name", "scale", "settings", "results", "paper", "files"}
    assert "IIF" in result.summary() and "0.500 (0.750)" in result.summary()


def test_result_rejects_bad_scale_and_missing_paper_rows():
    with pytest.raises(InputError, match="scale"):
        _result(scale="medium")
    with pytest.raises(InputError, match="paper numbers missing"):
        _result(paper={"IIF": {"a": 0.1}})


def test_output_path_that_is_a_file_is_rejected(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        _result().write(target)


def test_registry_and_unknown_names(tmp_path):
    assert {"table1", "table4", "fig1"} <= set(EXPERIMENTS)
    for name, module in EXPERIMENTS.items():
        assert module.NAME == name and callable(module.run) and module.TITLE
    with pytest.raises(InputError, match="table1, table4, fig1"):
        get_experiment("nonsense")
    with pytest.raises(InputError, match="scale"):
        run_experiment("fig1", tmp_path, scale="medium")


def test_summary_shows_ours_beside_the_paper():
    lines = _result().summary().splitlines()
    assert lines[0].split() == ["method", "a", "b"]
    assert lines[1].split() == ["IIF", "0.500", "(0.750)", "nan"]  # no paper number for b
    assert lines[2].split() == ["IF", "0.250", "(0.500)", "0.125", "(0.300)"]
