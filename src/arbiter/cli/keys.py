"""``arbiter keys create | list | revoke``: agents' API keys through a running Arbiter's admin API.

(``arbiter api-key create`` writes to the database directly, for the very first admin key.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, cast

import typer

from arbiter.cli.app import cli
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

keys_cli = typer.Typer(help="Create, list and revoke API keys (admin API).", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")

_COLUMNS = [
    ("id", "ID"),
    ("owner", "OWNER"),
    ("roles", "ROLES"),
    ("tenant", "TENANT"),
    ("created_at", "CREATED"),
    ("created_by", "BY"),
    ("expires_at", "EXPIRES"),
    ("revoked_at", "REVOKED"),
    ("last_used_at", "LAST USED"),
]


@keys_cli.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="The agent or service the key is for")],
    role: Annotated[list[str], typer.Option(help="A role (repeatable), e.g. support-agent")],
    tenant: Annotated[str | None, typer.Option(help="The key's tenant")] = None,
    description: Annotated[str | None, typer.Option(help="What it is for")] = None,
    expires_in: Annotated[
        int | None, typer.Option("--expires-in", help="Lifetime in seconds (default: no expiry)")
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a key. It is printed this once: Arbiter keeps only its hash."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, fields, note

    body: dict[str, Any] = {"owner": owner, "roles": role, "tenant": tenant, "description": description}
    if expires_in is not None:
        body["expires_in_s"] = expires_in
    created = cast(dict[str, Any], connect(url, token).json("POST", "/api-keys", body=body))
    if as_json:
        emit_json(created)
    else:
        fields(created, [*_COLUMNS[:4], ("expires_at", "EXPIRES"), ("key", "KEY")])
    note("The key is shown this once and cannot be recovered: store it now.")


@keys_cli.command("list")
def keys_list(
    active: Annotated[bool, typer.Option("--active", help="Only keys neither revoked nor expired")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Every key (never the secret itself), in the server's order."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, table

    found = cast(list[dict[str, Any]], connect(url, token).json("GET", "/api-keys"))
    if active:
        now = datetime.now(UTC)
        found = [
            k
            for k in found
            if not k.get("revoked_at")
            and (not k.get("expires_at") or _parse_time(str(k["expires_at"])) > now)
        ]
    if as_json:
        emit_json(found)
    else:
        table(found, _COLUMNS, empty="no API keys")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@keys_cli.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (from `arbiter keys list`)")],
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Revoke a key: refused at once by the replica that answers, by the others soon after."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json

    connect(url, token).request("DELETE", f"/api-keys/{key_id}")
    if as_json:
        emit_json({"id": key_id, "revoked": True})
    else:
        typer.echo(f"revoked key {key_id}")
