"""As under torchrun, two gloo processes on loopback retrain the LDS ground truth's chunks of
models between them (``iif_paper.lds_job``) and give the single-process result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tiny_job
from ranks import run_ranks

TESTS = Path(__file__).resolve().parents[1]  # tiny_job.py

LDS_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
import tiny_job
from iif.runs.distributed import world
from iif_paper.lds_job import ground_truth_job
from iif.evaluation import RetrainSettings

task, train, test = tiny_job.problem()
truth = ground_truth_job(task, train, test, RetrainSettings(n_subsets=6, batch_models=2,
                         epochs=3), cache_dir=sys.argv[1])
if world()[0] == 0:
    np.save(sys.argv[2], truth.losses)
"""


def test_lds_ground_truth_over_two_ranks_equals_one_process(tmp_path):
    from iif.evaluation import RetrainSettings, ground_truth

    script = tmp_path / "lds.py"
    script.write_text(LDS_SCRIPT)
    run = run_ranks([str(script), str(tmp_path / "cache"), str(tmp_path / "losses.npy")],
                    cwd=TESTS)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    task, train, test = tiny_job.problem()
    alone = ground_truth(task, train, test, RetrainSettings(n_subsets=6, batch_models=2,
                                                            epochs=3))
    np.testing.assert_allclose(np.load(tmp_path / "losses.npy"), alone.losses, rtol=1e-10)
    # both ranks trained: the three chunks of two models came from two processes
    assert len(list((tmp_path / "cache").glob("*/losses_*.npy"))) == 3

