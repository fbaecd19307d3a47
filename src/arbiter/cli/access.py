"""``arbiter access show | who``: what a caller can do, and who can use a tool, from a running Arbiter.

Both ask the admin API (``GET /admin/v1/access`` and ``/access/who``; ``admin:read`` on
``admin/policies``) with the shared ``--url``/``--token`` options of client.py.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

import typer

from arbiter.cli.app import cli
from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url

access_cli = typer.Typer(
    help="What an API key, role or subject can see and use, and who can use a tool (admin API).",
    no_args_is_help=True,
)
cli.add_typer(access_cli, name="access")

_KINDS = (
    ("tools", "Tools"),
    ("prompts", "Prompts"),
    ("resources", "Resources"),
    ("resource_templates", "Resource templates"),
)


def why(item: dict[str, Any]) -> str:
    """The rule that decides, or the conditions when they decide, on one line."""
    conditions = cast(list[dict[str, str]], item.get("conditions") or [])
    if conditions:
        parts = [
            f"{'allowed' if c['effect'] == 'allow' else 'denied'} when {c['condition']}" for c in conditions
        ]
        return "; ".join(parts)
    if item.get("rule"):
        return str(item["rule"])
    return "no rule allows it" if item.get("decision") == "deny" else "-"


def limits_text(limits: dict[str, Any] | None) -> str:
    if not limits:
        return "-"
    parts: list[str] = []
    for rule in cast(list[dict[str, Any]], limits.get("rate_limits") or []):
        per = ",".join(rule.get("per") or []) or "shared"
        parts.append(f"{rule['limit']}/{rule['period']} per {per} (#{rule['id']})")
    for budget in cast(list[dict[str, Any]], limits.get("budgets") or []):
        per = ",".join(budget.get("per") or []) or "shared"
        parts.append(f"budget {budget['limit']:g}/{budget['period']} per {per} (#{budget['id']})")
    parts.append(f"cost {limits.get('cost', 1):g}")
    return "; ".join(parts)


@access_cli.command("show")
def access_show(
    key_id: Annotated[str | None, typer.Option("--key-id", help="An API key's id")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="A role (repeatable)")] = None,
    subject: Annotated[str | None, typer.Option(help="The caller's subject")] = None,
    tenant: Annotated[str | None, typer.Option(help="The caller's tenant")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Every tool, prompt and resource the caller sees, the rule or conditions, and the limits."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table
    from arbiter.errors import InvalidInput

    if key_id is None and not role and subject is None:
        raise InvalidInput("give --key-id, or --role (repeatable) and/or --subject with --tenant")
    params: dict[str, str | list[str] | None] = {
        "key_id": key_id,
        "role": role or None,
        "subject": subject,
        "tenant": tenant,
    }
    report = cast(dict[str, Any], connect(url, token).json("GET", "/access", params=params))
    if as_json:
        emit_json(report)
    else:
        who = cast(dict[str, Any], report["principal"])
        name = f"key {who['key_id']} ({who['subject']})" if who.get("key_id") else who["subject"]
        name = (name or "(any subject)") + ("" if who.get("active", True) else " [revoked or expired]")
        roles = ", ".join(who["roles"]) or "-"
        note(f"{name}: roles {roles}, tenant {who.get('tenant') or '-'}, policy {report['policy_version']}")
        for key, title in _KINDS:
            rows = [
                {
                    **item,
                    "why": why(item),
                    "limits_text": limits_text(item.get("limits")),
                    "state": "" if item.get("available", True) else "upstream unavailable",
                }
                for item in cast(list[dict[str, Any]], report[key])
            ]
            columns = [("name", "NAME"), ("decision", "DECISION"), ("why", "RULE / CONDITIONS")]
            if key == "tools":
                columns.append(("limits_text", "LIMITS"))
            if any(row["state"] for row in rows):
                columns.append(("state", "NOTE"))
            table(rows, columns, title=title)
    for warning in cast(list[str], report.get("warnings") or []):
        note(f"warning: {warning}")


@access_cli.command("who")
def access_who(
    tool: Annotated[
        str, typer.Argument(help="The tool as agents see it (crm__get_customer) or crm/get_customer")
    ],
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Which roles, users named in the policy and API keys may use TOOL, and by which rule."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table

    report = cast(dict[str, Any], connect(url, token).json("GET", "/access/who", params={"tool": tool}))
    if as_json:
        emit_json(report)
    else:
        grants = [
            {**g, "why": why(g), "tenant": g["tenant"] or "(other tenants)"}
            for g in cast(list[dict[str, Any]], report["grants"])
        ]
        table(
            grants,
            [
                ("kind", "KIND"),
                ("name", "NAME"),
                ("tenant", "TENANT"),
                ("decision", "DECISION"),
                ("why", "RULE / CONDITIONS"),
            ],
            title=f"Who may call {report['tool']} (policy version {report['policy_version']})",
            empty="nobody",
        )
        keys = [{**k, "why": why(k)} for k in cast(list[dict[str, Any]], report["api_keys"])]
        table(
            keys,
            [
                ("id", "KEY ID"),
                ("owner", "OWNER"),
                ("roles", "ROLES"),
                ("tenant", "TENANT"),
                ("decision", "DECISION"),
                ("why", "RULE / CONDITIONS"),
            ],
            title="API keys",
        )
    for warning in cast(list[str], report.get("warnings") or []):
        note(f"warning: {warning}")
