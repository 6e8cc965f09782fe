"""Under torchrun the ranks agree on the run key before anything is written, and a missing peer
fails the job within the stated timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ranks import run_ranks

TESTS = Path(__file__).parents[1]

PER_RANK = """
import numpy as np
import torch
from torch import nn
import tiny_job
from iif.runs.distributed import world

def job():
    task, train, test = tiny_job.problem()
    rank, _ = world()
    if rank == 1:  # a task function that initialises (or trains) differently on one rank
        with torch.no_grad():
            task.model[0].weight.add_(0.01)
    return task, train, test
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_ranks_with_different_models_stop_before_writing(tmp_path):
    (tmp_path / "per_rank.py").write_text(PER_RANK)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "iif", "--no-progress", "attribute", "--task", "per_rank:job", "--out",
           str(out), "--proj-dim", "16", "--chunk", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(),
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert ("the ranks do not attribute the same run: model weights (ranks 1 differ from "
            "rank 0)") in proc.stderr, proc.stderr[-3000:]
    assert not (out / "chunks").exists() or not list((out / "chunks").iterdir())
    assert not (out / "manifest.json").exists()


HIDDEN_PER_RANK = """
import torch
from torch import nn
import tiny_job
from iif import Task
from iif.runs.distributed import world

class Scaled(nn.Module):
    def __init__(self, inner, scale):
        super().__init__()
        self.inner = inner
        self.scale = scale  # a plain tensor attribute: neither a parameter nor a buffer

    def forward(self, x):
        return self.inner(x) * self.scale

def job():
    task, train, test = tiny_job.problem()
    rank, _ = world()
    scale = torch.tensor(1.0 if rank == 0 else 1.5, dtype=torch.float64)
    return Task(Scaled(task.model, scale), "classification", task.recipe), train, test
"""


def test_ranks_whose_models_differ_only_in_a_hidden_attribute_stop_before_writing(tmp_path):
    """Same parameters, buffers and settings on every rank; only the forward's behaviour
    differs, so only the key's probe of the model's behaviour can see it."""
    (tmp_path / "hidden_per_rank.py").write_text(HIDDEN_PER_RANK)
    out = tmp_path / "out"
    proc = run_ranks(["-m", "iif", "--no-progress", "attribute", "--task", "hidden_per_rank:job",
                      "--out", str(out), "--proj-dim", "16", "--chunk", "1", "--threads", "1"],
                     cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert ("the ranks do not attribute the same run: model behaviour (ranks 1 differ from "
            "rank 0)") in err, err[-3000:]
    assert not (out / "chunks").exists() or not list((out / "chunks").iterdir())
    assert not (out / "manifest.json").exists()


MISSING_PEER = textwrap.dedent("""
    import sys
    import tiny_job
    from iif.task.job import Job
    from iif.runs.distributed import attribute_job
    from iif.errors import InputError
    task, train, test = tiny_job.problem()
    try:
        attribute_job(sys.argv[1], tiny_job.method(task, train), Job(task, train, test),
                      peer_timeout_s=3)
    except InputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
""")


def test_a_missing_peer_fails_within_the_peer_timeout(tmp_path):
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29400 + os.getpid() % 500)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", MISSING_PEER, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    waited = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "rank 0 of 2: the other processes did not join within 3 s" in proc.stderr
    assert waited < 60  # seconds, not the hours of a collective timeout
    assert not (tmp_path / "out").exists()
