"""``arbiter approvals list | show | approve | deny``: calls waiting for an approver (docs/approvals.md),
decided through a running Arbiter's admin API.

The server says what the caller may see and decide (an approver named by the request's rule, never
their own request); the CLI only shows and asks, so a refusal is the server's one line (exit 10).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

import typer

from arbiter.cli.app import cli
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

approvals_cli = typer.Typer(
    help="List, show, approve and deny calls waiting for an approver (admin API).", no_args_is_help=True
)
cli.add_typer(approvals_cli, name="approvals")

Status = Literal["pending", "approved", "denied", "used", "expired", "all"]
Ref = Annotated[str, typer.Argument(metavar="ID", help="The request's id (from `arbiter approvals list`)")]
Note = Annotated[str | None, typer.Option("--note", help="Why; recorded and shown with the decision")]

# Every field but the arguments, which `show` prints below them as indented JSON.
_FIELDS = [
    ("id", "ID"),
    ("status", "STATUS"),
    ("created", "CREATED"),
    ("expires", "EXPIRES"),
    ("subject", "SUBJECT"),
    ("tenant", "TENANT"),
    ("tool", "TOOL"),
    ("upstream", "UPSTREAM"),
    ("target", "TARGET"),
    ("rule", "RULE"),
    ("approvers", "APPROVERS"),
    ("valid_s", "VALID S"),
    ("decided_by", "DECIDED BY"),
    ("decided", "DECIDED"),
    ("note", "NOTE"),
    ("used", "USED"),
    ("webhook", "WEBHOOK"),
    ("may_decide", "MAY DECIDE"),
]


def _pick(*names: str) -> list[tuple[str, str]]:
    headings = dict(_FIELDS)
    return [(name, headings[name]) for name in names]


_COLUMNS = _pick(
    "id", "status", "created", "expires", "subject", "tenant", "tool", "approvers", "decided_by", "may_decide"
)
_DECIDED = _pick("id", "status", "tool", "subject", "decided_by", "decided", "expires", "note")


@approvals_cli.command("list")
def approvals_list(
    status: Annotated[Status, typer.Option(help="Only requests in this state, or all")] = "pending",
    limit: Annotated[int, typer.Option(help="At most this many, newest first (1 to 500)")] = 100,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The requests you may decide (and your own), or all of them with admin:read on admin/approvals."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table

    params = {"status": status, "limit": limit}
    found = cast(list[dict[str, Any]], connect(url, token).json("GET", "/approvals", params=params))
    if as_json:
        emit_json(found)
        return
    table(found, _COLUMNS, empty=f"no {status} approval requests")
    if found:
        note(f"{len(found)} {status}; `arbiter approvals show ID` shows a request's arguments and rule")


@approvals_cli.command("show")
def approvals_show(ref: Ref, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """One request: every field, the rule that asked, and the call's arguments (redacted as audited)."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, fields

    found = cast(dict[str, Any], connect(url, token).json("GET", f"/approvals/{ref}"))
    if as_json:
        emit_json(found)
        return
    fields(found, _FIELDS)
    typer.echo("ARGUMENTS")
    pretty = json.dumps(found.get("arguments"), indent=2, sort_keys=True, default=str)
    typer.echo("\n".join(f"  {line}" for line in pretty.splitlines()))


def _decide(
    ref: str, verb: Literal["approve", "deny"], text: str | None, url: str, token: str | None, as_json: bool
) -> None:
    from arbiter.cli.client import connect
    from arbiter.cli.output import cell, emit_json, fields, note

    body = {"note": text} if text is not None else None
    decided = cast(dict[str, Any], connect(url, token).json("POST", f"/approvals/{ref}/{verb}", body=body))
    if as_json:
        emit_json(decided)
        return
    fields(decided, _DECIDED)
    until = cell(decided.get("expires"))
    if verb == "approve":
        note(f"The agent's retry of the same call runs it once, until {until}.")
    else:
        note(f"The agent's retry of the same call is told it was declined, until {until}.")


@approvals_cli.command("approve")
def approvals_approve(
    ref: Ref, note: Note = None, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False
) -> None:
    """Approve a pending request (never your own): the agent's retry of the same call runs it, once."""
    _decide(ref, "approve", note, url, token, as_json)


@approvals_cli.command("deny")
def approvals_deny(
    ref: Ref, note: Note = None, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False
) -> None:
    """Deny a pending request: the agent's retry is told so until the denial lapses."""
    _decide(ref, "deny", note, url, token, as_json)
