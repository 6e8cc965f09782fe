"""Progress bars: tqdm on long loops, shown only on a terminal unless asked otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], total: int | None = None, desc: str = "", enable: bool | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar; ``enable=None`` shows it only when stderr is a tty."""
    if enable is None:
        enable = sys.stderr.isatty()
    return iter(tqdm(iterable, total=total, desc=desc, disable=not enable, leave=False))
