"""IIF's path features take N x P values, never N x M: measured as peak resident memory.

``step_features`` computes the two features u and psi of every training sample at one path
point. Here N = 4,000 samples and an MLP 256-384-10 with M = 102,538 parameters: the per-sample
gradients alone would take N x M x 4 bytes = 1.64 GB (3.3 GB for u and psi), the projected
features 2 x N x P x 4 bytes = 1 MB at P = 32. The peak growth allowed during featurisation is
a few times the features plus a fixed allowance for the chunk in flight (``chunk_size``
samples' Jacobians with the dense projection, nothing N-sized), at least 5 times below N x M x 4
bytes: featurisation that held all per-sample gradients, or a sizeable fraction, fails.

torch's CPU allocations are invisible to ``tracemalloc``, so each case runs in a child process
(single-threaded torch) that reads its own peak resident set (``VmHWM``), reset to the current
resident set just before featurisation through ``/proc/self/clear_refs``. Where the reset is
not allowed, the growth is taken from the resident set before featurisation to the peak after,
which can only overstate it. A control allocation of the bound's size in the same child shows
that the measurement sees an allocation of that size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

MIB = 2**20
N, D_IN, HIDDEN, CLASSES, P = 4000, 256, 384, 10, 32
M = D_IN * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES  # 102,538
FIXED_ALLOWANCE = 64 * MIB  # allocator arenas, vmap workspaces, one 16 MiB projection block
FEATURE_FACTOR = 4  # u, psi and a copy or two of a chunk's projected rows
JACOBIAN_FACTOR = 6  # the chunk's (c, 2, M) Jacobians, the matmul's copy and vmap buffers
# the dense case bounds its chunk memory by a small chunk; the kronecker case takes chunks of
# 512 samples, whose per-sample gradients alone (2 x 512 x M x 4 bytes = 420 MB) would exceed
# its bound: it must not form any
CASES = {"dense": 32, "kronecker": 512}

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from iif import ProjectionSettings, Task
    from iif.engine.features import step_features
    from iif.engine.functional import FunctionalModel
    from iif.engine.projection import make_projector

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key + " not in /proc/self/status")

    def reset_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak resident set := current resident set
            return True
        except OSError:
            return False

    structure, n, d_in, hidden, classes, dim, chunk = sys.argv[1:8]
    n, d_in, hidden, classes, dim, chunk = map(int, (n, d_in, hidden, classes, dim, chunk))
    control_bytes = int(sys.argv[8])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    task = Task(model, "classification")
    data = task.validate((torch.randn(n, d_in), torch.randint(0, classes, (n,))))
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    projector = make_projector(fmodel.num_params, ProjectionSettings(dim=dim, structure=structure),
                               "cpu", torch.float32, fmodel)
    rho, rho_prev = data.targets, 0.5 * data.targets
    # one chunk first: one-off allocations (vmap, kernels) are not featurisation's growth
    step_features(fmodel, state, data.x[:chunk], rho[:chunk], rho_prev[:chunk], task, projector,
                  chunk_size=chunk, progress=False)
    reset = reset_peak()
    before = status("VmRSS")
    u, psi = step_features(fmodel, state, data.x, rho, rho_prev, task, projector,
                           chunk_size=chunk, progress=False)
    growth = status("VmHWM") - before
    reset_peak()
    before_control = status("VmRSS")
    block = torch.ones(control_bytes // 4)
    control = status("VmHWM") - before_control
    del block
    print(json.dumps({
        "num_params": fmodel.num_params, "dim": projector.dim, "growth": growth,
        "control": control, "reset": reset, "shape": list(u.shape) + list(psi.shape),
        "finite": bool(torch.isfinite(u).all() and torch.isfinite(psi).all()),
    }))
""")


def bound(structure: str, dim: int) -> int:
    """Bytes featurisation may add to the peak resident set."""
    features = 2 * N * dim * 4
    allowance = FIXED_ALLOWANCE
    if structure == "dense":
        allowance += JACOBIAN_FACTOR * CASES["dense"] * 2 * M * 4
    return FEATURE_FACTOR * features + allowance


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, Any]]:
    """Both cases in concurrent single-threaded children (about 6 s on 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {
        structure: subprocess.Popen(
            [sys.executable, "-c", CHILD, structure, *map(str, (N, D_IN, HIDDEN, CLASSES, P,
                                                                  chunk, bound(structure, P)))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for structure, chunk in CASES.items()
    }
    out = {}
    for structure, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[structure] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_configuration_makes_the_bound_meaningful() -> None:
    # an N x M float32 matrix is over 1.5 GB and at least 5 times every bound, so a
    # featurisation that held one (or a fifth of one) could not pass
    assert N * M * 4 > 1.5e9
    for structure in CASES:
        assert N * M * 4 >= 5 * bound(structure, P), structure
    # the kronecker bound is below even one chunk of per-sample gradients
    assert 2 * CASES["kronecker"] * M * 4 > bound("kronecker", P)


@pytest.mark.parametrize("structure", list(CASES))
def test_step_features_memory_is_n_by_p(structure: str,
                                        measured: dict[str, dict[str, Any]]) -> None:
    res = measured[structure]
    assert res["num_params"] == M
    dim = res["dim"]
    assert res["shape"] == [N, dim, N, dim] and res["finite"]
    limit = bound(structure, dim)
    # the measurement sees an allocation of the bound's size
    assert res["control"] >= 0.9 * bound(structure, P), res
    assert res["growth"] <= limit, (
        f"{structure}: featurisation grew the peak resident set by {res['growth'] / MIB:.0f} "
        f"MiB, above the bound {limit / MIB:.0f} MiB (N x P features: "
        f"{2 * N * dim * 4 / MIB:.1f} MiB; N x M gradients would be {N * M * 4 / MIB:.0f} MiB)"
    )
