"""``/console/access``: what can this agent do (an API key, roles, or a subject and tenant), and who can
call a tool: the answers of ``GET /admin/v1/access`` and ``/access/who``, as pages.

The decisions come from ``policies/access.py`` (``access`` and ``who``, which follow role links and
tenants exactly as decisions do) and ``limits/rules.py`` (``select``, ``tool_settings``); this module
only walks the catalog and lays them out. Needs ``admin:read`` on ``admin/policies``; choosing by API
key, or seeing which keys may call a tool, also needs ``admin:read`` on ``admin/api-keys``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from arbiter.auth.apikeys import ISSUER
from arbiter.auth.principal import Principal
from arbiter.console.web import ConsoleRoute, Viewer, query_text, render, viewer
from arbiter.errors import InvalidInput
from arbiter.limits.rules import select, tool_settings
from arbiter.naming import exposed_name, exposed_target
from arbiter.policies.access import KIND_ACTION, Access, access, key_active, key_grants, unknown_roles, who
from arbiter.policies.engine import Subject
from arbiter.policies.tables import object_name

router = APIRouter(route_class=ConsoleRoute)
Who = Annotated[Viewer, Depends(viewer)]


def _shown(a: Access) -> dict[str, Any]:
    return {
        "decision": a.decision,
        "reason": a.reason,
        "rule": a.rule.csv() if a.rule else None,
        "conditions": [c.to_json() for c in a.conditions],
    }


async def _caller(request: Request, who_: Viewer, given: dict[str, str]) -> tuple[Principal, bool]:
    """The principal asked about, and whether it is active (a revoked or expired key is not)."""
    roles = sorted({r.strip().removeprefix("role:") for r in given["roles"].split(",") if r.strip()})
    if given["key_id"]:
        if roles or given["subject"] or given["tenant"]:
            raise InvalidInput("choose an API key, or roles and a subject, not both")
        who_.need(request, "api-keys")
        row = await who_.rt.keys.get(given["key_id"])
        found = Principal(
            row.owner,
            ISSUER,
            "api_key",
            row.tenant,
            frozenset(row.roles),
            client_id=row.id,
            api_key_id=row.id,
        )
        return found, key_active(row)
    if roles or given["subject"]:
        return Principal(given["subject"], ISSUER, "api_key", given["tenant"] or None, frozenset(roles)), True
    raise InvalidInput("choose an API key, or give at least one role or a subject (with its tenant)")


@router.get("/access")
async def agent(request: Request, who_: Who) -> Response:
    """Every tool, prompt and resource the caller sees, with the deciding rule, conditions and limits."""
    who_.need(request, "policies")
    params = request.query_params
    given = {name: query_text(params, name)[:256] for name in ("key_id", "roles", "subject", "tenant")}
    may_keys = who_.may("api-keys")
    keys = [k for k in await who_.rt.keys.list() if key_active(k)] if may_keys else []
    context: dict[str, Any] = {"given": given, "keys": keys, "report": None, "error": None}
    if any(given.values()):
        try:
            context["report"] = await _report(request, who_, given)
        except InvalidInput as exc:
            context["error"] = exc.message
    status = 400 if context["error"] else 200
    return render(request, "access.html", who_, status, **context)


async def _report(request: Request, who_: Viewer, given: dict[str, str]) -> dict[str, Any]:
    rt = who_.rt
    caller, active = await _caller(request, who_, given)
    engine = rt.policy.engine
    config = await rt.limits.reload()
    sub = Subject.of(caller)
    warnings = unknown_roles(engine.rules, sub.roles)
    if not active:
        warnings.append("this API key is revoked or expired: it can do nothing")
    items: dict[str, list[dict[str, Any]]] = {
        "tool": [],
        "prompt": [],
        "resource": [],
        "resource_template": [],
    }
    hidden = set(rt.catalog.hidden())
    for upstream in rt.catalog.upstreams() if active else []:
        snap = rt.catalog.get(upstream)
        if snap is None:
            continue
        for kind, name, _definition in snap.items():  # approved entries only, as agents see them
            found = access(engine, sub, f"{upstream}/{name}", KIND_ACTION[kind])
            if not found.visible:
                continue
            item: dict[str, Any] = {
                "name": exposed_target(kind, upstream, name),
                "available": upstream not in hidden,
            }
            if kind == "tool":
                item["rates"] = select(config.rules, caller, upstream, name)
                item["budgets"] = select(config.budgets, caller, upstream, name)
                item["cost"] = tool_settings(config.costs, upstream, name, rt.limits.defaults).cost
            items[kind].append({**item, **_shown(found)})
    return {
        "subject": caller.subject,
        "roles": sorted(caller.roles),
        "tenant": caller.tenant,
        "active": active,
        "policy_version": engine.version,
        "limits_version": config.version,
        "warnings": warnings,
        "tools": items["tool"],
        "others": [*items["prompt"], *items["resource"], *items["resource_template"]],
    }


@router.get("/access/who")
async def tool_callers(request: Request, who_: Who) -> Response:
    """Which roles, users the policy names, and API keys may call a tool."""
    who_.need(request, "policies")
    tool = query_text(request.query_params, "tool")[:1100]
    context: dict[str, Any] = {"tool": tool, "report": None, "error": None}
    if tool:
        obj = object_name(tool)
        upstream, sep, name = obj.partition("/")
        if not sep or not upstream or not name:
            context["error"] = "a tool is <upstream>__<tool> or <upstream>/<tool>"
        else:
            context["report"] = await _who(who_, obj, upstream, name)
    return render(request, "access_who.html", who_, 400 if context["error"] else 200, **context)


async def _who(who_: Viewer, obj: str, upstream: str, name: str) -> dict[str, Any]:
    rt = who_.rt
    engine = rt.policy.engine
    notice = rt.catalog.tool_notice(upstream, name)
    warnings: list[str] = [notice] if notice is not None else []
    grants = [
        {"kind": g.kind, "name": g.name, "tenant": g.tenant, **_shown(g.access)}
        for g in who(engine, obj, "call")
    ]
    keys: list[dict[str, Any]] = []
    if who_.may("api-keys"):
        for row, found in key_grants(engine, await rt.keys.list(), obj, "call"):
            keys.append({"id": row.id, "owner": row.owner, "roles": sorted(row.roles), **_shown(found)})
    else:
        warnings.append("API keys are not listed: that needs admin:read on admin/api-keys")
    return {
        "tool": exposed_name(upstream, name),
        "object": obj,
        "policy_version": engine.version,
        "grants": grants,
        "api_keys": keys,
        "warnings": warnings,
    }
