"""Hostile inputs through the user's entry point, ``iif attribute``: each gets a clear error (exit
code 1, one line naming the problem) or a correct recovery, and no finished chunk is lost.

Elsewhere: corrupt chunks and SIGKILL (tests/results/test_store.py), a dying torchrun rank
(tests/runs/test_distributed.py), the validation rules one by one (tests/task/test_task.py).
"""

from __future__ import annotations

import logging
import textwrap

import numpy as np
import pytest
import tiny_job
import torch
from torch import nn

import iif
from iif import Attribution, CurvatureSettings, IntegratedInfluence
from iif.runs.cli import main

JOB_HEADER = """
import numpy as np
import torch
from torch import nn
import tiny_job

"""

JOBS = {
    "wrong_shape": """
def job():
    task, train, test = tiny_job.problem()
    return task, train, (np.zeros((3, 5)), np.zeros(3, dtype=int))
""",
    "nan_inputs": """
def job():
    task, (x, y), test = tiny_job.problem()
    x = x.copy(); x[7, 2] = np.nan
    return task, (x, y), test
""",
    "inf_test_inputs": """
def job():
    task, train, (xt, yt) = tiny_job.problem()
    xt = xt.copy(); xt[1, 0] = np.inf
    return task, train, (xt, yt)
""",
    "labels_out_of_range": """
def job():
    task, (x, y), test = tiny_job.problem()
    y = y.copy(); y[3] = 7
    return task, (x, y), test
""",
    "empty_test": """
def job():
    task, train, test = tiny_job.problem()
    return task, train, (np.zeros((0, 4)), np.zeros(0, dtype=int))
""",
    "not_differentiable": """
class Rounded(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        return self.inner(x).detach()

def job():
    task, train, test = tiny_job.problem()
    task.model = Rounded(task.model)
    return task, train, test
""",
    "nan_for_one_test_sample": """
class Poisoned(nn.Module):
    # finite everywhere except on inputs whose first feature is above 50: the model itself
    # produces NaN there, so the test gradient of that sample is NaN
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        out = self.inner(x)
        bad = (x[:, :1] > 50).to(out.dtype)
        return out + torch.sqrt(-bad)

def job():
    task, train, (xt, yt) = tiny_job.problem()
    task.model = Poisoned(task.model)
    xt = xt.copy(); xt[5, 0] = 60.0
    return task, train, (xt, yt)
""",
}

ERRORS = {
    "wrong_shape": "test data inputs have the per-sample shape (5,), the training inputs (4,)",
    "nan_inputs": "training data inputs contain NaN or inf (1 samples)",
    "inf_test_inputs": "test data inputs contain NaN or inf",
    "labels_out_of_range": "labels out of range: found [0, 7], expected 0..2",
    "empty_test": "test data is empty",
    "not_differentiable": "does not depend differentiably on its parameters",
    "nan_for_one_test_sample": "test gradients contain NaN or inf",
}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str) -> str:
        (tmp_path / f"hostile_{name}.py").write_text(JOB_HEADER + textwrap.dedent(JOBS[name]))
        return f"hostile_{name}:job"

    return write


@pytest.mark.parametrize("name", sorted(JOBS))
def test_hostile_job_gets_a_clear_error(name, hostile, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["attribute", "--task", hostile(name), "--out", str(out), "--chunk", "1",
                 "--proj-dim", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert ERRORS[name] in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("iif: error: ") and "Traceback" not in err  # one line, no trace
    if name == "nan_for_one_test_sample":
        # test samples 0-4 finished before sample 5 failed: their chunks are kept, and fixing
        # the data is a fresh run (other inputs), never a mix
        assert len(list((out / "chunks").glob("*.json"))) == 5


def test_dropout_in_train_mode_warns_and_uses_eval_for_gradients(caplog):
    task, train, test = tiny_job.problem()
    torch.manual_seed(0)
    noisy = nn.Sequential(task.model[0], nn.Dropout(0.5), task.model[1], task.model[2])
    noisy.train()
    with caplog.at_level(logging.WARNING, logger="iif"):
        method = tiny_job.method(iif.Task(noisy, "classification", task.recipe), train)
    assert "train mode" in caplog.text and "eval mode" in caplog.text
    eval_copy = nn.Sequential(task.model[0], nn.Dropout(0.5), task.model[1], task.model[2])
    a = method.attribute(test)
    b = tiny_job.method(iif.Task(eval_copy.eval(), "classification", task.recipe),
                        train).attribute(test)
    # features and scores come from the deterministic (eval) network either way; only the
    # dropout draws of the training epochs differ, so both see the same test gradients
    assert np.isfinite(a.scores).all()
    assert noisy.training  # the user's flag is left as it was
    np.testing.assert_allclose(a.completeness["delta"] != 0, b.completeness["delta"] != 0)


def test_single_training_sample_works():
    task, (x, y), test = tiny_job.problem()
    result = IntegratedInfluence(task, (x[:1], y[:1]), progress=False).attribute(test)
    assert result.scores.shape == (len(test[0]), 1) and np.isfinite(result.scores).all()


def test_curvature_that_is_not_positive_definite_is_retried_and_reported(caplog):
    task, train, test = tiny_job.problem()
    # zero damping on an unprojected Fisher of rank <= 200 in 115 dims may still be singular
    # in float64 after cancellation; a negative-free but singular curvature must be retried
    with caplog.at_level(logging.WARNING, logger="iif"):
        result = IntegratedInfluence(
            task, (train[0][:20], train[1][:20]), progress=False,
            curvature=CurvatureSettings(damping=0.0)).attribute(test)
    assert result.info["damping_retries"] > 0
    assert min(result.info["damping"]) > 0
    assert "damping" in caplog.text
    assert np.isfinite(result.scores).all()


def test_finished_chunks_survive_a_failing_rerun(hostile, tmp_path, capsys):
    """A good run's folder is never damaged by a later bad command aimed at it."""
    out = tmp_path / "out"
    assert main(["attribute", "--task", "tiny_job:job", "--out", str(out), "--chunk", "2",
                 "--proj-dim", "16", "--no-progress"]) == 0
    before = Attribution.load(out).scores.copy()
    files = sorted(p.name for p in (out / "chunks").iterdir())
    for name in ("labels_out_of_range", "nan_for_one_test_sample"):
        assert main(["attribute", "--task", hostile(name), "--out", str(out), "--chunk", "2",
                     "--proj-dim", "16", "--no-progress"]) == 1
    capsys.readouterr()
    assert sorted(p.name for p in (out / "chunks").iterdir()) == files
    np.testing.assert_array_equal(Attribution.load(out).scores, before)


class _Trap:
    """Unpickling this object creates a file: proof that code ran while loading."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_unsafe_checkpoint_is_refused_without_running_its_code(tmp_path):
    from iif.engine.functional import FunctionalModel
    from iif.errors import InputError
    from iif.methods.tracin.checkpoints import Checkpoint

    task, _, _ = tiny_job.problem()
    fmodel = FunctionalModel(task.model)
    marker = tmp_path / "code-ran"
    state = fmodel.state()
    torch.save({"params": state.params, "buffers": state.buffers, "extra": _Trap(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights_only=True"):
        Checkpoint(1, 0.1, path=tmp_path / "evil.pt").load(fmodel)
    assert not marker.exists()
    # the trap is real: a plain unpickling runs it
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
