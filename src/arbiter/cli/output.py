"""How the admin commands print: a rich table for people (the default), the server's JSON with ``--json``.

Tables go to stdout; notes (how many, what to do next) go to stderr so a pipe gets only the result.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import typer

# Wide enough that ids, hashes and URLs are not folded when the output goes to a file or a pipe.
_PIPE_WIDTH = 240
_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]00:00)?$")


def emit_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def note(text: str) -> None:
    typer.echo(text, err=True)


def cell(value: object) -> str:
    """One value as a table shows it: times to the second in UTC, lists joined, nothing as ``-``."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        found = _ISO.match(value)
        return f"{found.group(1)}Z" if found and found.group(3) else value
    if isinstance(value, list):
        return ", ".join(cell(v) for v in cast(list[object], value))
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
    empty: str = "none",
) -> None:
    """``rows`` as a table of ``columns`` (key, heading); ``empty`` is said when there are no rows."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(
        file=sys.stdout,
        width=None if sys.stdout.isatty() else _PIPE_WIDTH,
        highlight=False,
        soft_wrap=False,
    )
    if not rows:
        console.print(Text(f"{title}: {empty}" if title else empty))
        return
    out = Table(
        title=Text(title) if title else None, title_justify="left", show_edge=False, pad_edge=False, box=None
    )
    for _, heading in columns:
        out.add_column(heading, overflow="fold", header_style="bold")
    for row in rows:
        # Text, not markup: a role or tool name in [brackets] is data, not a style.
        out.add_row(*(Text(cell(row.get(key))) for key, _ in columns))
    console.print(out)


def fields(record: Mapping[str, Any], keys: Sequence[tuple[str, str]]) -> None:
    """One record as ``heading  value`` lines (a created key, an updated upstream)."""
    width = max(len(heading) for _, heading in keys)
    for key, heading in keys:
        typer.echo(f"{heading.ljust(width)}  {cell(record.get(key))}")
