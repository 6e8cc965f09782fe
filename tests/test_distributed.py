"""``iif attribute`` under torchrun: two gloo processes on loopback give the single-process
result, and a rank that dies leaves finished chunks that a rerun completes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_job

from iif import Attribution

HERE = Path(__file__).parent

DYING = """
import os, signal, sys
from pathlib import Path
import tiny_job
from iif.distributed import world

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


def _torchrun(task: str, out: Path, settings: Path, timeout: float = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "iif", "--no-progress", "attribute", "--task", task, "--out", str(out),
           "--settings", str(settings), "--chunk", "1", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd=HERE)


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
