"""The MNIST experiments at smoke scale on a fake MNIST folder (no real data needed)."""

from __future__ import annotations

import json
import math

import pytest

from iif.runs.cli import main
from iif_paper.data.mnist import ENV_VAR, write_fake_mnist


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    folder = write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=400, n_test=60)
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_VAR, str(folder))
    yield folder
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["table2", "table3", "fig2", "contrast"])
def test_mnist_experiment_smoke(fake_mnist, tmp_path, name):
    assert main(["reproduce", name, "--scale", "smoke", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(data) >= {"name", "scale", "settings", "results", "paper"}
    assert data["name"] == name and data["scale"] == "smoke"
    for method, row in data["results"].items():
        for column, value in row.items():
            assert isinstance(value, float) and math.isfinite(value), (method, column)
    assert (tmp_path / f"{name}.md").read_text().strip()


@pytest.mark.slow
def test_table3_runs_cifar10_from_a_batches_folder(fake_mnist, tmp_path, monkeypatch):
    from iif_paper.data.cifar import write_fake_cifar10

    folder = write_fake_cifar10(tmp_path / "cifar-10-batches-py", per_batch=30)
    monkeypatch.setenv("IIF_CIFAR10_DIR", str(folder))
    assert main(["reproduce", "table3", "--scale", "smoke", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    data = json.loads((tmp_path / "out" / "table3.json").read_text())
    for method in ("IF", "TracIn", "TRAK", "IIF"):
        value = data["results"][method]["CIFAR-10"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert data["settings"]["cifar10_dir"] == str(folder)
