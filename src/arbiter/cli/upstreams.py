"""``arbiter upstreams …``: register, change and review upstreams through a running Arbiter's admin API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer

from arbiter.cli.app import cli
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

if TYPE_CHECKING:
    from arbiter.cli.client import AdminClient

upstreams_cli = typer.Typer(
    help="List, add, change, refresh upstreams and review their definitions (admin API).",
    no_args_is_help=True,
)
cli.add_typer(upstreams_cli, name="upstreams")

Ref = Annotated[str, typer.Argument(help="The upstream's id or name", metavar="ID")]
Kind = Literal["tool", "prompt", "resource_template"]
Status = Literal["pending", "approved", "quarantined", "rejected", "disabled"]
Transport = Literal["streamable_http", "sse"]

_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("transport", "TRANSPORT"),
    ("url", "URL"),
    ("enabled", "ENABLED"),
    ("status", "STATUS"),
    ("tools", "TOOLS"),
    ("resources", "RESOURCES"),
    ("prompts", "PROMPTS"),
    ("auto_approve", "AUTO-APPROVE"),
    ("last_error", "LAST ERROR"),
]
_DEFINITION_COLUMNS = [
    ("kind", "KIND"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("sha256", "SHA256"),
    ("approved_sha256", "APPROVED SHA256"),
    ("findings", "FINDINGS"),
    ("reviewed_by", "REVIEWED BY"),
]

# Options of add and update (None: not given, so update leaves it as it is).
TransportOpt = Annotated[Transport | None, typer.Option(help="streamable_http (default) or sse")]
CallTimeout = Annotated[
    float | None, typer.Option("--call-timeout", "--timeout", help="Seconds a call may take")
]
ConnectTimeout = Annotated[float | None, typer.Option("--connect-timeout", help="Seconds to connect")]
MaxConcurrency = Annotated[int | None, typer.Option(help="Calls in flight to it at once")]
Fallback = Annotated[str | None, typer.Option(help="Another upstream serving the same tools")]
AutoApprove = Annotated[
    bool | None,
    typer.Option(
        "--auto-approve/--no-auto-approve",
        help="Approve its new definitions without review (security admins only)",
        show_default=False,
    ),
]


def _row(up: dict[str, Any]) -> dict[str, Any]:
    catalog = cast(dict[str, Any], up.get("catalog") or {})
    return {
        **up,
        "tools": catalog.get("tools", 0),
        "resources": catalog.get("resources", 0) + catalog.get("resource_templates", 0),
        "prompts": catalog.get("prompts", 0),
    }


def _show(up: dict[str, Any], as_json: bool) -> None:
    from arbiter.cli.output import emit_json, table

    if as_json:
        emit_json(up)
    else:
        table([_row(up)], _COLUMNS)


def resolve(api: AdminClient, ref: str) -> int:
    """An upstream's id from its id or its name (names are what operators remember)."""
    from arbiter.errors import InvalidInput

    if ref.isdigit():
        return int(ref)
    for up in cast(list[dict[str, Any]], api.json("GET", "/upstreams")):
        if up.get("name") == ref:
            return int(up["id"])
    raise InvalidInput(f"no upstream named {ref!r} (`arbiter upstreams list` shows them)")


@upstreams_cli.command("list")
def upstreams_list(url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Every upstream with its status and how many tools, resources and prompts it offers."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, table

    found = cast(list[dict[str, Any]], connect(url, token).json("GET", "/upstreams"))
    if as_json:
        emit_json(found)
    else:
        table([_row(u) for u in found], _COLUMNS, empty="no upstreams")


@upstreams_cli.command("add")
def upstreams_add(
    name: Annotated[str, typer.Argument(help="Its name: tools are exposed as <name>__<tool>")],
    target: Annotated[str, typer.Argument(metavar="URL", help="Its MCP endpoint (http:// or https://)")],
    transport: TransportOpt = None,
    call_timeout: CallTimeout = None,
    connect_timeout: ConnectTimeout = None,
    max_concurrency: MaxConcurrency = None,
    fallback: Fallback = None,
    auto_approve: AutoApprove = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Register it disabled")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Register an upstream: Arbiter connects, discovers what it offers and stores it."""
    from arbiter.cli.client import connect

    body: dict[str, Any] = {"name": name, "url": target, "enabled": not disabled}
    optional = {
        "transport": transport,
        "call_timeout_s": call_timeout,
        "connect_timeout_s": connect_timeout,
        "max_concurrency": max_concurrency,
        "fallback": fallback,
        "auto_approve": auto_approve,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    _show(connect(url, token).json("POST", "/upstreams", body=body), as_json)


@upstreams_cli.command("update")
def upstreams_update(
    ref: Ref,
    target: Annotated[str | None, typer.Option("--upstream-url", help="A new MCP endpoint")] = None,
    transport: TransportOpt = None,
    call_timeout: CallTimeout = None,
    connect_timeout: ConnectTimeout = None,
    max_concurrency: MaxConcurrency = None,
    fallback: Fallback = None,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Remove its fallback")] = False,
    auto_approve: AutoApprove = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Change what is given and leave the rest as it is."""
    from arbiter.cli.client import connect
    from arbiter.errors import InvalidInput

    body: dict[str, Any] = {
        k: v
        for k, v in {
            "url": target,
            "transport": transport,
            "call_timeout_s": call_timeout,
            "connect_timeout_s": connect_timeout,
            "max_concurrency": max_concurrency,
            "fallback": fallback,
            "auto_approve": auto_approve,
        }.items()
        if v is not None
    }
    if no_fallback:
        body["fallback"] = None  # an explicit null clears it
    if not body:
        raise InvalidInput("nothing to change: give at least one option (see --help)")
    api = connect(url, token)
    _show(api.json("PATCH", f"/upstreams/{resolve(api, ref)}", body=body), as_json)


def _set_enabled(ref: str, enabled: bool, url: str, token: str | None, as_json: bool) -> None:
    from arbiter.cli.client import connect

    api = connect(url, token)
    _show(api.json("PATCH", f"/upstreams/{resolve(api, ref)}", body={"enabled": enabled}), as_json)


@upstreams_cli.command("disable")
def upstreams_disable(ref: Ref, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Stop sending calls to it; agents no longer see its tools (it stays registered)."""
    _set_enabled(ref, False, url, token, as_json)


@upstreams_cli.command("enable")
def upstreams_enable(ref: Ref, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Use it again."""
    _set_enabled(ref, True, url, token, as_json)


@upstreams_cli.command("refresh")
def upstreams_refresh(ref: Ref, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Re-discover what it offers now."""
    from arbiter.cli.client import connect
    from arbiter.cli.progress import spinner

    api = connect(url, token)
    upstream_id = resolve(api, ref)
    with spinner(f"refreshing upstream {ref}"):
        _show(api.json("POST", f"/upstreams/{upstream_id}/refresh"), as_json)


@upstreams_cli.command("definitions")
def upstreams_definitions(
    ref: Ref,
    status: Annotated[Status | None, typer.Option(help="Only these, e.g. pending (the review queue)")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Its tools, prompts and resource templates: review status and the sha256 approve/reject take."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, table

    api = connect(url, token)
    found = cast(
        list[dict[str, Any]],
        api.json("GET", f"/upstreams/{resolve(api, ref)}/definitions", params={"status": status}),
    )
    if as_json:
        emit_json(found)
        return
    rows = [{**d, "findings": len(cast(list[object], d.get("findings") or []))} for d in found]
    table(rows, _DEFINITION_COLUMNS, empty="no definitions" + (f" with status {status}" if status else ""))


def _decide(
    action: str,
    ref: str,
    kind: str,
    name: str,
    sha256: str,
    acknowledge: bool,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Approve or reject one definition, and show what it is now."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, table

    api = connect(url, token)
    body = {"items": [{"kind": kind, "name": name, "sha256": sha256}], "acknowledge_findings": acknowledge}
    done = cast(
        list[dict[str, Any]],
        api.json("POST", f"/upstreams/{resolve(api, ref)}/definitions/{action}", body=body),
    )
    if as_json:
        emit_json(done)
    else:
        table(done, _DEFINITION_COLUMNS[:4])


KindArg = Annotated[Kind, typer.Argument(help="tool, prompt or resource_template")]
NameArg = Annotated[str, typer.Argument(help="Its name at the upstream")]
ShaArg = Annotated[str, typer.Argument(help="The sha256 of the definition you reviewed")]


@upstreams_cli.command("approve")
def upstreams_approve(
    ref: Ref,
    kind: KindArg,
    name: NameArg,
    sha256: ShaArg,
    acknowledge_findings: Annotated[
        bool, typer.Option(help="Approve although the scans flagged it (you read the findings)")
    ] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Let agents use exactly this definition (security admins only)."""
    _decide("approve", ref, kind, name, sha256, acknowledge_findings, url, token, as_json)


@upstreams_cli.command("reject")
def upstreams_reject(
    ref: Ref,
    kind: KindArg,
    name: NameArg,
    sha256: ShaArg,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Refuse this definition: agents do not get it (security admins only)."""
    _decide("reject", ref, kind, name, sha256, False, url, token, as_json)
