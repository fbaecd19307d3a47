"""``/console/policies``: the rules as a table, add/edit/delete, the impact preview of a candidate change,
decision-table tests, and "why?" for an audit record.

The same functions as ``/admin/v1/policies`` decide: rules are validated by ``policies/rules.py``,
stored by ``PolicyStore`` (versioned, recorded as the same admin change with the rules before and after),
replayed by ``audit/impact.py`` and tested by ``policies/tables.py``. Reading needs ``admin:read`` on
``admin/policies``, changing ``admin:write``; the impact preview and "why?" read the audit log, so they
need ``admin:read`` on ``admin/audit`` too.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
import yaml
from fastapi import APIRouter, Depends, Form, Request, Response

from arbiter.audit import tables
from arbiter.audit.events import admin_change
from arbiter.audit.impact import MAX_RECORDS, preview, window
from arbiter.audit.replay import recorded_call, replay
from arbiter.console.rule_form import Fields, RuleForm
from arbiter.console.web import ConsoleRoute, Viewer, form_viewer, redirect, render, viewer
from arbiter.errors import InvalidInput, NotFound
from arbiter.policies.engine import PolicyEngine
from arbiter.policies.rules import (
    ACTIONS,
    EFFECTS,
    PolicyInvalid,
    Rule,
    check_roles,
    parse_csv,
    to_csv,
)
from arbiter.policies.tables import parse_rows, run_table

router = APIRouter(route_class=ConsoleRoute)
Who = Annotated[Viewer, Depends(viewer)]
Poster = Annotated[Viewer, Depends(form_viewer)]
# Optional in the form, so that a post without the right is refused (403) before its fields are judged.
Version = Annotated[int | None, Form()]


async def _live(who: Viewer) -> list[tuple[int, Rule]]:
    await who.rt.policy.reload()  # what the database holds now, not the last poll
    return list(who.rt.policy.rule_ids)


async def _page(
    request: Request, who: Viewer, *, status: int = 200, given: RuleForm | None = None, **extra: Any
) -> Response:
    who.need(request, "policies")
    rules = await _live(who)
    context: dict[str, Any] = {
        "rules": [{"id": i, "csv": r.csv(), **r.to_json()} for i, r in rules],
        "version": who.rt.policy.engine.version,
        "policy_csv": to_csv(r for _, r in rules),
        "given": given or RuleForm(),
        "error": None,
        "errors": [],
        "tests": None,
        "cases_text": "",
        "may_write": who.may("policies", "admin:write"),
        "may_preview": who.may("audit"),
        "actions": ACTIONS,
        "effects": EFFECTS,
        "max_records": MAX_RECORDS,
    }
    context.update(extra)
    return render(request, "policies.html", who, status, **context)


def _problems(exc: InvalidInput) -> list[str]:
    found: Any = exc.details.get("errors") or []
    lines = [f"{e['message']}" for e in found if isinstance(e, dict)]
    return lines or [exc.message]


@router.get("/policies")
async def policies(request: Request, who: Who) -> Response:
    return await _page(request, who)


@router.post("/policies")
async def add(request: Request, who: Poster, given: Fields) -> Response:
    who.need(request, "policies", "admin:write")
    try:
        rule = given.rule()
        async with admin_change(who.rt.audit, who.principal, request, "policy.add", "policies") as ch:
            version = await who.rt.policy.store.add([rule], who.principal.key)
            ch.details["via"] = "console"
    except InvalidInput as exc:  # the person's to fix: shown in the form, the rule kept as typed
        return await _page(request, who, status=400, given=given, error=exc.message, errors=_problems(exc))
    await who.rt.policy.changed(version)
    who.session.flash.append(f"Rule added: {rule.csv()} (policy version {version}).")
    return redirect("/policies")


@router.get("/policies/{rule_id:int}/edit")
async def edit(request: Request, who: Who, rule_id: int) -> Response:
    who.need(request, "policies", "admin:write")
    rule = dict(await _live(who)).get(rule_id)
    if rule is None:
        raise NotFound(f"no policy rule with id {rule_id} (the policy may have changed)")
    return _edit_page(request, who, rule_id, RuleForm.of(rule), rule)


def _edit_page(
    request: Request, who: Viewer, rule_id: int, given: RuleForm, rule: Rule, status: int = 200, **extra: Any
) -> Response:
    context: dict[str, Any] = {"error": None, "errors": [], **extra}
    return render(
        request,
        "policy_edit.html",
        who,
        status,
        rule_id=rule_id,
        current=rule.csv(),
        given=given,
        version=who.rt.policy.engine.version,
        actions=ACTIONS,
        effects=EFFECTS,
        may_preview=who.may("audit"),
        **context,
    )


@router.post("/policies/{rule_id:int}")
async def save(
    request: Request, who: Poster, rule_id: int, given: Fields, expected_version: Version = None
) -> Response:
    """Replace one rule: the whole policy is swapped at once, only if it is still the version shown."""
    who.need(request, "policies", "admin:write")
    if expected_version is None:
        raise InvalidInput("the form lacks the policy version it was made from; reload the page")
    rules = await _live(who)
    old = dict(rules).get(rule_id)
    if old is None:
        raise NotFound(f"no policy rule with id {rule_id} (the policy may have changed)")
    try:
        candidate = _replaced(rules, rule_id, given.rule())
        async with admin_change(who.rt.audit, who.principal, request, "policy.replace", "policies") as ch:
            version = await who.rt.policy.store.replace(candidate, who.principal.key, expected_version)
            ch.details["via"] = "console"
    except InvalidInput as exc:
        return _edit_page(request, who, rule_id, given, old, 400, error=exc.message, errors=_problems(exc))
    await who.rt.policy.changed(version)
    who.session.flash.append(f"Rule {rule_id} changed (policy version {version}).")
    return redirect("/policies")


def _replaced(rules: list[tuple[int, Rule]], rule_id: int, new: Rule) -> list[Rule]:
    candidate = [new if i == rule_id else r for i, r in rules]
    if candidate.count(new) > 1:
        raise PolicyInvalid([{"message": f"the policy already has this rule: {new.csv()}"}])
    check_roles(candidate)
    return candidate


@router.post("/policies/{rule_id:int}/delete")
async def delete(request: Request, who: Poster, rule_id: int) -> Response:
    who.need(request, "policies", "admin:write")
    async with admin_change(who.rt.audit, who.principal, request, "policy.remove", str(rule_id)) as ch:
        version = await who.rt.policy.store.remove(rule_id, who.principal.key)
        ch.details["via"] = "console"
    await who.rt.policy.changed(version)
    who.session.flash.append(f"Rule {rule_id} deleted (policy version {version}).")
    return redirect("/policies")


# --- impact preview --------------------------------------------------------------------------------------


@router.post("/policies/impact")
async def impact(
    request: Request,
    who: Poster,
    given: Fields,
    mode: Annotated[str, Form(max_length=10)] = "add",
    rule_id: Annotated[int | None, Form()] = None,
    policy: Annotated[str, Form(max_length=1_000_000)] = "",
    since: Annotated[str, Form(max_length=40)] = "",
    until: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """Replay the window's recorded decisions against a candidate: the live rules with one rule added
    (``add``) or replaced (``edit``), or a whole policy (``csv``). Nothing is changed."""
    who.need(request, "policies")
    who.need(request, "audit")
    rules = await _live(who)
    live = [r for _, r in rules]
    try:
        if mode == "csv":
            # Off the event loop: a megabyte of rules takes seconds to parse and load, agents wait on it.
            candidate = await anyio.to_thread.run_sync(parse_csv, policy)
        elif mode == "edit" and rule_id is not None and rule_id in dict(rules):
            candidate = _replaced(rules, rule_id, given.rule())
        elif mode == "add":
            new = given.rule()
            if new in live:
                raise PolicyInvalid([{"message": f"the policy already has this rule: {new.csv()}"}])
            candidate = [*live, new]
            check_roles(candidate)
        else:
            raise InvalidInput("the rule to change is gone (the policy changed); reload the page")
        since_ms, until_ms = window(since.strip() or None, until.strip() or None)
    except InvalidInput as exc:
        errors = _problems(exc)
        if mode == "edit" and rule_id is not None and rule_id in dict(rules):
            old = dict(rules)[rule_id]
            return _edit_page(request, who, rule_id, given, old, 400, error=exc.message, errors=errors)
        return await _page(request, who, status=400, given=given, error=exc.message, errors=errors)
    snap = who.rt.catalog

    def definition(upstream: str, name: str) -> dict[str, Any] | None:
        found = snap.get(upstream)
        return found.tools.get(name) if found is not None else None

    rt = who.rt
    engine = await anyio.to_thread.run_sync(PolicyEngine, candidate, -1, limiter=rt.previews)
    found = await preview(rt.engine, engine, since_ms, until_ms, definitions=definition, limiter=rt.previews)
    return render(
        request,
        "policy_impact.html",
        who,
        report=found.to_json(),
        added=[r.csv() for r in candidate if r not in live],
        removed=[r.csv() for r in live if r not in candidate],
        mode=mode,
        rule_id=rule_id,
        given=given,
        candidate_csv=to_csv(candidate),
        version=who.rt.policy.engine.version,
        may_write=who.may("policies", "admin:write"),
    )


@router.post("/policies/replace")
async def replace(
    request: Request,
    who: Poster,
    policy: Annotated[str, Form(max_length=1_000_000)] = "",
    expected_version: Version = None,
) -> Response:
    """Apply a whole candidate policy (after its impact preview), only if the policy is still as shown."""
    who.need(request, "policies", "admin:write")
    if expected_version is None:
        raise InvalidInput("the form lacks the policy version it was made from; reload the page")
    try:
        rules = parse_csv(policy)
        async with admin_change(who.rt.audit, who.principal, request, "policy.replace", "policies") as ch:
            version = await who.rt.policy.store.replace(rules, who.principal.key, expected_version)
            ch.details["via"] = "console"
    except InvalidInput as exc:
        return await _page(request, who, status=400, error=exc.message, errors=_problems(exc))
    await who.rt.policy.changed(version)
    who.session.flash.append(f"Policy replaced (version {version}, {len(rules)} rules).")
    return redirect("/policies")


# --- decision-table tests ------------------------------------------------------------------------------


@router.post("/policies/test")
async def run_tests(
    request: Request,
    who: Poster,
    cases: Annotated[str, Form(max_length=200_000)] = "",
    policy: Annotated[str, Form(max_length=1_000_000)] = "",
) -> Response:
    """Run a decision table (YAML, as ``arbiter policy test``) against the live policy or a candidate."""
    who.need(request, "policies")
    try:
        slots = who.rt.previews  # the candidate's CPU, shared with the impact previews
        engine = (
            await anyio.to_thread.run_sync(_engine, policy, limiter=slots)
            if policy.strip()
            else who.rt.policy.engine
        )
        try:
            data: Any = yaml.safe_load(cases)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"the decision table is not valid YAML: {exc}") from None
        rows = parse_rows(data)
        # A posted candidate may cost seconds per decision: decided on a worker thread (it is this
        # request's own engine), not on the event loop that serves agents. The live one stays here.
        if policy.strip():
            outcomes = await anyio.to_thread.run_sync(run_table, engine, rows, limiter=slots)
        else:
            outcomes = run_table(engine, rows)
    except InvalidInput as exc:
        return await _page(
            request, who, status=400, error=exc.message, errors=_problems(exc), cases_text=cases
        )
    results = [{"text": o.describe(), "ok": o.ok} for o in outcomes]
    summary = {
        "policy": "candidate" if policy.strip() else "live",
        "passed": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
    }
    return await _page(request, who, tests={"results": results, **summary}, cases_text=cases)


def _engine(policy: str) -> PolicyEngine:
    return PolicyEngine(parse_csv(policy), -1)


# --- why was this call allowed or denied? --------------------------------------------------------------


@router.get("/policies/explain")
async def explain(request: Request, who: Who, seq: int) -> Response:
    """An audit record's decision, as recorded, and the live policy's decision for the same call."""
    who.need(request, "audit")
    who.need(request, "policies")
    c = tables.events.c
    async with who.rt.engine.connect() as conn:
        row = (await conn.execute(sa.select(c.body).where(c.seq == seq))).first()
    if row is None:
        raise NotFound(f"no audit record {seq} (it may have been purged by retention)")
    record: dict[str, Any] = json.loads(row.body)
    call = recorded_call(record)
    context: dict[str, Any] = {"seq": seq, "record": record, "call": None, "now": None, "rules": []}
    if call is not None:
        engine = who.rt.policy.engine
        snap = who.rt.catalog.get(call.upstream)
        now = replay(engine, call, lambda up, name: snap.tools.get(name) if snap is not None else None)
        context.update(
            call=call,
            now=now,
            rules=[r.csv() for r in engine.matching(call.subject, call.object, call.action)],
            version=engine.version,
        )
    return render(request, "policy_explain.html", who, **context)
