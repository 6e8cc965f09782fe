"""The result store: chunked, checksummed, resumable, and refusing to mix runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_job
import torch

import iif
from iif import BaselineSettings, IntegratedInfluence, PathSettings
from iif.errors import InputError
from iif.results.runkey import RunKey
from iif.results.store import CHUNKS, MANIFEST, ResultStore, attribute_to

HERE = Path(__file__).resolve().parents[1]  # tests/, where tiny_job.py is


@pytest.fixture(scope="module")
def problem():
    task, train, test = tiny_job.problem()
    whole = tiny_job.method(task, train, test_batch=1).attribute(test)
    return tiny_job, task, train, test, whole


def _json_chunks(folder: Path) -> list[Path]:
    return sorted((folder / CHUNKS).glob("*.json"))


def test_chunked_run_equals_one_call_and_is_saved(problem, tmp_path):
    mod, task, train, test, whole = problem
    result = attribute_to(tmp_path, mod.method(task, train), test, chunk=4)
    np.testing.assert_allclose(result.scores, whole.scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.completeness["delta"], whole.completeness["delta"],
                               rtol=1e-10)
    assert len(_json_chunks(tmp_path)) == 2  # rows 0-3 and 4-5
    loaded = iif.Attribution.load(tmp_path)
    np.testing.assert_array_equal(loaded.scores, result.scores)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["bounds"] == [0, 4, 6] and manifest["settings"]["method"] == "iif"


def test_rerun_skips_finished_chunks_and_recomputes_damaged_ones(problem, tmp_path,
                                                                 monkeypatch):
    mod, task, train, test, whole = problem
    attribute_to(tmp_path, mod.method(task, train), test, chunk=2)
    calls = []
    original = IntegratedInfluence.attribute

    def counting(self, data, **kw):
        calls.append(len(data[0]))
        return original(self, data, **kw)

    monkeypatch.setattr(IntegratedInfluence, "attribute", counting)
    again = attribute_to(tmp_path, mod.method(task, train), test, chunk=2)
    assert calls == []
    np.testing.assert_allclose(again.scores, whole.scores, rtol=1e-10, atol=1e-14)
    # truncate one chunk and flip a byte of another: both are detected and recomputed
    first, second = sorted((tmp_path / CHUNKS).glob("*.npy"))[:2]
    first.write_bytes(first.read_bytes()[:-40])
    data = bytearray(second.read_bytes())
    data[-3] ^= 0xFF
    second.write_bytes(bytes(data))
    repaired = attribute_to(tmp_path, mod.method(task, train), test, chunk=2)
    assert calls == [2, 2]
    np.testing.assert_allclose(repaired.scores, whole.scores, rtol=1e-10, atol=1e-14)


def test_other_settings_or_inputs_are_refused(problem, tmp_path):
    mod, task, train, test, _ = problem
    attribute_to(tmp_path, mod.method(task, train), test, chunk=3)
    other = IntegratedInfluence(task, train, path=PathSettings(steps=2), progress=False)
    with pytest.raises(InputError, match=r"different settings \(path.steps: 3 -> 2"):
        attribute_to(tmp_path, other, test, chunk=3)
    moved = (test[0] + 0.01, test[1])
    with pytest.raises(InputError, match="different test data"):
        attribute_to(tmp_path, mod.method(task, train), moved, chunk=3)
    with pytest.raises(InputError, match=r"another chunking \(--chunk\)"):
        attribute_to(tmp_path, mod.method(task, train), test, chunk=2)


def test_shared_baseline_is_one_chunk(problem, tmp_path):
    mod, task, train, test, _ = problem
    shared = IntegratedInfluence(task, train, baseline=BaselineSettings(mode="shared"),
                                 progress=False)
    with pytest.raises(InputError, match="shared baseline"):
        attribute_to(tmp_path, shared, test, chunk=2)
    result = attribute_to(tmp_path, shared, test)
    assert result.scores.shape == (len(test[0]), len(train[0]))


def test_ranks_split_the_chunks(problem, tmp_path):
    mod, task, train, test, whole = problem
    assert attribute_to(tmp_path, mod.method(task, train), test, chunk=1, ranks=(1, 2)) is None
    assert len(_json_chunks(tmp_path)) == 3  # rows 1, 3, 5
    result = attribute_to(tmp_path, mod.method(task, train), test, chunk=1, ranks=(0, 1))
    np.testing.assert_allclose(result.scores, whole.scores, rtol=1e-10, atol=1e-14)


def test_store_rejects_bad_bounds_and_shapes(tmp_path):
    key = RunKey({"x": "h"})
    with pytest.raises(InputError, match="bounds"):
        ResultStore(tmp_path, method="x", settings={}, key=key, n_test=4, n_train=3,
                    bounds=[0, 2, 2, 4])
    with ResultStore(tmp_path, method="x", settings={}, key=key, n_test=4, n_train=3,
                     bounds=[0, 2, 4]) as store:
        with pytest.raises(InputError, match="shape"):
            store.write(0, 2, iif.Attribution(np.zeros((2, 4)), "x"))
        with pytest.raises(InputError, match="not finished"):
            store.assemble()
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match=r"damaged manifest manifest.json \(not valid JSON"):
        ResultStore(tmp_path, method="x", settings={}, key=key, n_test=4, n_train=3,
                    bounds=[0, 2, 4])


CHILD = textwrap.dedent('''
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import tiny_job
    from iif.results.store import attribute_to
    task, train, test = tiny_job.problem(n_test=int(sys.argv[3]))
    attribute_to(sys.argv[1], tiny_job.method(task, train, test_batch=1), test, chunk=1)
''')


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    """A child attributing one test sample per chunk is killed with SIGKILL once a random
    number of chunks are on disk; the rerun finishes and equals an uninterrupted run."""
    folder, mod = HERE, tiny_job
    n_test = 12
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    kill_after = random.Random(os.getpid()).randint(1, n_test - 3)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(folder), str(n_test)],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / CHUNKS).exists() and len(_json_chunks(out)) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = len(_json_chunks(out))
    assert kill_after <= finished < n_test
    rerun = subprocess.run([sys.executable, str(script), str(out), str(folder), str(n_test)],
                           capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    task, train, test = mod.problem(n_test=n_test)
    torch.set_num_threads(1)
    whole = mod.method(task, train, test_batch=1).attribute(test)
    np.testing.assert_allclose(iif.Attribution.load(out).scores, whole.scores, rtol=1e-9,
                               atol=1e-13)
    assert not list((out / CHUNKS).glob(".*.tmp"))
