"""The result store's files under --force and its messages for a full disk, a file in the way of
the folder and a damaged manifest: one line naming the file, and nothing half-written left."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tiny_job

import iif
from iif.errors import InputError
from iif.results.attribution import META_FILE, SCORES_FILE
from iif.results.runkey import RunKey
from iif.results.store import CHUNKS, MANIFEST, ResultStore, attribute_to


@pytest.fixture(scope="module")
def problem():
    return tiny_job.problem()


def _store(folder: Path, **kw) -> ResultStore:
    """A store of 4 test x 3 training samples in two chunks, no model needed."""
    return ResultStore(folder, method="x", settings={}, key=RunKey({"x": "h"}), n_test=4,
                       n_train=3, bounds=[0, 2, 4], **kw)


def _full_disk(monkeypatch, shape: tuple[int, ...] | None = None) -> None:
    """np.save writes a few bytes, then fails as on a full disk (for arrays of ``shape``)."""
    original = np.save

    def save(file, array, *args, **kwargs):
        if shape is None or np.shape(array) == shape:
            file.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)


def _log_lines(monkeypatch, name: str) -> list[str]:
    """The messages logged by the logger ``name`` (INFO and up) from now on."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "level", logging.INFO)
    # loggers cache isEnabledFor answers, and setting ``level`` directly leaves them: an
    # earlier "INFO is off" would hide this test's lines
    logging.root.manager._clear_cache()
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    return lines


def _rows(folder: Path) -> set[str]:
    return {p.name for p in (folder / CHUNKS).glob("rows-*")}


# ---- --force ---------------------------------------------------------------------------------
def test_force_removes_only_the_files_the_library_wrote(problem, tmp_path, monkeypatch):
    task, train, test = problem
    attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=2)
    old = _rows(tmp_path)
    chunks = tmp_path / CHUNKS
    (chunks / "notes.txt").write_text("mine")
    (chunks / "sub").mkdir()
    (chunks / "sub" / "keep.txt").write_text("mine too")
    # a link named like a chunk: the link goes, the file it points to stays
    target = tmp_path.parent / f"{tmp_path.name}-target.npy"
    target.write_bytes(b"not the library's")
    (chunks / "rows-0000000-0000009.npy").symlink_to(target)
    lines = _log_lines(monkeypatch, "iif.results.store")
    with pytest.raises(InputError, match=r"another chunking"):
        attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=3)
    result = attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=3, force=True)
    assert result.scores.shape == (len(test[0]), len(train[0]))
    assert _rows(tmp_path) == {f"rows-{lo:07d}-{hi:07d}.{ext}" for lo, hi in ((0, 3), (3, 6))
                               for ext in ("npy", "json")}
    assert not old & _rows(tmp_path)
    assert (chunks / "notes.txt").read_text() == "mine"
    assert (chunks / "sub" / "keep.txt").read_text() == "mine too"
    assert target.read_bytes() == b"not the library's"
    left = [line for line in lines if "iif did not write" in line]
    assert len(left) == 1 and "notes.txt" in left[0] and "sub/" in left[0]
    assert iif.Attribution.load(tmp_path).scores.shape == result.scores.shape


def test_force_refuses_a_chunks_folder_that_is_a_link(problem, tmp_path):
    task, train, test = problem
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    attribute_to(out, tiny_job.method(task, train), test, chunk=2)
    (out / CHUNKS).rename(elsewhere)
    (out / CHUNKS).symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(InputError, match=rf"{out / CHUNKS} is a symbolic link.*fresh folder"):
        attribute_to(out, tiny_job.method(task, train), test, chunk=3, force=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert (out / MANIFEST).exists()  # refused before anything was removed


# ---- a file in the way -----------------------------------------------------------------------
def test_a_file_in_the_path_of_the_folder_is_named(tmp_path):
    (tmp_path / "somefile.txt").write_text("x")
    for out in (tmp_path / "somefile.txt" / "result", tmp_path / "somefile.txt" / "a" / "b"):
        with pytest.raises(InputError) as caught:
            _store(out)
        assert str(caught.value) == (f"{out}: {tmp_path / 'somefile.txt'} is a file, not a "
                                     f"folder, so the folder cannot be created there; remove "
                                     f"it or choose another folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"dangling is a broken symbolic link, not a folder"):
        _store(tmp_path / "dangling" / "result")


# ---- a full disk -----------------------------------------------------------------------------
def test_a_full_disk_writing_the_scores_is_one_line_and_leaves_no_result(tmp_path,
                                                                         monkeypatch):
    with _store(tmp_path) as store:
        for lo, hi in store.chunks:
            store.write(lo, hi, iif.Attribution(np.full((hi - lo, 3), float(lo)), "x"))
        _full_disk(monkeypatch, shape=(4, 3))
        with pytest.raises(InputError) as caught:
            store.assemble()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / SCORES_FILE}: the disk is full")
    assert "bytes needed" in message and "run the same command again" in message
    left = {p.name for p in tmp_path.iterdir()}
    assert SCORES_FILE not in left and META_FILE not in left
    assert not [name for name in left if name.endswith(".tmp")]
    monkeypatch.undo()
    with _store(tmp_path) as store:  # the chunks are kept: space freed, the same run finishes
        assert store.pending() == []
        np.testing.assert_array_equal(store.assemble().scores[:, 0], [0, 0, 2, 2])


def test_a_full_disk_writing_a_chunk_leaves_no_part_of_it(tmp_path, monkeypatch):
    with _store(tmp_path) as store:
        _full_disk(monkeypatch)
        with pytest.raises(InputError) as caught:
            store.write(0, 2, iif.Attribution(np.zeros((2, 3)), "x"))
        monkeypatch.undo()
        assert store.pending() == [(0, 2), (2, 4)]
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / CHUNKS / 'rows-0000000-0000002.npy'}: the disk is "
                              f"full")
    assert not list((tmp_path / CHUNKS).iterdir())


def test_a_full_disk_writing_the_manifest_is_one_line(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match=rf"^{tmp_path / MANIFEST}: the disk is full"):
        _store(tmp_path)
    monkeypatch.undo()
    assert not [p.name for p in tmp_path.iterdir() if p.name != CHUNKS]  # nor the lock
    _store(tmp_path).close()  # the folder is not held


# ---- a damaged manifest ----------------------------------------------------------------------
@pytest.mark.parametrize(("content", "said"), [
    (b"", r"an empty manifest manifest.json \(0 bytes, as an interrupted copy or a full disk"),
    (b'{\n  "format": 2,\n  "meth', r"a damaged manifest manifest.json \(cut short after \d+ "
                                    r"bytes, as an interrupted copy or a full disk"),
    (b"\0" * 64, r"a damaged manifest manifest.json \(only zero bytes, as an interrupted copy"),
    (b"{}", r"a damaged manifest manifest.json \(no format field"),
])
def test_a_damaged_manifest_is_not_called_another_version(tmp_path, content, said):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(InputError) as caught:
        _store(tmp_path)
    message = str(caught.value)
    assert "another version" not in message and "\n" not in message
    assert message.startswith(f"{tmp_path} has ")
    assert re.search(said, message), message
    assert message.endswith("; use a fresh folder, or --force (force=True) to replace its "
                            "results")
    _store(tmp_path, force=True).close()  # the remedy works
    assert (tmp_path / MANIFEST).stat().st_size > 0
