"""Policy rules: what a line of policy may say, in Casbin CSV and as objects, and how it is validated.

Two kinds of line, as in Casbin:

``p, <subject>, <tenant>, <object>, <action>, <effect>[, <condition>]``
    ``subject`` is ``user:<sub>``, ``role:<name>`` or ``*``; ``tenant`` a tenant name or ``*``;
    ``object`` ``<upstream>/<name>`` with ``*``/``?`` globs (or ``admin/<area>`` for admin actions);
    ``effect`` ``allow``, ``deny`` or ``approve`` (allowed once a person says yes; ``call`` only; it may
    name who approves and for how long: ``approve by role:billing-lead for 4h``, ``approvers.py``);
    ``condition`` an expression over ``r.args`` and ``r.sub``.
``g, <member>, role:<name>[, <tenant>]``
    ``member`` (a ``user:`` or ``role:``) inherits everything granted to the role, in that tenant.

Every rule is validated before it reaches the engine, so a policy that loads is a policy that means
what it says; a rejected line is named by its number.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from arbiter.errors import InvalidInput
from arbiter.policies.approvers import is_approve, parse

AGENT_ACTIONS = ("list", "call", "read", "get")
ADMIN_ACTIONS = ("admin:read", "admin:write")
ACTIONS = AGENT_ACTIONS + ADMIN_ACTIONS
EFFECTS = ("allow", "deny", "approve")
# Actions an ``approve`` rule may name: only a tool call can wait for the user's answer (an input round).
APPROVE_ACTIONS = ("call",)
# What the agent uses an item for, by the method that uses it; ``list`` only makes an item visible.
USE_ACTION = {"tools/call": "call", "resources/read": "read", "prompts/get": "get"}
SUBJECT_FIELDS = frozenset({"subject", "tenant", "roles", "issuer", "client_id", "auth_method"})

_SUBJECT = re.compile(r"^(\*|user:[^\s,]{1,256}|role:[A-Za-z0-9_.:@/-]{1,128})$")
_ROLE = re.compile(r"^role:[A-Za-z0-9_.:@/-]{1,128}$")
_TENANT = re.compile(r"^(\*|[A-Za-z0-9_.:@-]{1,128})$")
_UPSTREAM_GLOB = re.compile(r"^[a-z0-9*?-]{1,32}$")
_MAX_CONDITION = 1000
_MAX_EFFECT = 1000  # policy_rules.v4 (migration 0013)


@dataclass(frozen=True)
class Rule:
    """``p``: sub, dom, obj, act, eft, cond. ``g``: member, role, dom (stored in the same columns)."""

    ptype: Literal["p", "g"]
    values: tuple[str, ...]

    @classmethod
    def allow(cls, sub: str, obj: str, act: str, dom: str = "*", cond: str = "") -> Rule:
        return cls("p", (sub, dom, obj, act, "allow", cond))

    @classmethod
    def deny(cls, sub: str, obj: str, act: str, dom: str = "*", cond: str = "") -> Rule:
        return cls("p", (sub, dom, obj, act, "deny", cond))

    @classmethod
    def approve(cls, sub: str, obj: str, act: str = "call", dom: str = "*", cond: str = "") -> Rule:
        return cls("p", (sub, dom, obj, act, "approve", cond))

    @classmethod
    def role(cls, member: str, role: str, dom: str = "*") -> Rule:
        return cls("g", (member, role, dom))

    def csv(self) -> str:
        values = list(self.values)
        if self.ptype == "p" and not values[5]:
            values = values[:5]  # no condition: the short form
        return ", ".join([self.ptype, *values])

    @property
    def effect(self) -> str:
        """``allow``, ``deny`` or ``approve`` (without who approves: see ``approvers.py``)."""
        eft = self.values[4]
        return "approve" if is_approve(eft) else eft

    def to_json(self) -> dict[str, object]:
        if self.ptype == "g":
            member, role, dom = self.values
            return {"type": "g", "member": member, "role": role, "tenant": dom}
        sub, dom, obj, act, eft, cond = self.values
        shown: dict[str, object] = {
            "type": "p",
            "subject": sub,
            "tenant": dom,
            "object": obj,
            "action": act,
            "effect": self.effect,
            "condition": cond,
        }
        spec = parse(eft) if is_approve(eft) else None
        if spec is not None:
            shown["approvers"] = list(spec.approvers)
            shown["approval_valid_s"] = spec.valid_s
        return shown


class PolicyInvalid(InvalidInput):
    """A policy (or one rule of it) that does not validate; ``errors`` names each bad line."""

    code = "policy_invalid"

    def __init__(self, errors: list[dict[str, object]]) -> None:
        first = errors[0]
        where = f"line {first['line']}: " if "line" in first else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"invalid policy: {where}{first['message']}{more}", errors=errors)


MAX_ROLE_DEPTH = 8  # Casbin follows at most 10 role links; deeper ones would be ignored silently


def check_roles(rules: Sequence[Rule]) -> None:
    """Refuse role links that form a cycle or a chain deeper than Casbin follows.

    Casbin stops following inheritance after a fixed depth without saying so: a deny rule reached
    through a longer chain would simply not apply. Better to refuse such a policy outright.
    """
    parents: dict[str, set[str]] = {}
    for rule in rules:
        if rule.ptype == "g":
            parents.setdefault(rule.values[0], set()).add(rule.values[1])

    known: dict[str, int] = {}

    def depth(node: str, path: tuple[str, ...]) -> int:
        if node in path:
            raise PolicyInvalid([{"message": f"role links form a cycle: {' -> '.join((*path, node))}"}])
        if node not in known:  # memoised: each role is measured once, however many paths reach it
            above = parents.get(node, set())
            known[node] = 1 + max(depth(p, (*path, node)) for p in above) if above else 0
        return known[node]

    for member in parents:
        if depth(member, ()) > MAX_ROLE_DEPTH:
            raise PolicyInvalid(
                [{"message": f"role links from {member} are more than {MAX_ROLE_DEPTH} deep; flatten them"}]
            )


def parse_csv(text: str) -> list[Rule]:
    """Parse a Casbin CSV policy, validating every line; all errors are reported at once."""
    rules: list[Rule] = []
    errors: list[dict[str, object]] = []
    seen: dict[Rule, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rule = rule_from_tokens(split_line(line))
            if rule in seen:  # stored twice, deleting "the" rule by id would leave its twin in force
                raise ValueError(f"repeats line {seen[rule]}")
            seen[rule] = number
            rules.append(rule)
        except ValueError as exc:
            errors.append({"line": number, "message": str(exc), "text": line[:200]})
    if errors:
        raise PolicyInvalid(errors)
    check_roles(rules)
    return rules


def to_csv(rules: Iterable[Rule]) -> str:
    ordered = sorted(rules, key=lambda r: r.ptype != "p")  # p lines first, then role links
    return "".join(f"{rule.csv()}\n" for rule in ordered)


def rule_from_tokens(tokens: Sequence[str]) -> Rule:
    """A validated rule from a CSV line's tokens (``p, ...`` or ``g, ...``); ``ValueError`` says why not."""
    if not tokens:
        raise ValueError("empty rule")
    kind, rest = tokens[0], [t.strip() for t in tokens[1:]]
    if kind == "p":
        if len(rest) not in (5, 6):
            raise ValueError(
                "a p rule has 5 or 6 fields: subject, tenant, object, action, effect[, condition]"
            )
        rule = Rule("p", (*rest[:4], canonical_effect(rest[4]), rest[5] if len(rest) == 6 else ""))
    elif kind == "g":
        if len(rest) not in (2, 3):
            raise ValueError("a g rule has 2 or 3 fields: member, role[, tenant]")
        rule = Rule("g", (rest[0], rest[1], rest[2] if len(rest) == 3 else "*"))
    else:
        raise ValueError(f"unknown rule type {kind!r}: lines start with p or g")
    check(rule)
    return rule


def check(rule: Rule) -> None:
    """Raise ``ValueError`` naming what is wrong with one rule."""
    if rule.ptype == "g":
        member, role, dom = rule.values
        if not _SUBJECT.match(member) or member == "*":
            raise ValueError(f"member {member!r} must be user:<subject> or role:<name>")
        if not _ROLE.match(role):
            raise ValueError(f"role {role!r} must be role:<name>")
        if member == role:
            raise ValueError(f"{role} cannot inherit from itself")
        _check_tenant(dom)
        return
    sub, dom, obj, act, eft, cond = rule.values
    if not _SUBJECT.match(sub):
        raise ValueError(f"subject {sub!r} must be user:<subject>, role:<name> or *")
    _check_tenant(dom)
    if act not in ACTIONS:
        raise ValueError(f"unknown action {act!r}; actions are: {', '.join(ACTIONS)}")
    check_object(obj, admin=act in ADMIN_ACTIONS)
    if len(eft) > _MAX_EFFECT:  # the column's width: longer would be refused by PostgreSQL, cut by nobody
        raise ValueError(
            f"effect is {len(eft)} characters; at most {_MAX_EFFECT} (name a role, not many people)"
        )
    if eft not in EFFECTS and not is_approve(eft):
        raise ValueError(f"effect {eft!r} must be allow, deny or approve")
    spec = parse(eft)
    if spec is not None and spec.effect != eft:  # stored one way only, so equal rules compare equal
        raise ValueError(f"effect {eft!r} must be written {spec.effect!r}")
    if spec is not None and act not in APPROVE_ACTIONS:
        raise ValueError(f"an approve rule applies to tool calls (action call), not {act!r}")
    if cond:
        compile_condition(cond)


def canonical_effect(eft: str) -> str:
    """An ``approve`` effect in its one stored spelling (``ValueError`` if malformed); others as given."""
    spec = parse(eft)
    return eft if spec is None else spec.effect


def _check_tenant(dom: str) -> None:
    if not _TENANT.match(dom):
        raise ValueError(f"tenant {dom!r} must be a tenant name or *")


def check_object(obj: str, *, admin: bool = False) -> None:
    if obj == "*":
        return
    if not obj or any(c.isspace() or c in ",\"'" for c in obj) or len(obj) > 1100:
        # No commas or quotes either: the rule must survive export to CSV and import back.
        raise ValueError(f"object {obj!r} must be <upstream>/<name> without spaces, commas or quotes")
    upstream, sep, name = obj.partition("/")
    if not sep or not name:
        raise ValueError(f"object {obj!r} must be <upstream>/<name> (globs allowed), or *")
    if admin and upstream != "admin":
        raise ValueError(f"admin actions apply to admin/<area> objects, not {obj!r}")
    if not _UPSTREAM_GLOB.match(upstream):
        raise ValueError(f"object {obj!r}: {upstream!r} is not an upstream name or glob")
    if "**" in obj:
        raise ValueError(f"object {obj!r}: use a single * (it already matches across /)")


def split_line(line: str) -> list[str]:
    """Split a Casbin CSV line on top-level commas (not inside (), [] or quotes), as Casbin does."""
    tokens: list[str] = []
    depth, quote, start = 0, "", 0
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            tokens.append(line[start:i].strip())
            start = i + 1
    tokens.append(line[start:].strip())
    return tokens


# --- conditions -----------------------------------------------------------------------------------

_ALLOWED_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Constant,
    ast.Attribute,
    ast.Name,
    ast.Load,
    ast.Tuple,
    ast.List,
    ast.Subscript,
)


@lru_cache(maxsize=4096)
def compile_condition(text: str) -> ast.Expression:
    """Parse a condition, allowing only comparisons and boolean logic over ``r.args``/``r.sub``/``r.tool``.

    Examples: ``r.args.amount <= 100``, ``r.args.region == r.sub.tenant``,
    ``r.args.status in ("open", "pending")``, ``"admin" in r.sub.roles``, ``r.tool.readOnlyHint == True``
    (``r.tool`` is the tool's pinned annotations: what its upstream claims, so a condition may narrow on
    it, e.g. deny unless read-only; it is a claim, not a fact, so never a reason to allow more).
    """
    if len(text) > _MAX_CONDITION:
        raise ValueError(f"condition is longer than {_MAX_CONDITION} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"condition {text!r} is not a valid expression: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"condition {text!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id != "r":
            raise ValueError(
                f"condition {text!r}: only r.args, r.sub and r.tool may be used, not {node.id!r}"
            )
        if isinstance(node, ast.Attribute):
            _check_attribute(text, node)
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            raise ValueError(f"condition {text!r}: subscripts must be constants, e.g. r.args['a-b']")
    return tree


def _check_attribute(text: str, node: ast.Attribute) -> None:
    if node.attr.startswith("_"):
        raise ValueError(f"condition {text!r}: attribute {node.attr!r} is not allowed")
    if isinstance(node.value, ast.Name):  # r.<x>
        if node.attr not in ("args", "sub", "tool"):
            raise ValueError(
                f"condition {text!r}: use r.args.<name>, r.sub.<field> or r.tool.<annotation>, "
                f"not r.{node.attr}"
            )
    elif (
        isinstance(node.value, ast.Attribute)
        and isinstance(node.value.value, ast.Name)
        and node.value.attr == "sub"
        and node.attr not in SUBJECT_FIELDS
    ):
        fields = ", ".join(sorted(SUBJECT_FIELDS))
        raise ValueError(f"condition {text!r}: r.sub has {fields}; not {node.attr!r}")
