"""Impact preview: recorded decisions, stored through the real renderer (so redacted as in production),
replayed against a candidate policy: flips per agent and tool, redacted arguments undecidable, the cap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

from arbiter.audit.impact import MAX_RECORDS, preview, window
from arbiter.audit.record import Event, canonical, record_hash
from arbiter.audit.replay import reads, recorded_call, recorded_outcome, replay
from arbiter.errors import InvalidInput
from arbiter.policies.engine import PolicyEngine
from arbiter.policies.rules import parse_csv
from arbiter.store.db import create_engine
from tests.audit.corpus import BASE_MS, append

ALLOW_KB = "p, role:agent, *, kb/*, call, allow\n"
HOUR_MS = 3_600_000


def call(
    ts_ms: int,
    subject: str = "alice",
    tool: str = "search_docs",
    allowed: bool = True,
    args: Mapping[str, Any] | None = None,
    tenant: str = "acme",
    definition: Mapping[str, Any] | None = None,
    method: str = "tools/call",
) -> Event:
    return Event(
        kind="mcp",
        decision="allow" if allowed else "deny",
        reason="allowed" if allowed else "policy_denied",
        actor={
            "subject": subject,
            "issuer": "arbiter",
            "tenant": tenant,
            "client_id": None,
            "api_key_id": None,
            "auth_method": "api_key",
            "roles": ["agent"],
            "source_ip": "127.0.0.1",
        },
        ts_ms=ts_ms,
        method=method,
        tool=f"kb__{tool}",
        upstream="kb",
        target=tool,
        definition=definition,
        policy={
            "allowed": allowed,
            "decision": "allow" if allowed else "deny",
            "reason": "allowed" if allowed else "no_matching_rule",
            "rule": "p, role:agent, *, kb/*, call, allow" if allowed else None,
            "policy_version": 1,
        },
        policy_version=1,
        arguments={"query": "refunds", "limit": 3} if args is None else args,
    )


APPROVE_SEARCH = "p, user:alice, *, kb/search_docs, call, approve\n"


def approval(ts_ms: int, answer: str = "accepted", subject: str = "alice") -> Event:
    """A call an approve rule sent to the user, as the pipeline records it: the policy's decision is
    ``approve`` whatever the answer; the request's own ``decision`` says whether it then ran."""
    event = call(ts_ms, subject)
    ran = answer == "accepted"
    event.decision = "allow" if ran else "deny"
    event.reason = "allowed" if ran else "approval_declined"
    event.policy = {
        "allowed": False,
        "decision": "approve",
        "reason": "approval_required",
        "rule": APPROVE_SEARCH.strip(),
        "policy_version": 2,
    }
    event.outcome = {"status": "ok"} if ran else {"status": "refused", "error_code": -31051}
    event.outcome["approval"] = {"asked": "elicitation", "answer": answer}
    return event


def engine(csv: str) -> PolicyEngine:
    return PolicyEngine(parse_csv(csv), -1)


async def run(url: str, csv: str, since: int, until: int, **options: Any) -> dict[str, Any]:
    db = create_engine(url)
    try:
        return (await preview(db, engine(csv), since, until, **options)).to_json()
    finally:
        await db.dispose()


async def test_a_candidate_deny_flips_the_agents_allowed_calls_and_only_theirs(sqlite_url: str) -> None:
    await append(
        sqlite_url,
        [
            call(BASE_MS + 1, "alice"),
            call(BASE_MS + 2, "alice"),
            call(BASE_MS + 3, "bob"),
            call(BASE_MS + 4, "bob", tool="get_doc", allowed=False),  # denied then, allowed by the candidate
            call(BASE_MS + 5, "bob", method="tools/list"),  # no decision of its own to replay
        ],
    )
    candidate = "p, role:agent, *, kb/*, call, allow\np, user:alice, *, kb/search_docs, call, deny\n"
    report = await run(sqlite_url, candidate, BASE_MS, BASE_MS + HOUR_MS)
    assert (report["read"], report["replayed"], report["capped"]) == (5, 4, False)
    assert (report["allow_to_deny"], report["deny_to_allow"], report["undecidable"]) == (2, 1, 0)
    assert report["unchanged"] == 1  # bob's search
    by_agent = {a["subject"]: a for a in report["agents"]}
    assert by_agent["alice"]["allow_to_deny"] == 2 and by_agent["alice"]["tenant"] == "acme"
    assert by_agent["bob"] == {
        "subject": "bob",
        "tenant": "acme",
        "allow_to_deny": 0,
        "deny_to_allow": 1,
        "allow_to_approve": 0,
        "approve_to_allow": 0,
        "approve_to_deny": 0,
        "deny_to_approve": 0,
        "undecidable": 0,
    }
    by_tool = {t["tool"]: t for t in report["tools"]}
    assert by_tool["kb__search_docs"]["allow_to_deny"] == 2 and by_tool["kb__get_doc"]["deny_to_allow"] == 1
    flipped = [s for s in report["samples"] if s["outcome"] == "allow_to_deny"]
    assert flipped[0]["rule_after"] == "p, user:alice, *, kb/search_docs, call, deny"
    assert flipped[0]["rule_before"] == "p, role:agent, *, kb/*, call, allow"

    same = await run(sqlite_url, ALLOW_KB, BASE_MS, BASE_MS + HOUR_MS)  # the policy in force then
    assert (same["allow_to_deny"], same["unchanged"]) == (0, 3) and same["deny_to_allow"] == 1


async def test_an_approve_rule_added_over_allowed_calls_is_allow_to_approve_not_a_denial(
    sqlite_url: str,
) -> None:
    await append(
        sqlite_url,
        [
            call(BASE_MS + 1, "alice"),
            call(BASE_MS + 2, "alice"),
            call(BASE_MS + 3, "bob"),
            call(BASE_MS + 4, "alice", tool="get_doc", allowed=False),
        ],
    )
    report = await run(sqlite_url, ALLOW_KB + APPROVE_SEARCH, BASE_MS, BASE_MS + HOUR_MS)
    assert report["allow_to_approve"] == 2, report
    assert (report["allow_to_deny"], report["approve_to_deny"], report["undecidable"]) == (0, 0, 0)
    assert report["deny_to_allow"] == 1 and report["unchanged"] == 1  # get_doc (no rule then); bob's search
    alice = next(a for a in report["agents"] if a["subject"] == "alice")
    assert (alice["allow_to_approve"], alice["deny_to_allow"], alice["allow_to_deny"]) == (2, 1, 0)
    by_tool = {t["tool"]: t for t in report["tools"]}
    assert by_tool["kb__search_docs"]["allow_to_approve"] == 2
    moved = [s for s in report["samples"] if s["outcome"] == "allow_to_approve"]
    assert len(moved) == 2 and (moved[0]["before"], moved[0]["after"]) == ("allow", "approve")
    assert moved[0]["rule_after"] == APPROVE_SEARCH.strip()

    # A deny of the same calls is still a denial, next to the approve rule too (deny overrides approve).
    denied = await run(
        sqlite_url,
        ALLOW_KB + APPROVE_SEARCH + "p, user:alice, *, kb/search_docs, call, deny\n",
        BASE_MS,
        BASE_MS + HOUR_MS,
    )
    assert (denied["allow_to_deny"], denied["allow_to_approve"]) == (2, 0)
    # A denied call the candidate sends for approval.
    asked = await run(
        sqlite_url, ALLOW_KB + "p, *, *, kb/get_doc, call, approve\n", BASE_MS, BASE_MS + HOUR_MS
    )
    assert (asked["deny_to_approve"], asked["deny_to_allow"], asked["unchanged"]) == (1, 0, 3)


async def test_calls_recorded_as_approval_required_replay_as_approve_whatever_the_user_answered(
    sqlite_url: str,
) -> None:
    await append(
        sqlite_url,
        [approval(BASE_MS + 1), approval(BASE_MS + 2, "declined"), call(BASE_MS + 3, "bob")],
    )
    # The approve rule removed: both approvals would run unattended, whether the user said yes or no.
    removed = await run(sqlite_url, ALLOW_KB, BASE_MS, BASE_MS + HOUR_MS)
    assert (removed["approve_to_allow"], removed["unchanged"]) == (2, 1), removed
    assert (removed["deny_to_allow"], removed["allow_to_deny"]) == (0, 0)
    assert {(s["before"], s["after"]) for s in removed["samples"]} == {("approve", "allow")}
    assert removed["samples"][0]["rule_before"] == APPROVE_SEARCH.strip()
    assert removed["agents"][0]["subject"] == "alice" and removed["agents"][0]["approve_to_allow"] == 2

    kept = await run(sqlite_url, ALLOW_KB + APPROVE_SEARCH, BASE_MS, BASE_MS + HOUR_MS)
    assert (kept["unchanged"], kept["approve_to_allow"]) == (3, 0)
    denied = await run(
        sqlite_url, ALLOW_KB + "p, user:alice, *, kb/*, call, deny\n", BASE_MS, BASE_MS + HOUR_MS
    )
    assert (denied["approve_to_deny"], denied["allow_to_deny"], denied["unchanged"]) == (2, 0, 1)


async def test_a_condition_on_a_redacted_argument_cannot_be_decided(sqlite_url: str) -> None:
    await append(
        sqlite_url,
        [
            call(BASE_MS + 1, args={"query": "x", "password": "hunter2"}),  # a path rule redacts it
            call(BASE_MS + 2, args={"query": "mail jane@example.com", "limit": 9}),  # a detector redacts part
            call(BASE_MS + 3, args={"query": "plain", "limit": 9}),
            call(BASE_MS + 4, args={"session": {"id": "abc"}}),  # the whole mapping replaced by a marker
        ],
    )
    candidate = (
        ALLOW_KB
        + "p, role:agent, *, kb/*, call, deny, r.args.password == 'hunter2'\n"
        + "p, role:agent, *, kb/*, call, deny, r.args.query == 'mail jane@example.com'\n"
        + "p, role:agent, *, kb/*, call, deny, r.args.session.id == 'abc'\n"
    )
    report = await run(sqlite_url, candidate, BASE_MS, BASE_MS + HOUR_MS)
    assert report["undecidable"] == 3 and report["unchanged"] == 1, report
    whys = {s["seq"]: s["why"] for s in report["samples"]}
    assert all("which the record redacted" in why for why in whys.values())
    assert any("r.args.password" in why for why in whys.values())
    assert any("r.args.session.id" in why for why in whys.values())
    assert "hunter2" not in str(report).replace("'hunter2'", "")  # only the rule's own text names it

    # A condition on a field the record kept is decided, even in a record where another was redacted.
    kept = ALLOW_KB + "p, role:agent, *, kb/*, call, deny, r.args.limit > 5\n"
    decided = await run(sqlite_url, kept, BASE_MS, BASE_MS + HOUR_MS)
    assert decided["undecidable"] == 0 and decided["allow_to_deny"] == 2  # both calls with limit 9

    # An unconditional deny decides whatever the arguments were.
    fixed = (
        ALLOW_KB + "p, role:agent, *, kb/*, call, deny\np, *, *, kb/*, call, deny, r.args.password == 'x'\n"
    )
    denied = await run(sqlite_url, fixed, BASE_MS, BASE_MS + HOUR_MS)
    assert denied["undecidable"] == 0 and denied["allow_to_deny"] == 4

    # An approve condition on a redacted field cannot be decided either; next to an unconditional
    # approve, neither an allow nor an approve condition can change the outcome.
    approve_if = ALLOW_KB + "p, role:agent, *, kb/*, call, approve, r.args.password == 'hunter2'\n"
    unknown = await run(sqlite_url, approve_if, BASE_MS, BASE_MS + HOUR_MS)
    assert unknown["undecidable"] == 1 and unknown["unchanged"] == 3
    always = approve_if + "p, role:agent, *, kb/*, call, approve\n"
    asked = await run(sqlite_url, always, BASE_MS, BASE_MS + HOUR_MS)
    assert asked["undecidable"] == 0 and asked["allow_to_approve"] == 4


async def test_the_replay_stops_at_the_cap_and_says_so(sqlite_url: str) -> None:
    await append(sqlite_url, [call(BASE_MS + i * 1000, subject=f"agent-{i}") for i in range(30)])
    candidate = "p, role:agent, *, kb/get_doc, call, allow\n"
    capped = await run(sqlite_url, candidate, BASE_MS, BASE_MS + HOUR_MS, limit=10)
    assert capped["capped"] and capped["read"] == 10 and capped["allow_to_deny"] == 10
    assert {a["subject"] for a in capped["agents"]} == {f"agent-{i}" for i in range(20, 30)}  # newest first
    assert capped["oldest"].startswith("2026-01-01T00:00:20")
    whole = await run(sqlite_url, candidate, BASE_MS, BASE_MS + HOUR_MS, limit=30)
    assert not whole["capped"] and whole["read"] == 30
    narrow = await run(sqlite_url, candidate, BASE_MS + 5000, BASE_MS + 8000)  # since inclusive, until not
    assert narrow["read"] == 3
    with pytest.raises(InvalidInput):
        await run(sqlite_url, candidate, BASE_MS, BASE_MS + 1, limit=MAX_RECORDS + 1)


async def test_the_replay_stops_at_its_time_budget_and_says_so(sqlite_url: str) -> None:
    """A candidate may cost seconds per decision (a megabyte of conditional rules): the record cap alone
    does not bound the work, the time budget does. A clock that moves a second per look stands in for it."""
    await append(sqlite_url, [call(BASE_MS + i * 1000, subject=f"agent-{i}") for i in range(30)])
    ticks = iter(range(10_000))
    slow = await run(
        sqlite_url, ALLOW_KB, BASE_MS, BASE_MS + HOUR_MS, budget_s=5, clock=lambda: float(next(ticks))
    )
    assert slow["out_of_time"] and not slow["capped"] and slow["read"] == 4  # ticks 1..4 < 0 + 5
    assert slow["oldest"].startswith("2026-01-01T00:00:26")  # the newest ones were replayed
    whole = await run(sqlite_url, ALLOW_KB, BASE_MS, BASE_MS + HOUR_MS)
    assert not whole["out_of_time"] and whole["read"] == 30


async def test_previews_replay_one_at_a_time_on_the_limiter_they_are_given(sqlite_url: str) -> None:
    """However many previews are asked for at once, they take the limiter's one worker thread in turn
    (Runtime.previews): a second one waits while the first holds it, then runs."""
    await append(sqlite_url, [call(BASE_MS + i * 1000) for i in range(3)])
    slots = anyio.CapacityLimiter(1)
    found: list[dict[str, Any]] = []

    async def second() -> None:
        found.append(await run(sqlite_url, ALLOW_KB, BASE_MS, BASE_MS + HOUR_MS, limiter=slots))

    async with anyio.create_task_group() as tg:
        await slots.acquire()  # a first preview holds the thread
        tg.start_soon(second)
        with anyio.fail_after(30):
            while slots.statistics().tasks_waiting == 0:  # noqa: ASYNC110 - the limiter has no event
                await anyio.sleep(0.01)
        assert not found  # it waits for the thread
        slots.release()
    assert found[0]["read"] == 3 and not found[0]["out_of_time"]


async def test_a_condition_on_tool_annotations_needs_the_definition_the_call_used(sqlite_url: str) -> None:
    definition = {"name": "search_docs", "annotations": {"readOnlyHint": True}}
    await append(sqlite_url, [call(BASE_MS + 1, definition=definition)])
    candidate = ALLOW_KB + "p, role:agent, *, kb/*, call, deny, r.tool.readOnlyHint != True\n"
    db = create_engine(sqlite_url)
    try:
        unknown = await preview(db, engine(candidate), BASE_MS, BASE_MS + HOUR_MS)
        known = await preview(
            db, engine(candidate), BASE_MS, BASE_MS + HOUR_MS, definitions=lambda up, name: definition
        )
        changed = {**definition, "annotations": {"readOnlyHint": False}}
        other = await preview(
            db, engine(candidate), BASE_MS, BASE_MS + HOUR_MS, definitions=lambda up, name: changed
        )
    finally:
        await db.dispose()
    assert unknown.total.undecidable == 1 and "r.tool" in unknown.samples[0].why
    assert known.total.undecidable == 0 and known.unchanged == 1
    assert other.total.undecidable == 1  # not the definition the call was decided with
    assert record_hash(canonical(definition)) != record_hash(canonical(changed))


def test_what_a_condition_reads() -> None:
    paths, whole, tool = reads("r.args.a.b == 1 and r.args['x-y'] in ('p',)")
    assert (set(paths), whole, tool) == ({("a", "b"), ("x-y",)}, False, False)
    assert reads("'k' in r.args") == ((), True, False)
    assert reads("r.tool.readOnlyHint == True and r.sub.tenant == 'a'") == ((), False, True)


def test_a_record_without_a_policy_decision_is_not_replayed() -> None:
    assert recorded_call({"kind": "mcp", "method": "tools/list", "policy": None}) is None
    assert recorded_call({"kind": "admin", "method": "tools/call", "policy": {"allowed": True}}) is None
    found = recorded_call(
        {
            "kind": "mcp",
            "method": "resources/read",
            "upstream": "kb",
            "target": "kb://index",
            "policy": {"allowed": False},
            "actor": {"subject": "s", "tenant": None, "roles": ["b", "a"]},
            "args": None,
        }
    )
    assert found is not None and found.action == "read" and found.subject.roles == ("a", "b")
    assert replay(engine("p, role:a, *, kb/*, read, allow\n"), found).outcome == "deny_to_allow"


def test_the_recorded_outcome_is_the_policys_decision() -> None:
    assert (
        recorded_outcome({"allowed": False, "decision": "approve", "reason": "approval_required"})
        == "approve"
    )
    assert recorded_outcome({"allowed": True, "decision": "allow"}) == "allow"
    assert recorded_outcome({"allowed": False, "decision": "deny"}) == "deny"
    # Without a decision (an older or hand-made record): allowed, else approve by its reason, else deny.
    assert recorded_outcome({"allowed": True}) == "allow"
    assert recorded_outcome({"allowed": False, "reason": "approval_required"}) == "approve"
    assert recorded_outcome({"allowed": False, "reason": "no_matching_rule"}) == "deny"


def test_the_window_defaults_to_the_last_day_and_is_checked() -> None:
    assert window(None, None, now=BASE_MS) == (BASE_MS + 1 - 24 * HOUR_MS, BASE_MS + 1)
    assert window("2026-01-01T00:00:00Z", "2026-01-02", now=0) == (BASE_MS, BASE_MS + 24 * HOUR_MS)
    with pytest.raises(InvalidInput):
        window("2026-01-02", "2026-01-01")
