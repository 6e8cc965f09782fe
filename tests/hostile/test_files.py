"""Hostile files in a result, chunk or fitted folder: a FIFO or a link to /dev/zero in place of a
file, JSON nested too deeply, a .npy header claiming more data than the file holds. Each is
refused with one InputError line naming the file, never a hang, a raw RecursionError or a
MemoryError (iif.io.regular_file, read_json_file, npy_problem)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tiny_job

import iif
from iif.errors import InputError
from iif.io import JSON_MAX_BYTES
from iif.results.attribution import META_FILE, SCORES_FILE
from iif.results.store import CHUNKS, MANIFEST, attribute_to
from iif.runs.cli import main
from iif.views.show import show

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="needs FIFOs and /dev/zero (POSIX)")

KINDS = ("fifo", "devzero")
NOT_REGULAR = r"is not a regular file \((a FIFO|a character device)\).*plain file"


@pytest.fixture(scope="module")
def problem():
    return tiny_job.problem()


@pytest.fixture(autouse=True)
def _deadline():
    """A regression fails after 20 seconds instead of hanging the test run."""
    def expired(*_):
        raise TimeoutError("the call did not return within 20 seconds (blocked on a file?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _plant(path: Path, kind: str) -> None:
    """Replace ``path`` by a FIFO or a symbolic link to /dev/zero."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert str(path) in text
    return text


def _result(problem, folder: Path):
    task, train, test = problem
    return attribute_to(folder, tiny_job.method(task, train), test, chunk=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_a_chunk_file_that_is_not_regular_is_refused(problem, tmp_path, kind, suffix):
    task, train, test = problem
    _result(problem, tmp_path)
    target = sorted((tmp_path / CHUNKS).glob("rows-*" + suffix))[0]
    _plant(target, kind)
    with pytest.raises(InputError, match=NOT_REGULAR) as exc:
        attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=2)
    _one_line(exc, target)


@pytest.mark.parametrize("kind", KINDS)
def test_a_manifest_that_is_not_regular_is_refused(problem, tmp_path, kind):
    task, train, test = problem
    _result(problem, tmp_path)
    _plant(tmp_path / MANIFEST, kind)
    with pytest.raises(InputError, match=NOT_REGULAR) as exc:
        attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=2)
    _one_line(exc, tmp_path / MANIFEST)
    # iif show of the unfinished run reads the manifest too
    (tmp_path / SCORES_FILE).unlink()
    (tmp_path / META_FILE).unlink()
    with pytest.raises(InputError, match=NOT_REGULAR) as exc:
        show(tmp_path)
    _one_line(exc, tmp_path / MANIFEST)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [SCORES_FILE, META_FILE])
def test_saved_attribution_files_that_are_not_regular_are_refused(problem, tmp_path, kind,
                                                                  name):
    _result(problem, tmp_path)
    _plant(tmp_path / name, kind)
    with pytest.raises(InputError, match=NOT_REGULAR) as exc:
        iif.Attribution.load(tmp_path)
    _one_line(exc, tmp_path / name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["fitted.safetensors", "fitted.json"])
def test_fitted_files_that_are_not_regular_are_refused(problem, tmp_path, kind, name):
    task, train, _ = problem
    iif.TRAK(task, train).fit(tmp_path)
    _plant(tmp_path / name, kind)
    with pytest.raises(InputError, match=NOT_REGULAR) as exc:
        iif.TRAK(task, train).fit(tmp_path)
    _one_line(exc, tmp_path / name)


def test_deeply_nested_json_is_one_line(problem, tmp_path):
    task, train, test = problem
    _result(problem, tmp_path)
    (tmp_path / MANIFEST).write_text("[" * 100000)
    with pytest.raises(InputError, match="nested too deeply") as exc:
        attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=2)
    _one_line(exc, tmp_path)
    (tmp_path / META_FILE).write_text("[" * 100000)
    with pytest.raises(InputError, match="nested too deeply") as exc:
        iif.Attribution.load(tmp_path)
    _one_line(exc, tmp_path / META_FILE)


def _claim_shape(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite the header of the .npy ``path`` to claim ``shape`` (data left as it is)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        _, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        data = f.read()
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"shape": shape, "fortran_order": fortran, "descr": np.lib.format.dtype_to_descr(
                dtype)})
        f.write(data)


def test_an_npy_header_claiming_more_than_the_file_holds_is_refused(problem, tmp_path):
    _result(problem, tmp_path)
    _claim_shape(tmp_path / SCORES_FILE, (10**12,))
    with pytest.raises(InputError, match=r"header claims an array of shape \[1000000000000\]") \
            as exc:
        iif.Attribution.load(tmp_path)
    _one_line(exc, tmp_path / SCORES_FILE)


def test_a_json_record_larger_than_any_iif_writes_is_refused_before_reading(problem, tmp_path):
    _result(problem, tmp_path)
    with open(tmp_path / META_FILE, "r+b") as f:  # sparse: no disk used, nothing to read
        f.truncate(JSON_MAX_BYTES + 1)
    with pytest.raises(InputError, match=f"holds {JSON_MAX_BYTES + 1} bytes, more than") as exc:
        iif.Attribution.load(tmp_path)
    _one_line(exc, tmp_path / META_FILE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [SCORES_FILE, META_FILE, MANIFEST])
def test_iif_report_refuses_a_result_file_that_is_not_regular(problem, tmp_path, kind, name,
                                                              capsys):
    folder = tmp_path / "run"
    _result(problem, folder)
    _plant(folder / name, kind)
    capsys.readouterr()
    assert main(["report", str(folder), "--out", str(tmp_path / "page.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / name) in err, err
    assert "is not a regular file" in err
    assert not (tmp_path / "page.html").exists()
