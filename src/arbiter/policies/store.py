"""Policies in the database: a Casbin adapter over Arbiter's tables, and versioned, atomic changes.

Every change (add, remove, replace-all) bumps ``policy_state.version`` in the same transaction as the
rules, so a replica that sees a version sees exactly the rules written with it. Readers take the
version first and the rules second: at worst they load newer rules under an older number and load
again on the next check, never older rules under a newer number.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import casbin  # pyright: ignore[reportMissingTypeStubs]
from casbin.persist.adapters.asyncio import AsyncAdapter  # pyright: ignore[reportMissingTypeStubs]
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.errors import Conflict, NotFound
from arbiter.policies.enforcers import MODEL_TEXT, AsyncEnforcer, casbin_ptype
from arbiter.policies.engine import PolicyEngine
from arbiter.policies.rules import Rule, check, check_roles
from arbiter.store.models import PolicyRuleRow, PolicyState, utcnow

log = logging.getLogger(__name__)

ChangeKind = Literal["add", "remove", "replace"]


@dataclass(frozen=True)
class PolicyChange:
    """Who changed the policy, how, and the rules before/after: the audit log's record of it."""

    actor: str
    kind: ChangeKind
    version: int
    before: list[str] = field(default_factory=list[str])  # Casbin CSV lines
    after: list[str] = field(default_factory=list[str])


ChangeSink = Callable[[PolicyChange], Awaitable[None]]


async def log_change(change: PolicyChange) -> None:
    """The default sink until the audit log stores changes: one log line per change."""
    log.info(
        "policy %s by %s -> version %d (%d rule(s) before, %d after)",
        change.kind,
        change.actor,
        change.version,
        len(change.before),
        len(change.after),
    )


def _row(rule: Rule) -> PolicyRuleRow:
    values = [*rule.values, "", "", ""][:6]
    return PolicyRuleRow(
        ptype=rule.ptype, v0=values[0], v1=values[1], v2=values[2], v3=values[3], v4=values[4], v5=values[5]
    )


def _rule(row: PolicyRuleRow) -> Rule:
    if row.ptype == "g":
        return Rule("g", (row.v0, row.v1, row.v2))
    return Rule("p", (row.v0, row.v1, row.v2, row.v3, row.v4, row.v5))


class SqlModelAdapter(AsyncAdapter):  # pyright: ignore[reportUntypedBaseClass]
    """Casbin's async adapter over ``policy_rules``; writes go through ``PolicyStore`` (versioned)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self.version = 0
        self.rules: list[tuple[int, Rule]] = []

    async def load_policy(self, model: Any) -> None:
        async with self._sessions() as session:
            state = await session.get(PolicyState, 1)
            self.version = state.version if state else 0
            rows = (await session.exec(select(PolicyRuleRow).order_by(col(PolicyRuleRow.id)))).all()
        self.rules = []
        for row in rows:
            rule = _rule(row)
            try:
                check(rule)
            except ValueError as exc:  # only a hand-edited row gets here: skipping it can only deny more
                log.error("ignoring invalid policy row %s: %s", row.id, exc)
                continue
            assert row.id is not None
            self.rules.append((row.id, rule))
            model.add_policy(rule.ptype, casbin_ptype(rule), list(rule.values))

    async def save_policy(self, model: Any) -> None:
        raise NotImplementedError("policies change through PolicyStore, which versions every change")

    async def add_policy(self, sec: str, ptype: str, rule: list[str]) -> None:
        raise NotImplementedError("policies change through PolicyStore, which versions every change")

    async def remove_policy(self, sec: str, ptype: str, rule: list[str]) -> None:
        raise NotImplementedError("policies change through PolicyStore, which versions every change")

    async def remove_filtered_policy(
        self, sec: str, ptype: str, field_index: int, *field_values: str
    ) -> None:
        raise NotImplementedError("policies change through PolicyStore, which versions every change")


class PolicyStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sink: ChangeSink = log_change) -> None:
        self._sessions = sessions
        self.sink = sink

    async def version(self) -> int:
        async with self._sessions() as session:
            state = await session.get(PolicyState, 1)
            return state.version if state else 0

    async def load(self) -> tuple[PolicyEngine, list[tuple[int, Rule]]]:
        """The live policy as an engine, plus its rules with their row ids (for the admin API)."""
        adapter = SqlModelAdapter(self._sessions)
        enforcer: Any = AsyncEnforcer(casbin.Enforcer.new_model(text=MODEL_TEXT), adapter)  # pyright: ignore[reportUnknownMemberType]
        engine = await PolicyEngine.load_into(enforcer, adapter)
        return engine, adapter.rules

    async def add(self, rules: Sequence[Rule], actor: str) -> int:
        async with self._sessions() as session, session.begin():
            # Lock the version row first, so concurrent adds on other replicas check against this one's.
            await session.get(PolicyState, 1, with_for_update=True)
            existing = [_rule(r) for r in (await session.exec(select(PolicyRuleRow))).all()]
            duplicates = [r.csv() for r in rules if r in existing]
            if duplicates:
                raise Conflict("the policy already has this rule", rules=duplicates)
            check_roles([*existing, *rules])
            version = await _bump(session, actor)
            session.add_all([_row(r) for r in rules])
        await self.sink(PolicyChange(actor, "add", version, after=[r.csv() for r in rules]))
        return version

    async def remove(self, rule_id: int, actor: str) -> int:
        async with self._sessions() as session, session.begin():
            row = await session.get(PolicyRuleRow, rule_id)
            if row is None:
                raise NotFound(f"no policy rule with id {rule_id}")
            removed = _rule(row)
            await session.delete(row)
            version = await _bump(session, actor)
        await self.sink(PolicyChange(actor, "remove", version, before=[removed.csv()]))
        return version

    async def replace(self, rules: Sequence[Rule], actor: str, expected_version: int | None = None) -> int:
        """Swap the whole policy in one transaction; with ``expected_version``, only if it is current."""
        async with self._sessions() as session, session.begin():
            current = await session.get(PolicyState, 1, with_for_update=True)
            if expected_version is not None and (current.version if current else 0) != expected_version:
                raise Conflict(
                    "the policy changed since you read it",
                    expected_version=expected_version,
                    current_version=current.version if current else 0,
                )
            before = [_rule(r).csv() for r in (await session.exec(select(PolicyRuleRow))).all()]
            await session.exec(delete(PolicyRuleRow))  # type: ignore[call-overload]
            session.add_all([_row(r) for r in rules])
            version = await _bump(session, actor)
        await self.sink(
            PolicyChange(actor, "replace", version, before=before, after=[r.csv() for r in rules])
        )
        return version


async def _bump(session: AsyncSession, actor: str) -> int:
    # The UPDATE takes the row lock, so concurrent changes on other replicas queue behind this one.
    await session.exec(  # type: ignore[call-overload]
        update(PolicyState)
        .where(col(PolicyState.id) == 1)
        .values(version=PolicyState.version + 1, updated_at=utcnow(), updated_by=actor[:200])
    )
    state = await session.get(PolicyState, 1, populate_existing=True)
    if state is None:
        raise NotFound("policy_state is missing its row; run `arbiter migrate`")
    return state.version
