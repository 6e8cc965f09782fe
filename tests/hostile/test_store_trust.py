"""A stored result is exactly what its run key says: hostile sequences against the result store
(iif.results.store, iif.results.runkey) are refused with a message naming what differs, recomputed,
or resumed bit-equal; never another run's scores with success."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_job
import torch
from torch import nn

import iif
from iif import IntegratedInfluence, PathSettings, ProjectionSettings, TracIn
from iif.errors import InputError
from iif.methods.tracin.checkpoints import load_checkpoints, train_with_checkpoints
from iif.results.chunks import LOCK, FolderLock, record_checksum
from iif.results.runkey import RunKey, run_key, structure_text
from iif.results.store import CHUNKS, MANIFEST, ResultStore, attribute_to

TESTS = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def problem():
    return tiny_job.problem()


def _method(task, train, dim=16, **kw) -> IntegratedInfluence:
    return IntegratedInfluence(task, train, path=PathSettings(steps=2), progress=False,
                               projection=ProjectionSettings(dim=dim), **kw)


def _count_attribute_calls(monkeypatch) -> list[int]:
    """The sizes of the test batches IntegratedInfluence.attribute is called with, from now."""
    calls: list[int] = []
    original = IntegratedInfluence.attribute
    monkeypatch.setattr(IntegratedInfluence, "attribute",
                        lambda self, data, **kw: calls.append(len(data[0]))
                        or original(self, data, **kw))
    return calls


def _records(folder: Path) -> list[Path]:
    return sorted((folder / CHUNKS).glob("rows-*.json"))


# ---- the run key -----------------------------------------------------------------------------
def test_deleting_the_manifest_never_makes_old_chunks_valid_for_a_new_run(problem, tmp_path):
    task, train, test = problem
    first = attribute_to(tmp_path, _method(task, train, dim=16), test, chunk=2)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(InputError, match=r"holds 3 chunk\(s\) of another run but no manifest"):
        attribute_to(tmp_path, _method(task, train, dim=64), test, chunk=2)
    fresh = _method(task, train, dim=64).attribute(test)
    forced = attribute_to(tmp_path, _method(task, train, dim=64), test, chunk=2, force=True)
    np.testing.assert_allclose(forced.scores, fresh.scores, rtol=1e-10, atol=1e-14)
    assert not np.allclose(forced.scores, first.scores)


def test_deleting_the_manifest_of_the_same_run_resumes_from_its_chunks(problem, tmp_path,
                                                                       monkeypatch):
    task, train, test = problem
    first = attribute_to(tmp_path, _method(task, train), test, chunk=2)
    (tmp_path / MANIFEST).unlink()
    calls = []
    monkeypatch.setattr(IntegratedInfluence, "attribute",
                        lambda self, data, **kw: calls.append(1))
    again = attribute_to(tmp_path, _method(task, train), test, chunk=2)
    assert calls == []  # every chunk carries this run's key
    np.testing.assert_array_equal(again.scores, first.scores)


@pytest.mark.parametrize("change, part", [
    (lambda m: m.__setitem__(1, nn.ReLU()), "model structure"),  # same weights, other code
    (lambda m: m[0].weight.data.add_(1e-9), "model weights"),
])
def test_a_changed_model_is_refused_naming_the_part(problem, tmp_path, change, part):
    task, train, test = problem
    attribute_to(tmp_path, _method(task, train), test, chunk=3)
    model = copy.deepcopy(task.model)
    change(model)
    other = iif.Task(model, "classification", task.recipe)
    with pytest.raises(InputError, match=f"holds results of another run: different {part}"):
        attribute_to(tmp_path, _method(other, train), test, chunk=3)


def test_the_structure_covers_custom_code_and_module_configuration():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * 2

    class ScaledOther(nn.Module):  # same parameters, other forward
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * 3

    ScaledOther.__qualname__ = Scaled.__qualname__  # even under the same name
    a, b = structure_text(Scaled()), structure_text(ScaledOther())
    assert a != b and "return self.lin(x) * 2" in a
    # constructor-visible configuration without parameters: dropout rate, norm eps, mode
    assert structure_text(nn.Dropout(0.1)) != structure_text(nn.Dropout(0.2))
    assert structure_text(nn.LayerNorm(3, eps=1e-5)) != structure_text(nn.LayerNorm(3, eps=1e-3))
    assert structure_text(nn.Dropout(0.1).eval()) != structure_text(nn.Dropout(0.1))


def test_reordered_training_data_is_another_run(problem, tmp_path):
    task, (x, y), test = problem
    attribute_to(tmp_path, _method(task, (x, y)), test, chunk=3)
    order = np.random.default_rng(0).permutation(len(y))
    with pytest.raises(InputError, match="different training data"):
        attribute_to(tmp_path, _method(task, (x[order], y[order])), test, chunk=3)


def test_tracin_checkpoints_retrained_in_place_are_refused(problem, tmp_path):
    task, train, test = problem
    ckpts = tmp_path / "ckpts"

    def retrain(seed: int):
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        t = iif.Task(model, "classification", iif.Recipe(lr=0.2, epochs=2, batch_size=50))
        train_with_checkpoints(t, train, directory=ckpts, seed=seed, progress=False)
        return t

    t = retrain(0)
    out = tmp_path / "out"
    attribute_to(out, TracIn(t, train, checkpoints=load_checkpoints(ckpts), progress=False),
                 test, chunk=3)
    retrain(1)  # same paths, same epochs and learning rates, other contents
    again = TracIn(t, train, checkpoints=load_checkpoints(ckpts), progress=False)
    with pytest.raises(InputError, match="different checkpoints"):
        attribute_to(out, again, test, chunk=3)
    forced = attribute_to(out, again, test, chunk=3, force=True)
    np.testing.assert_allclose(forced.scores, again.attribute(test).scores, rtol=1e-12)


# ---- chunk records ---------------------------------------------------------------------------
def _forge(meta: Path, **fields) -> None:
    """Rewrite a chunk record with ``fields`` and a consistent record checksum."""
    record = json.loads(meta.read_text())
    record.update(fields)
    record["record_sha256"] = record_checksum(record)
    meta.write_text(json.dumps(record))


def test_tampered_chunks_are_recomputed(problem, tmp_path, monkeypatch):
    task, train, test = problem
    whole = attribute_to(tmp_path, _method(task, train), test, chunk=2)
    first, second, third = _records(tmp_path)
    # 1. completeness values edited: the record checksum no longer matches
    record = json.loads(first.read_text())
    record["completeness"]["delta"][0] += 1.0
    first.write_text(json.dumps(record))
    # 2. an array of the wrong shape, its SHA-256 and the record checksum forged to match
    npy = second.with_suffix(".npy")
    np.save(npy, np.zeros((1, len(train[1]))), allow_pickle=False)
    from iif.results.runkey import file_digest

    _forge(second, sha256=file_digest(npy))
    # 3. a record that is valid JSON of the wrong shape
    third.write_text("[1, 2, 3]")
    calls = _count_attribute_calls(monkeypatch)
    again = attribute_to(tmp_path, _method(task, train), test, chunk=2)
    assert calls == [2, 2, 2]
    np.testing.assert_allclose(again.scores, whole.scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(again.completeness["delta"], whole.completeness["delta"],
                               rtol=1e-10)


def test_a_chunk_of_another_run_under_this_manifest_is_recomputed(problem, tmp_path):
    task, train, test = problem
    a, b = tmp_path / "a", tmp_path / "b"
    attribute_to(a, _method(task, train, dim=16), test, chunk=3)
    whole_b = attribute_to(b, _method(task, train, dim=64), test, chunk=3)
    # move run a's first chunk into run b's folder, record and all
    for suffix in (".npy", ".json"):
        src = _records(a)[0].with_suffix(suffix)
        (b / CHUNKS / src.name).write_bytes(src.read_bytes())
    again = attribute_to(b, _method(task, train, dim=64), test, chunk=3)
    np.testing.assert_allclose(again.scores, whole_b.scores, rtol=1e-10, atol=1e-14)


def test_malformed_manifest_is_refused_with_its_path(problem, tmp_path):
    task, train, test = problem
    (tmp_path / MANIFEST).write_text('["a", "list"]')
    with pytest.raises(InputError, match=r"malformed manifest manifest.json \(a JSON list"):
        attribute_to(tmp_path, _method(task, train), test, chunk=3)
    (tmp_path / MANIFEST).write_text('{"format": 1}')
    with pytest.raises(InputError, match="another version of iif"):
        attribute_to(tmp_path, _method(task, train), test, chunk=3)


def test_a_saved_attribution_is_not_overwritten_without_force(problem, tmp_path):
    task, train, test = problem
    saved = iif.Attribution(np.ones((2, 3)), "if")
    saved.save(tmp_path)
    with pytest.raises(InputError, match=r"holds a saved attribution .*--force"):
        attribute_to(tmp_path, _method(task, train), test, chunk=3)
    np.testing.assert_array_equal(iif.Attribution.load(tmp_path).scores, saved.scores)
    result = attribute_to(tmp_path, _method(task, train), test, chunk=3, force=True)
    assert iif.Attribution.load(tmp_path).scores.shape == result.scores.shape


def test_temporary_files_of_a_dead_writer_are_removed(problem, tmp_path):
    task, train, test = problem
    attribute_to(tmp_path, _method(task, train), test, chunk=3)
    left = [tmp_path / ".manifest.json.abc.tmp", tmp_path / CHUNKS / ".rows-0-3.npy.xyz.tmp"]
    for p in left:
        p.write_bytes(b"half")
    attribute_to(tmp_path, _method(task, train), test, chunk=3)
    assert not any(p.exists() for p in left)


# ---- one writer at a time --------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from iif.results.chunks import FolderLock
    lock = FolderLock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_a_second_writer_is_refused_naming_the_first(problem, tmp_path):
    task, train, test = problem
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"being written by process {holder.pid}"):
            attribute_to(tmp_path, _method(task, train), test, chunk=3)
        assert not (tmp_path / MANIFEST).exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: its pid file is stale and taken over
    assert (tmp_path / LOCK).read_text() == str(holder.pid)
    attribute_to(tmp_path, _method(task, train), test, chunk=3)
    assert not (tmp_path / LOCK).exists()  # released and removed after the run


def test_a_lock_is_released_on_error_and_exclusive_within_a_process(tmp_path):
    lock = FolderLock(tmp_path)
    with pytest.raises(InputError, match=f"process {os.getpid()}"):
        FolderLock(tmp_path)
    lock.release()
    with pytest.raises(InputError, match="bounds"):
        ResultStore(tmp_path, method="x", settings={}, key=RunKey({"a": "b"}), n_test=2,
                    n_train=2, bounds=[0, 3])
    FolderLock(tmp_path).release()


@pytest.mark.parametrize("planted", ["symlink", "dangling", "fifo", "folder"])
def test_a_planted_lock_is_refused_and_nothing_is_written_through_it(tmp_path, planted):
    """A ``.iif-lock`` planted as a link made the writer truncate the file it points to and
    write its pid there; a FIFO would block. Each is refused in one line naming the path."""
    folder, victim = tmp_path / "out", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_text("precious")
    lock = folder / LOCK
    if planted == "symlink":
        lock.symlink_to(victim)
    elif planted == "dangling":
        lock.symlink_to(tmp_path / "created-through-the-link")
    elif planted == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(InputError, match=f"{LOCK}.*(symbolic link|not a regular file|cannot "
                                         f"open).*remove"):
        FolderLock(folder)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "created-through-the-link").exists()
    assert lock.is_symlink() or lock.exists()  # refused, not removed behind the user's back


def test_cli_refuses_a_lock_planted_as_a_link_and_keeps_its_target(tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / LOCK).symlink_to(victim)
    assert _attribute(out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "symbolic link" in err and str(out / LOCK) in err
    assert victim.read_text() == "precious"


RACER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import tiny_job
    from iif import IntegratedInfluence, PathSettings, ProjectionSettings
    from iif.errors import InputError
    from iif.results.store import attribute_to
    task, train, test = tiny_job.problem()
    method = IntegratedInfluence(task, train, path=PathSettings(steps=2), progress=False,
                                 projection=ProjectionSettings(dim=16), seed=int(sys.argv[3]))
    try:
        attribute_to(sys.argv[1], method, test, chunk=1)
    except InputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
""")


def test_two_writers_with_different_seeds_at_once(problem, tmp_path):
    """Started together on one folder: one run wins, the other is refused (locked, or a
    folder of another run), and the folder holds exactly the winner's scores."""
    out = tmp_path / "out"
    procs = {seed: subprocess.Popen([sys.executable, "-c", RACER, str(out), str(TESTS),
                                     str(seed)], stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    deadline = time.monotonic() + 240
    codes = {seed: p.wait(timeout=max(1.0, deadline - time.monotonic()))
             for seed, p in procs.items()}
    errors = {seed: p.stderr.read() for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 1], errors
    winner = min(codes, key=codes.get)
    loser = max(codes, key=codes.get)
    assert ("is being written by" in errors[loser]
            or "different settings (seed" in errors[loser]), errors[loser]
    task, train, test = problem
    torch.set_num_threads(1)
    expected = _method(task, train, seed=winner).attribute(test)
    stored = iif.Attribution.load(out)
    assert stored.settings["seed"] == winner
    np.testing.assert_allclose(stored.scores, expected.scores, rtol=1e-9, atol=1e-13)


def test_run_key_parts_are_stable_and_distinct(problem):
    task, train, test = problem
    tv = task.validate(test, "test data")
    a = run_key(_method(task, train), tv)
    b = run_key(_method(task, train), tv)
    assert a == b and a.digest == b.digest
    c = run_key(_method(task, train, seed=3), tv)
    assert a.differences(c.parts) == ["settings"]


# ---- through the command line ----------------------------------------------------------------
def _attribute(out: Path, *flags: str) -> int:
    from iif.runs.cli import main

    return main(["attribute", "--task", "tiny_job:job", "--out", str(out), "--chunk", "2",
                 "--no-progress", *flags])


def test_cli_rerun_after_removing_the_manifest_with_other_settings(problem, tmp_path, capsys):
    """The reported case: the manifest removed (as an error once advised), then a rerun with
    --proj-dim 64 instead of 16 returned the old scores with exit 0."""
    out = tmp_path / "out"
    assert _attribute(out, "--proj-dim", "16") == 0
    old = iif.Attribution.load(out).scores.copy()
    (out / MANIFEST).unlink()
    capsys.readouterr()
    assert _attribute(out, "--proj-dim", "64") == 1
    err = capsys.readouterr().err
    assert "holds 3 chunk(s) of another run but no manifest.json" in err and "--force" in err
    np.testing.assert_array_equal(iif.Attribution.load(out).scores, old)  # left untouched
    assert _attribute(out, "--proj-dim", "64", "--force") == 0
    task, train, test = problem
    fresh = IntegratedInfluence(task, train, path=PathSettings(steps=3), progress=False,
                                projection=ProjectionSettings(dim=64)).attribute(test)
    np.testing.assert_allclose(iif.Attribution.load(out).scores, fresh.scores, rtol=1e-10,
                               atol=1e-14)


def test_cli_out_over_a_saved_attribution_needs_force(tmp_path, capsys):
    saved = iif.Attribution(np.arange(6.0).reshape(2, 3), "if")
    saved.save(tmp_path)
    assert _attribute(tmp_path, "--proj-dim", "16") == 1
    assert "holds a saved attribution (scores.npy, attribution.json)" in capsys.readouterr().err
    np.testing.assert_array_equal(iif.Attribution.load(tmp_path).scores, saved.scores)
    assert _attribute(tmp_path, "--proj-dim", "16", "--force") == 0
    assert iif.Attribution.load(tmp_path).method == "iif"


REORDERED = """
import numpy as np
import tiny_job

def job():
    task, (x, y), test = tiny_job.problem()
    order = np.arange(len(y))[::-1].copy()
    return task, (x[order], y[order]), test
"""


def test_cli_show_refuses_a_task_with_reordered_training_data(tmp_path, capsys, monkeypatch):
    from iif.runs.cli import main

    out = tmp_path / "out"
    assert _attribute(out, "--proj-dim", "16") == 0
    (tmp_path / "reordered.py").write_text(REORDERED)
    monkeypatch.syspath_prepend(str(tmp_path))
    capsys.readouterr()
    assert main(["show", str(out), "--task", "reordered:job", "--image-shape", "2", "2"]) == 1
    err = capsys.readouterr().err
    assert "reordered:job" in err and "other training data" in err
    assert not list(out.glob("show_*.png"))
    assert main(["show", str(out), "--task", "tiny_job:job", "--image-shape", "2", "2"]) == 0


def test_malformed_store_files_are_named_or_recomputed(problem, tmp_path, monkeypatch):
    task, train, test = problem
    whole = attribute_to(tmp_path, _method(task, train), test, chunk=3)
    first, second = _records(tmp_path)
    # a record with NaN (valid for JSON readers, never written by the store): recomputed
    record = json.loads(first.read_text())
    record["info"]["seconds"] = float("nan")
    first.write_text(json.dumps(record))
    # completeness of the wrong length under a consistent checksum: recomputed
    record = json.loads(second.read_text())
    _forge(second, completeness={k: v[:1] for k, v in record["completeness"].items()})
    calls = _count_attribute_calls(monkeypatch)
    again = attribute_to(tmp_path, _method(task, train), test, chunk=3)
    assert calls == [3, 3]
    np.testing.assert_allclose(again.scores, whole.scores, rtol=1e-10, atol=1e-14)
    # a folder where a chunk file belongs, and a file where the chunks folder belongs
    npy = first.with_suffix(".npy")
    npy.unlink()
    npy.mkdir()
    with pytest.raises(InputError, match=f"{npy} is a folder where iif keeps a file"):
        attribute_to(tmp_path, _method(task, train), test, chunk=3)
    other = tmp_path / "other"
    other.mkdir()
    (other / CHUNKS).write_text("")
    with pytest.raises(InputError, match="is a file, not the folder of chunks"):
        attribute_to(other, _method(task, train), test, chunk=3)


def test_only_process_group_failures_are_reported_as_such():
    from iif.runs.distributed import _collective_failure

    try:
        torch.distributed.all_reduce(torch.zeros(1))  # no process group: raised by torch
    except (RuntimeError, ValueError) as exc:
        assert _collective_failure(exc)
    try:
        nn.Linear(2, 2)(torch.zeros(3))  # a forward pass failing: the user's to see
    except RuntimeError as exc:
        assert not _collective_failure(exc)


CUSTOM = """
import torch
from torch import nn
import tiny_job

class Doubled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)

def job():
    task, train, test = tiny_job.problem()
    task.model = Doubled(task.model)
    return task, train, test
"""


def test_a_task_file_with_a_custom_module_resumes_in_a_new_process(tmp_path):
    """The run key of a custom module class is the same in every process, however the task
    file is imported (string hashes differ from process to process)."""
    (tmp_path / "custom.py").write_text(CUSTOM)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}

    def run(task: str, seed: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "iif", "attribute", "--task", task, "--out", str(out),
             "--proj-dim", "16", "--chunk", "3", "--no-progress", "--threads", "1"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
            env={**env, "PYTHONHASHSEED": seed})

    first = run(str(tmp_path / "custom.py") + ":job", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run("custom:job", "2")  # another process, imported by module name
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 of 2 chunks already finished" in again.stderr
