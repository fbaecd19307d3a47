"""``PolicyEngine``: Arbiter's façade over a Casbin enforcer for one version of the policy.

An engine never changes: a new policy version is a new engine, swapped in whole, so a request is
decided by exactly one version and every cache below dies with the version it was computed from.

Nothing here grows with the number of distinct callers. Role links are followed in Arbiter's own map
of the ``g`` rules (``roles.py``), and decisions are cached per *policy identity*: callers the policy cannot
tell apart (the same named subjects reached, the same tenant where a rule names it, the same subject
fields read by a condition that could apply) share one entry.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import casbin  # pyright: ignore[reportMissingTypeStubs]
from cachetools import FIFOCache
from casbin.core_enforcer import EnforceContext  # pyright: ignore[reportMissingTypeStubs]

from arbiter.auth.principal import Principal
from arbiter.globs import glob_match
from arbiter.policies.conditions import CallArgs, holds
from arbiter.policies.enforcers import MODEL_TEXT, Enforcer, RulesAdapter, casbin_ptype
from arbiter.policies.roles import RoleGraph
from arbiter.policies.rules import SUBJECT_FIELDS, Rule, compile_condition

_VISIBILITY = EnforceContext(rtype="r", ptype="p", etype="e", mtype="m2")
# Approve rules live under their own policy type (model.conf): m3 decides with conditions, m4 for lists.
_APPROVAL = EnforceContext(rtype="r", ptype="p2", etype="e", mtype="m3")
_APPROVAL_VISIBILITY = EnforceContext(rtype="r", ptype="p2", etype="e", mtype="m4")
_CACHE_MAX = 50_000
# Decisions that depend on argument values: agents rarely repeat arguments, so these entries are mostly
# single use, and each holds the arguments' fingerprint (~600 bytes). A soak with distinct arguments on
# every call grew RSS by ~50 MB while 50,000 of them filled the cache; 10,000 hold ~6 MB.
_ARGS_CACHE_MAX = 10_000
# Narrowed enforcers (PolicyEngine._narrowed), one per distinct set of rules that could match: a
# property of the policy, so few; each holds a Casbin model (~30 KB).
_NARROW_MAX = 256
_ALL_FIELDS = frozenset(SUBJECT_FIELDS)

Reason = Literal["allowed", "approval_required", "denied_by_rule", "no_matching_rule"]


@dataclass(frozen=True)
class Subject:
    """The caller as the policy sees it (``r.sub``): a principal flattened to plain values."""

    subject: str
    tenant: str
    roles: tuple[str, ...]
    issuer: str = ""
    client_id: str = ""
    auth_method: str = ""

    @staticmethod
    @lru_cache(maxsize=4096)
    def of(principal: Principal) -> Subject:
        return Subject(
            subject=principal.subject,
            tenant=principal.tenant or "",
            roles=tuple(sorted(principal.roles)),
            issuer=principal.issuer,
            client_id=principal.client_id or "",
            auth_method=principal.auth_method,
        )

    @property
    def identities(self) -> tuple[str, ...]:
        """The policy subjects this caller is: ``user:<subject>`` and ``role:<r>`` for each role."""
        return (f"user:{self.subject}", *(f"role:{r}" for r in self.roles))


@dataclass(frozen=True)
class Decision:
    """``allowed``: the call may run unattended. An ``approval_required`` decision is not allowed: it may
    run only once a person says yes (its ``rule`` is the approve rule that matched)."""

    allowed: bool
    reason: Reason
    rule: Rule | None  # the rule that decided (the deny that won, the approve or an allow that matched)
    version: int

    @property
    def needs_approval(self) -> bool:
        return self.reason == "approval_required"

    @property
    def outcome(self) -> Literal["allow", "approve", "deny"]:
        return "allow" if self.allowed else "approve" if self.needs_approval else "deny"

    def to_json(self) -> dict[str, object]:
        return {
            "allowed": self.allowed,
            "decision": self.outcome,
            "reason": self.reason,
            "rule": self.rule.csv() if self.rule else None,
            "policy_version": self.version,
        }


class PolicyEngine:
    """Decides requests against one policy version; decisions and visibility are cached per version."""

    def __init__(self, rules: Sequence[Rule], version: int, *, enforcer: Any = None) -> None:
        self.rules = tuple(rules)
        self.version = version
        if enforcer is None:
            enforcer = _enforcer_over(self.rules)
        self._enforcer = enforcer
        # Casbin's role manager looks through max_hierarchy_level levels, the member itself the first.
        levels: int = getattr(enforcer.get_role_manager(), "max_hierarchy_level", 10)
        self._roles = RoleGraph(self.rules, hops=levels - 1)
        self._tenants = frozenset(r.values[1] for r in self.rules if r.ptype == "p" and r.values[1] != "*")
        self._approvals = any(casbin_ptype(r) == "p2" for r in self.rules)  # else m3/m4 never run
        # Registered here rather than in _configure: it answers from this engine's role map.
        enforcer.add_function("subjectMatch", self._subject_match)
        # First in, first out: a hit costs one dict lookup (an LRU would reorder on every hit, doubling
        # the cost of a cached list filter). Read with [] rather than .get(), which takes two calls.
        self._decisions: FIFOCache[tuple[object, ...], Decision] = FIFOCache(_CACHE_MAX)
        self._arg_decisions: FIFOCache[tuple[object, ...], Decision] = FIFOCache(_ARGS_CACHE_MAX)
        self._visible: FIFOCache[tuple[object, ...], bool] = FIFOCache(_CACHE_MAX)
        self._targets: FIFOCache[tuple[str, str], tuple[bool, frozenset[str]]] = FIFOCache(_CACHE_MAX)
        self._candidates: FIFOCache[tuple[object, ...], tuple[int, ...]] = FIFOCache(_CACHE_MAX)
        self._narrow: FIFOCache[tuple[int, ...], Any] = FIFOCache(_NARROW_MAX)

    @classmethod
    async def load_into(cls, enforcer: Any, adapter: Any) -> PolicyEngine:
        """An engine over a Casbin ``AsyncEnforcer`` whose adapter also reports rules and version."""
        _configure(enforcer)
        await enforcer.load_policy()
        return cls([rule for _, rule in adapter.rules], adapter.version, enforcer=enforcer)

    def decide(
        self,
        principal: Principal | Subject,
        obj: str,
        act: str,
        args: Mapping[str, Any] | None = None,
        annotations: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Allow, deny or ask for approval of ``act`` on ``obj`` with ``args`` (and the tool's pinned
        ``annotations``, which conditions read as ``r.tool``): deny overrides approve, approve overrides
        allow (the safe choice when both match: a person is asked), no match denies."""
        sub = principal if isinstance(principal, Subject) else Subject.of(principal)
        args = args or {}
        needs_args, fields = self._target(obj, act)
        if annotations and needs_args:  # only a conditional rule can read them
            args = CallArgs(args, annotations)
        reach = self._roles.named_reach(sub.subject, sub.roles, sub.tenant)
        key = (
            reach,
            sub.tenant if sub.tenant in self._tenants else None,
            sub if fields is _ALL_FIELDS else tuple(getattr(sub, f) for f in sorted(fields)),
            obj,
            act,
            _fingerprint(args) if needs_args else None,
        )
        cache = self._arg_decisions if needs_args else self._decisions
        try:
            return cache[key]
        except KeyError:
            pass
        caller = _Caller(sub, reach)
        enforcer = self._narrowed(caller, key[1], obj, act) if needs_args else self._enforcer
        allowed, explain = enforcer.enforce_ex(caller, sub.tenant, obj, act, args)
        rule = Rule("p", tuple(explain)) if explain else None
        denied = rule is not None and not allowed and rule.values[4] == "deny"
        approve: list[str] = []
        if self._approvals and not denied:
            asked, approve = enforcer.enforce_ex(_APPROVAL, caller, sub.tenant, obj, act, args)
            approve = approve if asked else []
        if approve:
            decision = Decision(False, "approval_required", Rule("p", tuple(approve)), self.version)
        elif allowed:
            decision = Decision(True, "allowed", rule, self.version)
        elif rule is not None and rule.values[4] == "deny":
            decision = Decision(False, "denied_by_rule", rule, self.version)
        else:
            decision = Decision(False, "no_matching_rule", None, self.version)
        cache[key] = decision
        return decision

    def _narrowed(self, caller: _Caller, tenant_key: str | None, obj: str, act: str) -> Any:
        """An enforcer over only the rules whose action, object, tenant and subject match this request.

        Casbin evaluates the whole matcher for every rule of the policy, each step interpreted by
        simpleeval; with arguments in play no decision is cached, so every call paid for every rule. The
        first four terms of ``m`` and ``m3`` do not read the arguments: evaluated once per policy identity
        and target (the same functions the matcher calls), they leave the rules that could match. Casbin
        then decides over those alone, in policy order, so the effect and the rule it reports are the
        ones the full scan gives (a rule dropped here could not have matched).
        """
        key = (caller.reach, tenant_key, obj, act)
        try:
            which = self._candidates[key]
        except KeyError:
            found = self._applicable(caller.reach, caller.subject.tenant, obj, act)
            which = self._candidates[key] = tuple(i for i, _ in found)
        # Keyed by the rules, not the object: every URI a resource rule covers shares one enforcer.
        try:
            return self._narrow[which]
        except KeyError:
            pass
        enforcer = _enforcer_over([self.rules[i] for i in which])
        enforcer.add_function("subjectMatch", self._subject_match)
        self._narrow[which] = enforcer
        return enforcer

    def _target(self, obj: str, act: str) -> tuple[bool, frozenset[str]]:
        # Only a conditional rule that could apply to (obj, act) makes the arguments, or the subject
        # fields it reads, part of the decision; everything else is decided once per policy identity.
        try:
            return self._targets[(obj, act)]
        except KeyError:
            conds = [
                r.values[5]
                for r in self.rules
                if r.ptype == "p" and r.values[5] and r.values[3] == act and object_matches(obj, r.values[2])
            ]
            fields = frozenset[str]().union(*(_subject_fields(c) for c in conds))
            hit = self._targets[(obj, act)] = (bool(conds), _ALL_FIELDS if fields >= _ALL_FIELDS else fields)
            return hit

    def visibility_identity(self, sub: Subject) -> tuple[object, ...]:
        """What ``visible`` decides on: callers with equal identities see exactly the same items."""
        reach = self._roles.named_reach(sub.subject, sub.roles, sub.tenant)
        return (self.version, reach, sub.tenant if sub.tenant in self._tenants else None)

    def visible(self, principal: Principal | Subject, obj: str, use_action: str) -> bool:
        """Whether an item shows in lists: the caller may use it for some arguments, or may ``list`` it.

        A conditional allow counts (some arguments may pass); a conditional deny does not hide.
        """
        sub = principal if isinstance(principal, Subject) else Subject.of(principal)
        reach = self._roles.named_reach(sub.subject, sub.roles, sub.tenant)
        # m2 evaluates no condition, so the subject's fields never matter here.
        key = (reach, sub.tenant if sub.tenant in self._tenants else None, obj, use_action)
        try:
            return self._visible[key]
        except KeyError:
            pass
        caller = _Caller(sub, reach)
        seen = False
        for act in (use_action, "list"):
            seen, rule = self._enforcer.enforce_ex(_VISIBILITY, caller, sub.tenant, obj, act, {})
            hidden = not seen and bool(rule) and rule[4] == "deny"  # an unconditional deny hides
            if not seen and not hidden and self._approvals:  # usable once a person says yes
                seen = self._enforcer.enforce(_APPROVAL_VISIBILITY, caller, sub.tenant, obj, act, {})
            if seen:
                break
        self._visible[key] = seen
        return seen

    def matching(self, sub: Subject, obj: str, act: str) -> list[Rule]:
        """The ``p`` rules that apply to ``sub`` doing ``act`` on ``obj``, conditions not evaluated, in
        policy order: what ``m`` would match if every condition held (for access reports)."""
        reach = self._roles.named_reach(sub.subject, sub.roles, sub.tenant)
        return [r for _, r in self._applicable(reach, sub.tenant, obj, act)]

    def _applicable(
        self, reach: frozenset[str], tenant: str, obj: str, act: str
    ) -> Iterator[tuple[int, Rule]]:
        """The ``p`` rules (with their positions) whose action, subject, tenant and object match: the
        terms of ``m`` and ``m3`` before the condition, for a caller reaching ``reach`` in ``tenant``."""
        for i, r in enumerate(self.rules):
            if (
                r.ptype == "p"
                and r.values[3] == act
                and (r.values[0] == "*" or r.values[0] in reach)
                and _tenant_matches(tenant, r.values[1])
                and object_matches(obj, r.values[2])
            ):
                yield i, r

    def names(self, principal: Principal, subject: str) -> bool:
        """Is ``principal`` the policy subject ``subject`` (``user:<sub>``, ``role:<name>``) in its tenant,
        itself or through its roles and their links? (Who may approve a call: ``approvers.py``.)"""
        sub = Subject.of(principal)
        return any(subject in self._roles.reach(identity, sub.tenant) for identity in sub.identities)

    def roles_of(self, member: str, tenant: str = "*") -> list[str]:
        """The roles ``member`` is linked to directly by ``g`` rules that apply in ``tenant``."""
        return self._roles.direct(member, tenant)

    def cache_sizes(self) -> dict[str, int]:
        """How many entries each cache holds (all are bounded; for tests and diagnostics)."""
        return {
            "decisions": len(self._decisions),
            "argument_decisions": len(self._arg_decisions),
            "visible": len(self._visible),
            "targets": len(self._targets),
            "narrowed": len(self._narrow),
            "candidates": len(self._candidates),
            **self._roles.cache_sizes(),
        }

    def _subject_match(self, sub: _Caller | Subject, pattern: str, tenant: str) -> bool:
        if pattern == "*":
            return True
        if isinstance(sub, _Caller) and tenant == sub.subject.tenant:
            return pattern in sub.reach  # computed once per decision, for the same tenant
        subject = sub.subject if isinstance(sub, _Caller) else sub
        return pattern in self._roles.named_reach(subject.subject, subject.roles, tenant)


class _Caller:
    """What the matchers see as ``r.sub``: the subject, and the named policy subjects it reaches."""

    __slots__ = ("reach", "subject")

    def __init__(self, subject: Subject, reach: frozenset[str]) -> None:
        self.subject = subject
        self.reach = reach

    def __repr__(self) -> str:  # Casbin logs requests with str()
        return repr(self.subject)


def _enforcer_over(rules: Sequence[Rule]) -> Any:
    """A configured enforcer holding ``rules`` (the engine adds ``subjectMatch``, which needs it)."""
    enforcer: Any = Enforcer(casbin.Enforcer.new_model(text=MODEL_TEXT))  # pyright: ignore[reportUnknownMemberType]
    _configure(enforcer)
    enforcer.set_adapter(RulesAdapter(rules))
    enforcer.load_policy()
    return enforcer


def _configure(enforcer: Any) -> None:
    # Before the policy loads, so role links are built with tenant wildcards in place.
    enforcer.add_named_domain_matching_func("g", _tenant_matches)
    enforcer.add_function("domainMatch", _tenant_matches)
    enforcer.add_function("objectMatch", object_matches)
    enforcer.add_function("condition", _condition)


def empty_engine() -> PolicyEngine:
    """The default policy: no rules, so nothing is allowed."""
    return PolicyEngine((), 0)


def _fingerprint(args: Mapping[str, Any]) -> str:
    if isinstance(args, CallArgs):  # the tool's annotations decide too
        args = {"args": dict(args), "tool": args.annotations}
    blob = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _tenant_matches(tenant: str, pattern: str) -> bool:
    return pattern == "*" or tenant == pattern


@lru_cache(maxsize=4096)
def _subject_fields(cond: str) -> frozenset[str]:
    """The ``r.sub`` fields a condition reads; all of them if it uses ``r.sub`` any other way."""
    try:
        tree = compile_condition(cond)
    except ValueError:
        return _ALL_FIELDS  # cannot tell: treat it as reading everything
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    fields: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name):
            continue
        parent = parents.get(id(node))
        if node.id == "r" and isinstance(parent, ast.Attribute):
            if parent.attr in ("args", "tool"):
                continue
            grand = parents.get(id(parent))
            if parent.attr == "sub" and isinstance(grand, ast.Attribute) and grand.attr in SUBJECT_FIELDS:
                fields.add(grand.attr)
                continue
        return _ALL_FIELDS
    return frozenset(fields)


def object_matches(obj: str, pattern: str) -> bool:
    return glob_match(pattern, obj)


def _condition(cond: str, eft: str, sub: _Caller | Subject, args: Mapping[str, Any]) -> bool:
    # Casbin's `condition(p.cond, p.eft, r.sub, r.args)`: the matchers hand it the caller as _Caller.
    return holds(cond, eft, sub.subject if isinstance(sub, _Caller) else sub, args)
