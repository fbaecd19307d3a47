"""What a caller may do with one item, and who may use it: the policy read as a report, not a decision.

``decide`` answers for one call with its arguments. A report has no arguments, so a rule with a
condition can only be shown, not evaluated: an item is ``allow`` (an unconditional allow applies and
no conditional deny could refuse), ``deny`` (an unconditional deny applies, or no allow rule does) or
``conditional`` (the outcome depends on the conditions listed). Which rules apply comes from the
engine (``PolicyEngine.matching``), so the report follows role links and tenants exactly as decisions
do; whether the item is listed at all is the engine's own ``visible``. An unconditional ``approve``
rule makes an item ``approve`` (usable once a person says yes); a conditional one makes it ``conditional``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from arbiter.policies.approvers import is_approve
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import Rule
from arbiter.store.models import ApiKey

Verdict = Literal["allow", "approve", "conditional", "deny"]
GrantKind = Literal["role", "user", "anyone"]
# What uses each kind of catalog entry (and so which action a rule must name to grant it).
KIND_ACTION = {"tool": "call", "prompt": "get", "resource": "read", "resource_template": "read"}


@dataclass(frozen=True)
class Condition:
    effect: str  # allow: usable when this holds; deny: refused when it holds; approve: asks a person
    condition: str
    rule: str

    def to_json(self) -> dict[str, str]:
        return {"effect": self.effect, "condition": self.condition, "rule": self.rule}


@dataclass(frozen=True)
class Access:
    """What one caller may do with one item (``obj`` for ``action``)."""

    visible: bool
    decision: Verdict
    reason: str  # allowed | approval_required | conditional | denied_by_rule | no_matching_rule
    rule: Rule | None  # the rule that decides, when one rule does
    conditions: tuple[Condition, ...]
    rules: tuple[Rule, ...]  # every rule that applies (use action and list), conditions not evaluated

    def to_json(self) -> dict[str, object]:
        return {
            "visible": self.visible,
            "decision": self.decision,
            "reason": self.reason,
            "rule": self.rule.csv() if self.rule else None,
            "conditions": [c.to_json() for c in self.conditions],
            "rules": [r.csv() for r in self.rules],
        }


def access(engine: PolicyEngine, sub: Subject, obj: str, action: str) -> Access:
    """The report for ``sub`` using ``obj`` with ``action`` (``call``, ``read`` or ``get``)."""
    matching = engine.matching(sub, obj, action)
    listing = [r for r in engine.matching(sub, obj, "list") if r not in matching]
    visible = engine.visible(sub, obj, action)
    rules = (*matching, *listing)
    allows = [r for r in matching if r.values[4] == "allow"]
    denies = [r for r in matching if r.values[4] == "deny"]
    approves = [r for r in matching if is_approve(r.values[4])]
    fixed_deny = next((r for r in denies if not r.values[5]), None)
    if fixed_deny is not None:
        return Access(visible, "deny", "denied_by_rule", fixed_deny, (), rules)
    if approves:
        fixed_approve = next((r for r in approves if not r.values[5]), None)
        if fixed_approve is not None and not denies:
            return Access(visible, "approve", "approval_required", fixed_approve, (), rules)
        shown = [*allows, *approves, *denies] if fixed_approve is None else denies
        conditions = tuple(Condition(r.effect, r.values[5], r.csv()) for r in shown)
        return Access(visible, "conditional", "conditional", fixed_approve, conditions, rules)
    if not allows:
        return Access(visible, "deny", "no_matching_rule", None, (), rules)
    fixed_allow = next((r for r in allows if not r.values[5]), None)
    if fixed_allow is not None and not denies:
        return Access(visible, "allow", "allowed", fixed_allow, (), rules)
    conditions = tuple(
        Condition(r.effect, r.values[5], r.csv())
        for r in (denies if fixed_allow is not None else [*allows, *denies])
    )
    return Access(visible, "conditional", "conditional", fixed_allow, conditions, rules)


# --- who may use an item ------------------------------------------------------------------------------


def named_roles(rules: Iterable[Rule]) -> list[str]:
    """Every role a rule or role link mentions, without the ``role:`` prefix."""
    found: set[str] = set()
    for rule in rules:
        names = rule.values[:2] if rule.ptype == "g" else rule.values[:1]
        found.update(n.removeprefix("role:") for n in names if n.startswith("role:"))
    return sorted(found)


def named_users(rules: Iterable[Rule]) -> list[str]:
    """Every subject a rule or role link names as ``user:<subject>``."""
    return sorted({r.values[0].removeprefix("user:") for r in rules if r.values[0].startswith("user:")})


def named_tenants(rules: Iterable[Rule]) -> list[str]:
    """The tenants rules or links name; every other tenant (or none) is decided alike, as ``""``."""
    return sorted({r.values[1] if r.ptype == "p" else r.values[2] for r in rules} - {"*"})


@dataclass(frozen=True)
class Grant:
    """One kind of caller (a role, a named user, anyone) who may use an item, in ``tenant``: ``*``
    for every tenant, a name for that tenant only, ``""`` for callers in a tenant no rule names."""

    kind: GrantKind
    name: str
    tenant: str
    access: Access

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "tenant": self.tenant, **self.access.to_json()}


def who(engine: PolicyEngine, obj: str, action: str) -> list[Grant]:
    """The roles, named users and anyone-at-all that may use ``obj`` (allowed or conditionally)."""
    tenants = [*named_tenants(engine.rules), ""]
    candidates: list[tuple[GrantKind, str, Subject]] = [("anyone", "*", Subject("", "", ()))]
    for role in named_roles(engine.rules):
        candidates.append(("role", role, Subject("", "", (role,))))
    for user in named_users(engine.rules):
        candidates.append(("user", user, Subject(user, "", ())))
    grants: list[Grant] = []
    for kind, name, base in candidates:
        per_tenant = [(t, access(engine, Subject(base.subject, t, base.roles), obj, action)) for t in tenants]
        usable = [(t, a) for t, a in per_tenant if a.decision != "deny"]
        if not usable:
            continue
        if len(usable) == len(per_tenant) and len({_same(a) for _, a in usable}) == 1:
            grants.append(Grant(kind, name, "*", usable[0][1]))
        else:
            grants.extend(Grant(kind, name, t, a) for t, a in usable)
    return grants


def _same(a: Access) -> tuple[object, ...]:
    return (a.decision, a.rule, a.conditions)


def key_active(row: ApiKey) -> bool:
    """Whether an API key still authenticates: not revoked, not expired."""
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:  # SQLite hands back naive datetimes
        expires = expires.replace(tzinfo=UTC)
    return row.revoked_at is None and (expires is None or expires > datetime.now(UTC))


def key_subject(row: ApiKey) -> Subject:
    """Who the policy sees behind an API key."""
    return Subject(row.owner, row.tenant or "", tuple(sorted(row.roles)))


def key_grants(
    engine: PolicyEngine, rows: Iterable[ApiKey], obj: str, action: str
) -> list[tuple[ApiKey, Access]]:
    """The active API keys among ``rows`` that may use ``obj`` (``action``), each with the report."""
    found = ((row, access(engine, key_subject(row), obj, action)) for row in rows if key_active(row))
    return [(row, report) for row, report in found if report.decision != "deny"]


# --- names the policy does not know ---------------------------------------------------------------------


def unknown_roles(rules: Sequence[Rule], roles: Iterable[str]) -> list[str]:
    """A warning for each of ``roles`` that no rule or role link mentions, with the nearest one that is."""
    known = named_roles(rules)
    warnings: list[str] = []
    for role in roles:
        name = role.removeprefix("role:")
        if name in known:
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        warnings.append(f"no rule mentions role {name!r}{hint}")
    return warnings
