"""``arbiter audit query``: read the audit log through a running Arbiter's admin API, with the same
filters as ``audit export`` (which reads the database itself)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import typer

from arbiter.cli.audit import audit_cli, with_filters
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

_COLUMNS = [
    ("ts", "TIME"),
    ("kind", "KIND"),
    ("subject", "SUBJECT"),
    ("tenant", "TENANT"),
    ("method", "METHOD"),
    ("tool", "TOOL / TARGET"),
    ("decision", "DECISION"),
    ("reason", "REASON"),
]


@audit_cli.command("query")
@with_filters
def audit_query(
    limit: Annotated[int, typer.Option(help="Records per page (1 to the server's maximum)")] = 100,
    order: Annotated[
        Literal["asc", "desc"], typer.Option(help="asc: oldest first; desc: newest first")
    ] = "asc",
    cursor: Annotated[
        str | None, typer.Option(help="Continue after a previous page (its next cursor)")
    ] = None,
    fetch_all: Annotated[bool, typer.Option("--all", help="Follow every page to the end")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
    **filters: str | None,
) -> None:
    """Records matching every given filter, a page at a time (--all: every page)."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table
    from arbiter.cli.progress import counter

    api = connect(url, token)
    events: list[dict[str, Any]] = []
    next_cursor = cursor
    with counter("reading the audit log", "records", enabled=fetch_all) as advance:
        while True:
            params: dict[str, Any] = {**filters, "limit": limit, "order": order, "cursor": next_cursor}
            page = cast(dict[str, Any], api.json("GET", "/audit/events", params=params))
            batch = cast(list[dict[str, Any]], page.get("events") or [])
            events.extend(batch)
            advance(len(batch))
            next_cursor = cast(str | None, page.get("next_cursor"))
            if not (fetch_all and next_cursor):
                break
    if as_json:
        emit_json({"events": events, "next_cursor": next_cursor})
        return
    table(events, _COLUMNS, empty="no records match")
    if next_cursor:
        note(f"{len(events)} records shown; more with --cursor {next_cursor} (or --all)")
    else:
        note(f"{len(events)} records")
