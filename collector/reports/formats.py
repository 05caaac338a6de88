"""The output formats every report shares, as one table: which formats a report offers, the file
suffix each is written under, and the rule that picks one from ``--format`` and ``-o`` (a file named
x.csv never silently holds JSON or a terminal table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    needs_file: bool  # a binary format: written to -o FILE, never to a terminal
    what: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("table", ".txt", False, "aligned columns for a terminal (display width, CJK counted twice)"),
        Format("csv", ".csv", False, "UTF-8 with a BOM, so that Excel on Chinese Windows reads it"),
        Format("json", ".json", False, "exact seconds beside the hours, and a meta object"),
        Format("xlsx", ".xlsx", True, "an About (说明) sheet, then one sheet per table"),
    )
}
BY_SUFFIX = {f.suffix: f.name for f in FORMATS.values()}


class FormatError(ValueError):
    """``--format`` and ``-o`` disagree, or the report does not offer the format."""


def choose(fmt: str | None, out: Path | None, offered: Sequence[str], report: str) -> str:
    """``--format`` if given, else the format ``-o``'s suffix names, else the report's first format.

    A suffix that names another format than ``--format`` is refused, and so is a binary format
    without a file; an unknown suffix is fine with an explicit ``--format`` (report.dat)."""
    named = BY_SUFFIX.get(out.suffix.lower()) if out is not None else None
    if fmt is None:
        if out is not None and named is None:
            raise FormatError(
                f"{out}: {out.suffix or 'no extension'} names no format of {report}; give --format "
                f"({', '.join(offered)}) or a file ending in {', '.join(FORMATS[f].suffix for f in offered)}"
            )
        fmt = named or offered[0]
    elif named is not None and named != fmt:
        raise FormatError(f"{out}: the file name says {named}, but --format is {fmt}; make them agree")
    if fmt not in offered:
        raise FormatError(f"{report} is written as {', '.join(offered)}, not {fmt}")
    if FORMATS[fmt].needs_file and out is None:
        raise FormatError(f"--format {fmt} needs --output FILE{FORMATS[fmt].suffix}")
    return fmt
