"""``iif show --task`` and ``iif report --task`` draw the task's samples and the task's model's
predictions beside the scores: they refuse a task whose model or data are not the ones the
scores were computed with (the run key the folder records says), and say in one warning line
when the folder records nothing to check against."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_job

from iif.errors import InputError
from iif.results.attribution import Attribution
from iif.results.store import MANIFEST, open_store
from iif.runs.cli import main
from iif.views.html_report import REPORT_FILE, report_folder
from iif.views.show import show

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = '''
import copy
import functools

import numpy as np
import torch

import tiny_job


@functools.cache
def _base():
    return tiny_job.problem()


def same():
    return copy.deepcopy(_base())


def other_weights():
    task, train, test = copy.deepcopy(_base())
    with torch.no_grad():
        task.model[0].bias.add_(1e-3)
    return task, train, test


def other_activation():
    task, train, test = copy.deepcopy(_base())
    task.model[1] = torch.nn.Softsign()  # no parameters: only the outputs differ
    return task, train, test


def other_order():
    task, (x, y), test = copy.deepcopy(_base())
    order = np.roll(np.arange(len(y)), 1)
    return task, (x[order], y[order]), test
'''


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The task functions and a result folder scored with ``same``'s model and data."""
    root = tmp_path_factory.mktemp("check")
    module = root / "variants.py"
    module.write_text(VARIANTS)
    task, train, test = tiny_job.problem()
    method = tiny_job.method(task, train)
    rng = np.random.default_rng(0)
    folder = root / "scored"
    with open_store(folder, method, method.validate_test(test)) as store:
        for lo, hi in store.chunks:
            store.write(lo, hi, Attribution(rng.normal(size=(hi - lo, len(train[1]))), "iif",
                                            method.settings()))
        store.assemble()
    return module, folder


def _copy(folder, to, manifest: bool = True):
    import shutil

    shutil.copytree(folder, to)
    if not manifest:
        (to / MANIFEST).unlink()
    return to


def test_the_task_the_result_was_computed_with_is_accepted(variants, tmp_path):
    module, folder = variants
    folder = _copy(folder, tmp_path / "res")
    text = show(folder, task=f"{module}:same", test_indices=[0], image_shape=(2, 2))
    assert "warning" not in text and (folder / "show_0.png").exists()
    report_folder(folder, task=f"{module}:same", image_shape=(2, 2))
    assert 'class="warning"' not in (folder / REPORT_FILE).read_text(encoding="utf-8")


def test_another_models_weights_are_refused(variants, tmp_path):
    module, folder = variants
    folder = _copy(folder, tmp_path / "res")
    spec = f"{module}:other_weights"
    want = (f"{folder} was scored with another model (parameters differ) than the task in "
            f"{spec}; pass the task the result was computed with")
    with pytest.raises(InputError) as caught:
        show(folder, task=spec, test_indices=[0], image_shape=(2, 2))
    assert str(caught.value) == want
    assert not (folder / "show_0.png").exists()
    with pytest.raises(InputError) as caught:
        report_folder(folder, task=spec, image_shape=(2, 2))
    assert str(caught.value) == want
    assert not (folder / REPORT_FILE).exists()


def test_a_model_differing_only_outside_its_parameters_is_refused(variants, tmp_path):
    module, folder = variants
    folder = _copy(folder, tmp_path / "res")
    spec = f"{module}:other_activation"
    with pytest.raises(InputError, match=(
            f"^{folder} was scored with another model \\(the same parameters, but other "
            f"outputs on the first 8 training and test samples")):
        show(folder, task=spec, test_indices=[0], image_shape=(2, 2))


def test_another_training_order_is_refused_also_without_the_manifest(variants, tmp_path,
                                                                    capsys):
    module, folder = variants
    spec = f"{module}:other_order"
    for manifest in (False, True):  # without it, the chunk records still hold the run key
        res = _copy(folder, tmp_path / f"res-{manifest}", manifest=manifest)
        with pytest.raises(InputError, match=(
                f"^{res} was scored on other training data \\(other samples, or the same in "
                f"another order\\) than the task in {spec}; pass the task the result was")):
            show(res, task=spec, test_indices=[0], image_shape=(2, 2))
        assert main(["report", str(res), "--task", spec, "--image-shape", "2", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was scored on other training data" in err[0]
        assert not (res / REPORT_FILE).exists()


def test_a_folder_recording_no_run_key_is_shown_with_a_warning(variants, tmp_path, capsys):
    module, folder = variants
    saved = Attribution.load(folder)
    saved.info.pop("run_key")
    saved.save(tmp_path / "old")  # no manifest, no chunks: nothing to check the task against
    spec = f"{module}:other_order"
    text = show(tmp_path / "old", task=spec, test_indices=[0], image_shape=(2, 2))
    warnings = [line for line in text.splitlines() if "records no run key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and spec in warnings[0]
    assert main(["report", str(tmp_path / "old"), "--task", spec, "--image-shape", "2",
                 "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no run key" in err[0]
    page = (tmp_path / "old" / REPORT_FILE).read_text(encoding="utf-8")
    assert "records no run key" in page
