"""Impact preview: which recorded decisions a candidate policy would change, before it is applied.

The decisions of a window of the audit log (default: the last 24 hours), newest first and at most
``MAX_RECORDS`` of them, are replayed (audit/replay.py) against the candidate; the answer counts every
change of outcome between allow, approve and deny (``allow_to_deny``, ``allow_to_approve``, …) and the
undecidable ones per agent (subject and tenant) and per tool, and lists the first of them. The
allow↔deny counts kept their names and meaning when approve came: a move to or from approve has its own.

A replay also stops after ``MAX_SECONDS``: a decision's cost grows with the candidate's rules (a megabyte
of conditional rules costs seconds per decision), and whoever may preview may post any candidate, so the
record cap alone does not bound the work. One function for the admin API
(``POST /admin/v1/policies/impact``) and the console's policies page.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit.query import Filters, StoredRow, parse_time, stream_pages
from arbiter.audit.record import iso_ms, now_ms
from arbiter.audit.replay import (
    CHANGES,
    Definitions,
    Outcome,
    Replayed,
    Replayer,
    Verdict,
    no_definitions,
    recorded_call,
)
from arbiter.errors import InvalidInput
from arbiter.policies.engine import PolicyEngine

MAX_RECORDS = 10_000
MAX_SECONDS = 20.0  # replay time at most, whatever the candidate; the records replayed by then are reported
DEFAULT_WINDOW_MS = 24 * 3600 * 1000
SAMPLES = 50  # flipped or undecidable records listed one by one
_PAGE = 1000


@dataclass
class Tally:
    allow_to_deny: int = 0
    deny_to_allow: int = 0
    allow_to_approve: int = 0
    approve_to_allow: int = 0
    approve_to_deny: int = 0
    deny_to_approve: int = 0
    undecidable: int = 0

    def add(self, outcome: Outcome) -> None:
        if outcome != "same":
            setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def changed(self) -> int:
        return sum(getattr(self, name) for name in CHANGES)

    def to_json(self) -> dict[str, int]:
        return {**{name: getattr(self, name) for name in CHANGES}, "undecidable": self.undecidable}


@dataclass(frozen=True)
class Sample:
    seq: int
    ts: str
    subject: str
    tenant: str
    tool: str
    action: str
    outcome: Outcome
    before: Verdict
    after: Verdict | None  # None when undecidable
    rule_before: str | None
    rule_after: str | None
    why: str

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "subject": self.subject,
            "tenant": self.tenant,
            "tool": self.tool,
            "action": self.action,
            "outcome": self.outcome,
            "before": self.before,
            "after": self.after,
            "rule_before": self.rule_before,
            "rule_after": self.rule_after,
            "why": self.why,
        }


@dataclass
class Impact:
    since_ms: int
    until_ms: int
    limit: int
    read: int = 0  # mcp records read from the window
    replayed: int = 0  # of those, the ones holding a policy decision
    capped: bool = False  # the window holds more records than ``limit``: the oldest were not read
    out_of_time: bool = False  # stopped at the time budget: the older records were not replayed
    oldest_ms: int | None = None  # the oldest record read
    total: Tally = field(default_factory=Tally)
    agents: dict[tuple[str, str], Tally] = field(default_factory=dict[tuple[str, str], Tally])
    tools: dict[str, Tally] = field(default_factory=dict[str, Tally])
    samples: list[Sample] = field(default_factory=list[Sample])

    @property
    def unchanged(self) -> int:
        t = self.total
        return self.replayed - t.changed - t.undecidable

    def add(self, seq: int, record: dict[str, Any], result: Replayed, tool: str, action: str) -> None:
        self.replayed += 1
        if result.outcome == "same":
            return
        subject, tenant = str(record.get("subject") or ""), str(record.get("tenant") or "")
        self.total.add(result.outcome)
        self.agents.setdefault((subject, tenant), Tally()).add(result.outcome)
        self.tools.setdefault(tool, Tally()).add(result.outcome)
        if len(self.samples) < SAMPLES:
            policy: Any = record.get("policy")
            before: Any = cast(dict[str, Any], policy).get("rule") if isinstance(policy, dict) else None
            after = result.after.rule.csv() if result.after is not None and result.after.rule else None
            self.samples.append(
                Sample(
                    seq=seq,
                    ts=str(record.get("ts") or ""),
                    subject=subject,
                    tenant=tenant,
                    tool=tool,
                    action=action,
                    outcome=result.outcome,
                    before=result.before,
                    after=result.after.outcome if result.after is not None else None,
                    rule_before=before if isinstance(before, str) else None,
                    rule_after=after,
                    why=result.why,
                )
            )

    def to_json(self) -> dict[str, object]:
        def ranked(tallies: dict[Any, Tally]) -> list[tuple[Any, Tally]]:
            return sorted(tallies.items(), key=lambda kv: (-sum(kv[1].to_json().values()), str(kv[0])))

        return {
            "since": iso_ms(self.since_ms),
            "until": iso_ms(self.until_ms),
            "limit": self.limit,
            "read": self.read,
            "replayed": self.replayed,
            "capped": self.capped,
            "out_of_time": self.out_of_time,
            "oldest": iso_ms(self.oldest_ms) if self.oldest_ms is not None else None,
            "unchanged": self.unchanged,
            **self.total.to_json(),
            "agents": [
                {"subject": s, "tenant": t, **tally.to_json()} for (s, t), tally in ranked(self.agents)
            ],
            "tools": [{"tool": name, **tally.to_json()} for name, tally in ranked(self.tools)],
            "samples": [s.to_json() for s in self.samples],
        }


def window(since: str | None, until: str | None, now: int | None = None) -> tuple[int, int]:
    """The window asked for (ISO 8601 or epoch ms); by default the 24 hours before ``until`` (now)."""
    until_ms = parse_time(until, "until") if until else (now if now is not None else now_ms()) + 1
    since_ms = parse_time(since, "since") if since else until_ms - DEFAULT_WINDOW_MS
    if since_ms >= until_ms:
        raise InvalidInput("'since' must be earlier than 'until' (since is inclusive, until exclusive)")
    return since_ms, until_ms


async def preview(
    db: AsyncEngine,
    candidate: PolicyEngine,
    since_ms: int,
    until_ms: int,
    *,
    limit: int = MAX_RECORDS,
    definitions: Definitions = no_definitions,
    budget_s: float = MAX_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    limiter: anyio.CapacityLimiter | None = None,
) -> Impact:
    """Replay the newest ``limit`` decisions of ``[since_ms, until_ms)`` against ``candidate``, for
    ``budget_s`` at most, on worker threads that ``limiter`` (``Runtime.previews``) admits."""
    if not 1 <= limit <= MAX_RECORDS:
        raise InvalidInput(f"'limit' must be from 1 to {MAX_RECORDS}; got {limit}")
    impact = Impact(since_ms, until_ms, limit)
    replay = Replayer(candidate, definitions)
    deadline = clock() + budget_s
    filters = Filters(since_ms=since_ms, until_ms=until_ms, kind="mcp")
    pages = cast(  # an async generator: closed at once when the cap stops the replay early
        AsyncGenerator[list[StoredRow]],
        stream_pages(db, filters, order="desc", page_size=min(_PAGE, limit + 1)),
    )
    async with aclosing(pages):
        async for rows in pages:
            # Replaying is CPU work (a cold Casbin decision with a condition costs about a millisecond):
            # a page at a time on a worker thread, so the event loop keeps serving agents meanwhile.
            page = (impact, replay, rows, clock, deadline)
            if await anyio.to_thread.run_sync(_replay_page, *page, limiter=limiter):
                break
    return impact


def _replay_page(
    impact: Impact, replay: Replayer, rows: list[StoredRow], clock: Callable[[], float], deadline: float
) -> bool:
    """Replay one page into ``impact``; True once the cap is reached and a record beyond it exists, or
    the time is up."""
    for row in rows:
        if impact.read == impact.limit:
            impact.capped = True
            return True
        if clock() >= deadline:
            impact.out_of_time = True
            return True
        impact.read += 1
        impact.oldest_ms = row.ts_ms
        record: dict[str, Any] = json.loads(row.body)
        call = recorded_call(record)
        if call is None:
            continue
        tool = str(record.get("tool") or call.object)
        impact.add(row.seq, record, replay(call), tool, call.action)
    return False
