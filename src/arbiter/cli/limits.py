"""``arbiter limits list | usage``: rate limits, budgets, tool costs and what callers used (admin API)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import typer

from arbiter.cli.app import cli
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

limits_cli = typer.Typer(
    help="Show rate limits, budgets, tool costs and usage (admin API).", no_args_is_help=True
)
cli.add_typer(limits_cli, name="limits")

_MATCH = [
    ("id", "ID"),
    ("subject", "SUBJECT"),
    ("role", "ROLE"),
    ("tenant", "TENANT"),
    ("upstream", "UPSTREAM"),
    ("tool", "TOOL"),
    ("per", "PER"),
]
_RULES = [*_MATCH, ("limit", "LIMIT"), ("period", "PER PERIOD"), ("burst", "BURST"), ("description", "NOTE")]
_BUDGETS = [*_MATCH, ("limit", "LIMIT"), ("period", "PERIOD"), ("description", "NOTE")]
_COSTS = [
    ("id", "ID"),
    ("tool", "TOOL"),
    ("cost", "COST"),
    ("loop_max_repeats", "LOOP REPEATS"),
    ("loop_window_s", "LOOP WINDOW S"),
]

_BY = ("caller", "principal", "tenant", "upstream", "tool")
Period = Literal["hour", "day", "month"]


@limits_cli.command("list")
def limits_list(url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """The rate limit rules, cost budgets and tool costs in force (with their versions)."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table

    api = connect(url, token)
    rules = cast(dict[str, Any], api.json("GET", "/limits"))
    budgets = cast(dict[str, Any], api.json("GET", "/budgets"))
    costs = cast(dict[str, Any], api.json("GET", "/tool-costs"))
    if as_json:
        emit_json({"limits": rules, "budgets": budgets, "tool_costs": costs})
        return
    table(rules.get("rules", []), _RULES, title="Rate limits", empty="none (calls are not rate limited)")
    table(budgets.get("budgets", []), _BUDGETS, title="Budgets", empty="none")
    table(costs.get("costs", []), _COSTS, title="Tool costs", empty="none")
    note(f"limits version {rules.get('version')}; default cost per call {costs.get('default_cost')}")


@limits_cli.command("usage")
def limits_usage(
    by: Annotated[
        list[str] | None,  # typer takes no list of Literal: checked below
        typer.Option(help="Group by caller, tenant, upstream or tool (repeatable; default: all)"),
    ] = None,
    period: Annotated[Period, typer.Option(help="The UTC period")] = "day",
    at: Annotated[str | None, typer.Option(help="A time in the period (ISO 8601, UTC); default now")] = None,
    caller: Annotated[str | None, typer.Option(help="Only this caller (principal)")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant")] = None,
    upstream: Annotated[str | None, typer.Option(help="Only this upstream")] = None,
    tool: Annotated[str | None, typer.Option(help="Only this tool")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows")] = 1000,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Calls, calls refused by limits, and cost in one UTC period, per caller, tenant, upstream, tool."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table
    from arbiter.errors import InvalidInput

    unknown = [b for b in by or [] if b not in _BY]
    if unknown:
        raise InvalidInput(f"--by {unknown[0]!r}: give caller, tenant, upstream or tool")
    # The API calls the caller "principal"; operators think of who called.
    groups = list(dict.fromkeys("principal" if b == "caller" else b for b in by or []))
    params: dict[str, Any] = {
        "period": period,
        "at": at,
        "group_by": groups or None,
        "principal": caller,
        "tenant": tenant,
        "upstream": upstream,
        "tool": tool,
        "limit": limit,
    }
    found = cast(dict[str, Any], connect(url, token).json("GET", "/usage", params=params))
    if as_json:
        emit_json(found)
        return
    shown = cast(list[str], found.get("group_by") or [])
    columns = [(g, "CALLER" if g == "principal" else g.upper()) for g in shown]
    columns += [("calls", "CALLS"), ("limited", "LIMITED"), ("cost", "COST")]
    title = f"Usage per {period} from {found.get('start')} to {found.get('end')}"
    table(cast(list[dict[str, Any]], found.get("rows") or []), columns, title=title, empty="no calls")
    totals = cast(dict[str, Any], found.get("totals") or {})
    calls, limited, cost = (totals.get(k, 0) for k in ("calls", "limited", "cost"))
    note(f"total: {calls} calls, {limited} limited, cost {cost}")
