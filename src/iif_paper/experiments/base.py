"""The experiments framework: one function per paper table or figure, one result format.

An experiment is a module with a ``run`` function and a ``TITLE``::

    run(out_dir, scale="smoke" | "full", seed=0, progress=None) -> ExperimentResult

``scale="full"`` is the paper's protocol; ``"smoke"`` the same code at a size that runs in
seconds (for tests and a first look). ``run`` computes its numbers, builds an
:class:`ExperimentResult` and calls :meth:`ExperimentResult.write`, which writes into
``out_dir``:

- ``NAME.json`` with the keys

  - ``name``, ``scale``: the experiment and the scale it ran at;
  - ``settings``: every setting the numbers depend on (sizes, seeds, choices);
  - ``results``: ``{method: {column: value}}``, our numbers;
  - ``paper``: the same shape, the paper's published numbers (``null`` where it gives none);

  and, documented extras, only when the experiment has them:

  - ``stderr``: the standard errors of ``results``, same shape;
  - ``variants``: ``{variant: {column: value}}``, other settings of a method (sensitivity
    checks; not in the paper), and ``variant_stderr``, their standard errors;
  - ``seconds``: wall-clock time of the run;
  - ``notes``: a list of sentences, including the differences from the paper;
  - ``files``: names of the other files written (the report and figures);

- ``NAME.md``: a readable report (protocol, our numbers beside the paper's with standard
  errors, variants, settings, the differences paragraph, figures);
- figures as PNG (written by the experiment through :func:`save_figure`).

Every file is written atomically. Values that are not finite become ``null`` in JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iif.errors import InputError
from iif.io import atomic_write, jsonable
from iif.views.report import save_png

Scale = Literal["smoke", "full"]
SCALES: tuple[str, ...] = ("smoke", "full")
Table = dict[str, dict[str, float | None]]


@dataclass
class ExperimentResult:
    """Numbers of one experiment, with the paper's, and how to report them.

    ``results``, ``paper``, ``stderr`` and ``variants`` map a method (row) to
    ``{column: value}``. ``protocol`` (Markdown) describes what was run and ``differences``
    (Markdown) compares our numbers with the paper's; both go into the report, and
    ``differences`` also into ``notes`` in the JSON. ``figures`` are file names (in the output
    folder) of PNGs the experiment wrote; ``extra`` holds further documented sections of the
    report as ``{heading: markdown}``.
    """

    name: str
    scale: str
    title: str
    settings: dict[str, Any]
    results: Table
    paper: Table
    stderr: Table | None = None
    variants: Table | None = None
    variant_stderr: Table | None = None
    protocol: str = ""
    differences: str = ""
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    columns: list[str] | None = None  # column order of the tables (default: first seen)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise InputError(f"scale must be one of {SCALES}, got {self.scale!r}")
        missing = [m for m in self.results if m not in self.paper]
        if missing:
            raise InputError(f"paper numbers missing for methods {missing}: use None where "
                             f"the paper gives none")

    # ---- views -------------------------------------------------------------------------------
    def column_names(self) -> list[str]:
        """The table columns, in order."""
        if self.columns is not None:
            return list(self.columns)
        seen: list[str] = []
        for row in list(self.results.values()) + list(self.paper.values()):
            seen += [c for c in row if c not in seen]
        return seen

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring for the schema)."""
        out: dict[str, Any] = {
            "name": self.name,
            "scale": self.scale,
            "settings": self.settings,
            "results": self.results,
            "paper": self.paper,
        }
        if self.stderr is not None:
            out["stderr"] = self.stderr
        if self.variants:
            out["variants"] = self.variants
            if self.variant_stderr is not None:
                out["variant_stderr"] = self.variant_stderr
        if self.seconds is not None:
            out["seconds"] = round(float(self.seconds), 3)
        notes = list(self.notes)
        if self.differences:
            notes.insert(0, self.differences)
        if notes:
            out["notes"] = notes
        out["files"] = [f"{self.name}.md", *self.figures]
        return jsonable(out)

    def markdown(self) -> str:
        """The report ``NAME.md``."""
        cols = self.column_names()
        lines = [f"# {self.title}", ""]
        lines.append(f"Experiment `{self.name}`, scale `{self.scale}`"
                     + (f", {self.seconds:.1f} s." if self.seconds is not None else "."))
        lines.append("")
        if self.protocol:
            lines += ["## Protocol", "", self.protocol.strip(), ""]
        lines += ["## Results", ""]
        lines.append("Each cell: ours" + (" ± standard error" if self.stderr else "")
                     + " (the paper's number); \u2013 where there is none.")
        lines.append("")
        lines += _markdown_table(self.results, self.stderr, self.paper, cols)
        lines.append("")
        if self.variants:
            lines += ["### Variants (not in the paper)", ""]
            lines += _markdown_table(self.variants, self.variant_stderr, None, cols)
            lines.append("")
        if self.differences:
            lines += ["## Differences from the paper", "", self.differences.strip(), ""]
        for heading, text in self.extra.items():
            lines += [f"## {heading}", "", text.strip(), ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        for fig in self.figures:
            lines += [f"![{fig}]({fig})", ""]
        lines += ["## Settings", "", "```json",
                  json.dumps(jsonable(self.settings), indent=2, allow_nan=False), "```", ""]
        return "\n".join(lines)

    def summary(self) -> str:
        """A short plain-text table for the terminal: ours (paper) per method and column."""
        cols = self.column_names()
        rows = [["method", *cols]]
        for method, row in self.results.items():
            cells = [method]
            for c in cols:
                ours = _fmt(row.get(c))
                theirs = self.paper.get(method, {}).get(c)
                cells.append(ours if theirs is None else f"{ours} ({_fmt(theirs)})")
            rows.append(cells)
        widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                for r in rows]
        return "\n".join(text)

    # ---- files -------------------------------------------------------------------------------
    def write(self, out_dir: str | Path) -> ExperimentResult:
        """Write ``NAME.json`` and ``NAME.md`` into ``out_dir`` (atomically); returns self."""
        out = ensure_dir(out_dir)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write(out / f"{self.name}.json", lambda f: f.write(text.encode()))
        report = self.markdown()
        atomic_write(out / f"{self.name}.md", lambda f: f.write(report.encode()))
        return self

    def paths(self, out_dir: str | Path) -> list[Path]:
        """The files this result writes (or wrote) into ``out_dir``."""
        out = Path(out_dir)
        return [out / f"{self.name}.json", out / f"{self.name}.md",
                *(out / f for f in self.figures)]


def ensure_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, created if needed; an existing file there is an error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib ``Figure`` as PNG, atomically (:func:`iif.views.report.save_png`)."""
    ensure_dir(Path(path).parent)
    return save_png(fig, path, dpi=dpi)


def check_scale(scale: str) -> str:
    """``scale`` if it is a known scale, else an :class:`InputError`."""
    if scale not in SCALES:
        raise InputError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


def begin(out_dir: str | Path, scale: str, sizes: dict[str, dict[str, Any]]
          ) -> tuple[float, Path, dict[str, Any]]:
    """The start of an experiment's ``run``: (clock at the start, the output folder, created,
    and the sizes of ``scale``); an unknown scale is an :class:`InputError`."""
    check_scale(scale)
    return time.perf_counter(), ensure_dir(out_dir), sizes[scale]


# ---- helpers ---------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.2e}"
    return f"{v:.{digits}f}"


def _markdown_table(
    rows: Mapping[str, Mapping[str, Any]],
    stderr: Mapping[str, Mapping[str, Any]] | None,
    paper: Mapping[str, Mapping[str, Any]] | None,
    cols: list[str],
) -> list[str]:
    head = "| method | " + " | ".join(cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    out = [head, rule]
    for method, row in rows.items():
        cells = []
        for c in cols:
            cell = _fmt(row.get(c))
            se = None if stderr is None else stderr.get(method, {}).get(c)
            if se is not None and cell != "\u2013":
                cell += f" \u00b1 {_fmt(se)}"
            if paper is not None:
                cell += f" ({_fmt(paper.get(method, {}).get(c))})"
            cells.append(cell)
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return out
