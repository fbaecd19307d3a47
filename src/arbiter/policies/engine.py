"""``PolicyEngine``: Arbiter's façade over a Casbin enforcer for one version of the policy.

An engine never changes: a new policy version is a new engine, swapped in whole, so a request is
decided by exactly one version and every cache below dies with the version it was computed from.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any, Literal, cast

import casbin  # pyright: ignore[reportMissingTypeStubs]
from casbin.core_enforcer import EnforceContext  # pyright: ignore[reportMissingTypeStubs]
from casbin.model import Model  # pyright: ignore[reportMissingTypeStubs]
from casbin.persist.adapter import Adapter  # pyright: ignore[reportMissingTypeStubs]
from simpleeval import EvalWithCompoundTypes  # pyright: ignore[reportMissingTypeStubs]

from arbiter.auth.principal import Principal
from arbiter.policies.rules import Rule, compile_condition

log = logging.getLogger(__name__)

MODEL_TEXT = (files("arbiter.policies") / "model.conf").read_text(encoding="utf-8")
_VISIBILITY = EnforceContext(rtype="r", ptype="p", etype="e", mtype="m2")
_CACHE_MAX = 50_000

Reason = Literal["allowed", "denied_by_rule", "no_matching_rule"]


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
    allowed: bool
    reason: Reason
    rule: Rule | None  # the rule that decided (the deny that won, or an allow that matched)
    version: int

    def to_json(self) -> dict[str, object]:
        return {
            "allowed": self.allowed,
            "decision": "allow" if self.allowed else "deny",
            "reason": self.reason,
            "rule": self.rule.csv() if self.rule else None,
            "policy_version": self.version,
        }


class _RulesAdapter(Adapter):  # pyright: ignore[reportUntypedBaseClass]
    """Loads validated rules held in memory (a policy file, a dry-run candidate, or the database's)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = rules

    def load_policy(self, model: Model) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        for rule in self._rules:
            model.add_policy(rule.ptype, rule.ptype, list(rule.values))  # pyright: ignore[reportUnknownMemberType]


class PolicyEngine:
    """Decides requests against one policy version; decisions and visibility are cached per version."""

    def __init__(self, rules: Sequence[Rule], version: int, *, enforcer: Any = None) -> None:
        self.rules = tuple(rules)
        self.version = version
        if enforcer is None:
            enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=MODEL_TEXT))  # pyright: ignore[reportUnknownMemberType]
            _configure(enforcer)
            enforcer.set_adapter(_RulesAdapter(self.rules))
            enforcer.load_policy()
        self._enforcer = enforcer
        self._decisions: dict[tuple[object, ...], Decision] = {}
        self._visible: dict[tuple[object, ...], bool] = {}
        self._conditional_targets: dict[tuple[object, ...], bool] = {}

    @classmethod
    async def load_into(cls, enforcer: Any, adapter: Any) -> PolicyEngine:
        """An engine over a Casbin ``AsyncEnforcer`` whose adapter also reports rules and version."""
        _configure(enforcer)
        await enforcer.load_policy()
        return cls([rule for _, rule in adapter.rules], adapter.version, enforcer=enforcer)

    def decide(
        self, principal: Principal | Subject, obj: str, act: str, args: Mapping[str, Any] | None = None
    ) -> Decision:
        """Allow or deny ``act`` on ``obj`` with ``args``; deny overrides allow, no match denies."""
        sub = principal if isinstance(principal, Subject) else Subject.of(principal)
        args = args or {}
        key = (sub, obj, act, _fingerprint(args) if self._needs_args(obj, act) else None)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        allowed, explain = self._enforcer.enforce_ex(sub, sub.tenant, obj, act, args)
        rule = Rule("p", tuple(explain)) if explain else None
        if allowed:
            decision = Decision(True, "allowed", rule, self.version)
        elif rule is not None and rule.values[4] == "deny":
            decision = Decision(False, "denied_by_rule", rule, self.version)
        else:
            decision = Decision(False, "no_matching_rule", None, self.version)
        self._remember(self._decisions, key, decision)
        return decision

    def _needs_args(self, obj: str, act: str) -> bool:
        # Only a conditional rule that could apply to (obj, act) makes the arguments part of the
        # decision; everything else is decided once per caller, object and action.
        hit = self._conditional_targets.get((obj, act))
        if hit is None:
            hit = any(
                r.ptype == "p" and r.values[5] and r.values[3] == act and object_matches(obj, r.values[2])
                for r in self.rules
            )
            self._remember(self._conditional_targets, (obj, act), hit)
        return hit

    def visible(self, principal: Principal | Subject, obj: str, use_action: str) -> bool:
        """Whether an item shows in lists: the caller may use it for some arguments, or may ``list`` it.

        A conditional allow counts (some arguments may pass); a conditional deny does not hide.
        """
        sub = principal if isinstance(principal, Subject) else Subject.of(principal)
        key = (sub, obj, use_action)
        hit = self._visible.get(key)
        if hit is not None:
            return hit
        seen = any(
            self._enforcer.enforce(_VISIBILITY, sub, sub.tenant, obj, act, {}) for act in (use_action, "list")
        )
        self._remember(self._visible, key, seen)
        return seen

    def roles_of(self, member: str, tenant: str = "*") -> list[str]:
        """The roles ``member`` inherits directly or transitively (for explain output)."""
        rm: Any = self._enforcer.get_role_manager()
        roles: list[str] = rm.get_roles(member, tenant)
        return roles

    @staticmethod
    def _remember(cache: dict[Any, Any], key: tuple[object, ...], value: object) -> None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()  # cheaper than LRU bookkeeping on every hit; refills from hot keys at once
        cache[key] = value


def _configure(enforcer: Any) -> None:
    # Before the policy loads, so role links are built with tenant wildcards in place.
    enforcer.add_named_domain_matching_func("g", _tenant_matches)
    enforcer.add_function("subjectMatch", _subject_match(enforcer))
    enforcer.add_function("domainMatch", _tenant_matches)
    enforcer.add_function("objectMatch", object_matches)
    enforcer.add_function("condition", _condition)


def empty_engine() -> PolicyEngine:
    """The default policy: no rules, so nothing is allowed."""
    return PolicyEngine((), 0)


def _fingerprint(args: Mapping[str, Any]) -> str:
    blob = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _tenant_matches(tenant: str, pattern: str) -> bool:
    return pattern == "*" or tenant == pattern


def _subject_match(enforcer: Any) -> Callable[[Subject, str, str], bool]:
    def match(sub: Subject, pattern: str, tenant: str) -> bool:
        if pattern == "*":
            return True
        rm = enforcer.get_role_manager()  # looked up per call: loading a policy may replace it
        return any(rm.has_link(identity, pattern, tenant) for identity in sub.identities)

    return match


@lru_cache(maxsize=8192)
def _glob(pattern: str) -> re.Pattern[str]:
    # `*` matches any run of characters, `/` included (resource URIs have slashes); `?` one character.
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def object_matches(obj: str, pattern: str) -> bool:
    return pattern == "*" or _glob(pattern).fullmatch(obj) is not None


class _Missing:
    """An argument the call did not pass: equal to nothing, ordered against nothing, falsy."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    def __lt__(self, other: object) -> bool:
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __bool__(self) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __contains__(self, item: object) -> bool:
        return False

    def __getattr__(self, name: str) -> _Missing:
        return self

    def __getitem__(self, key: object) -> _Missing:
        return self


MISSING = _Missing()


class _View:
    """Arguments as a condition sees them: ``r.args.a.b`` and ``r.args['a-b']`` reach into the JSON;
    a missing key is ``MISSING`` rather than an error, so ``r.args.force == True`` is simply false
    for a call without ``force``. Anything else that fails (comparing a string with a number) still
    fails, and fails closed."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name in self._data:
            return _wrap(self._data[name])
        return MISSING

    def __getitem__(self, key: object) -> Any:
        if isinstance(key, str) and key in self._data:
            return _wrap(self._data[key])
        return MISSING

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        return self._data == (other._data if isinstance(other, _View) else other)

    __hash__ = None  # type: ignore[assignment]


def _wrap(value: Any) -> Any:
    # Not a method: any public attribute of _View would shadow an argument of the same name.
    return _View(cast(Mapping[str, Any], value)) if isinstance(value, Mapping) else value


class _RequestView:
    """What a condition sees as ``r``: ``r.args`` (the call's arguments) and ``r.sub`` (the caller)."""

    __slots__ = ("args", "sub")

    def __init__(self, sub: Subject, args: Mapping[str, Any]) -> None:
        self.sub = sub
        self.args = _View(args)


def _condition(cond: str, eft: str, sub: Subject, args: Mapping[str, Any]) -> bool:
    if not cond:
        return True
    try:
        tree: ast.Expression = compile_condition(cond)
        evaluator = EvalWithCompoundTypes(names={"r": _RequestView(sub, args)})
        outcome: object = evaluator.eval(cond, previously_parsed=tree.body)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return bool(outcome)  # pyright: ignore[reportUnknownArgumentType]
    except Exception as exc:  # noqa: BLE001 - a condition that cannot be evaluated must fail closed
        # E.g. comparing a string with a number: an allow rule then does not match, a deny rule does.
        log.debug("policy condition %r could not be evaluated: %s", cond, type(exc).__name__)
        return eft == "deny"
