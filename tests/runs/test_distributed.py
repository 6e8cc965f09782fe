"""Under torchrun, two gloo processes on loopback give the single-process result: per-test IIF
(test samples split) and shared-baseline IIF (training set split, curvature all-reduced); a rank
that dies leaves finished chunks that a rerun completes. (LDS ground truth under torchrun:
tests/paper/test_lds_job.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_job
from ranks import run_ranks

from iif import Attribution, BaselineSettings
from iif.runs.distributed import world

HERE = Path(__file__).resolve().parents[1]  # tests/, where tiny_job.py is

DYING = """
import os, signal, sys
from pathlib import Path
import tiny_job
from iif.runs.distributed import world

def job():
    found = tiny_job.job()
    rank, _ = world()
    chunks = Path(sys.argv[sys.argv.index("--out") + 1]) / "chunks"

    def die_midway(module, inputs, output):
        # rank 1 dies once two chunks are finished, in the middle of its next one
        if rank == 1 and len(list(chunks.glob("*.json"))) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)

    found["task"].model.register_forward_hook(die_midway)
    return found
"""


def _torchrun(task: str, out: Path, settings: Path, timeout: float = 240, chunk: int | None = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "iif", "--no-progress", "attribute", "--task", task, "--out", str(out),
           "--settings", str(settings), "--threads", "1"]
    cmd += [] if chunk is None else ["--chunk", str(chunk)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd=HERE)


def _ranks(task: str, out: Path, settings: Path, chunk: int | None = 1):
    """The ranks of :func:`_torchrun`'s command without the launcher (tests/ranks.py)."""
    args = ["-m", "iif", "--no-progress", "attribute", "--task", task, "--out", str(out),
            "--settings", str(settings), "--threads", "1"]
    return run_ranks(args + ([] if chunk is None else ["--chunk", str(chunk)]), cwd=HERE)


@pytest.fixture(scope="module")
def single():
    task, train, test = tiny_job.problem()
    return tiny_job.method(task, train).attribute(test)


def test_two_ranks_equal_one_process(tmp_path, single):
    settings = tmp_path / "s.toml"
    settings.write_text(tiny_job.SETTINGS)
    run = _torchrun("tiny_job:job", tmp_path / "out", settings)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    got = Attribution.load(tmp_path / "out")
    np.testing.assert_allclose(got.scores, single.scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.completeness["delta"], single.completeness["delta"],
                               rtol=1e-10)


def test_a_dead_rank_fails_the_job_and_a_rerun_resumes(tmp_path, single):
    settings = tmp_path / "s.toml"
    settings.write_text(tiny_job.SETTINGS)
    dying = tmp_path / "dying_job.py"
    dying.write_text(DYING)
    out = tmp_path / "out"
    run = _torchrun(f"{dying}:job", out, settings)
    assert run.returncode != 0
    finished = len(list((out / "chunks").glob("*.json")))
    assert 0 < finished < tiny_job.N_TEST
    assert not (out / "scores.npy").exists()
    rerun = _torchrun("tiny_job:job", out, settings)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    np.testing.assert_allclose(Attribution.load(out).scores, single.scores, rtol=1e-10,
                               atol=1e-14)


SHARED_SETTINGS = tiny_job.SETTINGS + """
[baseline]
mode = "shared"
"""

def test_shared_baseline_splits_the_training_set_over_two_ranks(tmp_path):
    settings = tmp_path / "s.toml"
    settings.write_text(SHARED_SETTINGS)
    run = _ranks("tiny_job:job", tmp_path / "out", settings, chunk=None)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert "rank 1 of 2: training samples 100..199" in run.stderr.decode()
    task, train, test = tiny_job.problem()
    single = tiny_job.method(task, train, baseline=BaselineSettings(mode="shared"))
    expected = single.attribute(test)
    got = Attribution.load(tmp_path / "out")
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-9,
                               atol=1e-12 * np.abs(expected.scores).max())
    np.testing.assert_allclose(got.completeness["sum"], expected.completeness["sum"],
                               rtol=1e-9)


@pytest.mark.parametrize(("settings_text", "name"), [
    ('method = "trak"\n[projection]\ndim = 16\n', "trak"),
    ('method = "if"\nsolver = "projected"\n[projection]\ndim = 16\n', "if"),
])
def test_trak_and_projected_if_split_the_training_set(tmp_path, settings_text, name):
    from iif.runs.config import build_method, load_settings
    from iif.task.job import load_job

    settings = tmp_path / "s.toml"
    settings.write_text(settings_text)
    run = _ranks("tiny_job:job", tmp_path / "out", settings, chunk=4)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    job = load_job("tiny_job:job")
    expected = build_method(job, load_settings(settings)).attribute(job.test)
    got = Attribution.load(tmp_path / "out")
    assert got.method == name
    log = run.stderr.decode()
    assert "rank 0 of 2: training samples 0..99" in log
    assert "rank 1 of 2: training samples 100..199" in log
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-8,
                               atol=1e-11 * np.abs(expected.scores).max())


@pytest.mark.parametrize(("rank", "size", "said"), [
    ("3", "2", "RANK=3 with WORLD_SIZE=2: RANK must be in 0..WORLD_SIZE-1; launch with "
               "torchrun, which sets both"),
    ("2", "2", "RANK=2 with WORLD_SIZE=2: RANK must be in 0..WORLD_SIZE-1"),
    ("-1", "2", "RANK=-1 with WORLD_SIZE=2: RANK must be in 0..WORLD_SIZE-1"),
    ("0", "0", "WORLD_SIZE=0: it must be at least 1"),
    ("0", "-2", "WORLD_SIZE=-2: it must be at least 1"),
    ("one", "2", "RANK='one' and WORLD_SIZE='2' must be integers"),
])
def test_impossible_ranks_are_refused_at_once(rank, size, said, monkeypatch, tmp_path):
    import time
    from types import SimpleNamespace

    import torch

    from iif.errors import InputError
    from iif.runs.distributed import attribute_job

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: joining would only time out
    with pytest.raises(InputError) as caught:
        world()
    assert str(caught.value).startswith(said)
    method = SimpleNamespace(task=SimpleNamespace(device=torch.device("cpu")))
    start = time.monotonic()
    with pytest.raises(InputError) as caught:
        attribute_job(tmp_path, method, None, peer_timeout_s=20)
    assert str(caught.value).startswith(said) and "did not join" not in str(caught.value)
    assert time.monotonic() - start < 5


def test_ranks_in_range_are_taken(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world() == (1, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert world() == (0, 1)


def test_a_rank_without_a_world_size_is_refused(monkeypatch):
    from iif.errors import InputError

    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match=r"^RANK=2 with WORLD_SIZE unset \(1\): RANK must be"):
        world()
