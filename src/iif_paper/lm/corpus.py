"""Debian's ``fortunes`` corpus (``apt-get install fortunes``) as short text documents.

A fortune file is plain text whose entries are separated by lines holding only ``%``; each
entry is one document. Only the plain files of the folder are read (not the ``.dat``
indices, nor the ``.u8`` links to the same files) and subfolders (the ``off/`` offensive
collection of some packagings) are skipped. Nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FOLDER = Path("/usr/share/games/fortunes")
"""Where the Debian package ``fortunes`` installs its files."""

_SPACES = re.compile(r"[ \t\r\f\v]+")


@dataclass(frozen=True)
class Corpus:
    """Documents split into training and test sets (lists of str), in a seeded order."""

    train: list[str]
    test: list[str]


def _normalise(entry: str) -> str:
    """Runs of spaces and tabs to one space, lines stripped, blank lines dropped: the
    indentation of attributions (``\\t\\t-- Author``) costs bytes and teaches nothing."""
    lines = (_SPACES.sub(" ", line).strip() for line in entry.splitlines())
    return "\n".join(line for line in lines if line)


def _fortune_files(folder: Path) -> list[Path]:
    """The plain fortune files of ``folder`` (or ``folder`` itself, a file), sorted by
    name (a deterministic order)."""
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def read_fortunes(folder: str | Path = DEFAULT_FOLDER, max_bytes: int = 126,
                  exclude: tuple[str, ...] = ("ascii-art", "art")) -> list[str]:
    """All distinct documents of at most ``max_bytes`` UTF-8 bytes (after normalising) from
    the fortune files in ``folder`` (or the one file ``folder``) except those named in
    ``exclude`` (pictures, whose layout the normalisation destroys), in file then entry
    order, first occurrence kept."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"no fortune files at {folder}: install them with `apt-get install fortunes` "
            f"(Debian/Ubuntu) or pass the folder that holds them")
    seen: set[str] = set()
    docs: list[str] = []
    for path in _fortune_files(folder):
        if path.name in exclude:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
            doc = _normalise(entry)
            if doc and len(doc.encode("utf-8")) <= max_bytes and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    if not docs:
        raise ValueError(f"no fortunes of at most {max_bytes} bytes in {folder}")
    return docs


def load_fortunes(folder: str | Path = DEFAULT_FOLDER, max_bytes: int = 126,
                  n_train: int | None = None, n_test: int | None = None,
                  test_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """The documents of :func:`read_fortunes`, shuffled with ``seed`` and split: the first
    ``n_test`` (default ``test_fraction`` of them) for testing, then ``n_train`` (default
    all the rest) for training."""
    docs = read_fortunes(folder, max_bytes)
    random.Random(seed).shuffle(docs)
    n_test = max(1, round(test_fraction * len(docs))) if n_test is None else n_test
    if n_test >= len(docs):
        raise ValueError(f"n_test={n_test} leaves no training documents of {len(docs)}")
    rest = docs[n_test:]
    return Corpus(train=rest if n_train is None else rest[:n_train], test=docs[:n_test])
