"""One recorded decision replayed against another policy: the same call, decided again.

The audit record holds what the policy saw (the caller's identity and roles, the target, the action)
except the arguments, which it holds *redacted*. A condition that reads a redacted value cannot be
evaluated on the record: the stored value is a marker, not what the agent sent, and deciding on it
would be a guess. Such a replay is ``undecidable``, naming the rule and the field; a condition that
reads only values the record kept is evaluated as the live policy would have.

An outcome is one of three: ``allow`` (runs unattended), ``approve`` (runs once a person says yes) and
``deny``. The record's is what the policy decided then (``policy.decision``), not whether the call ran:
an approval-required call the user accepted ran, one declined did not, and both were ``approve``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast

from arbiter.audit.record import canonical, record_hash
from arbiter.policies.engine import Decision, PolicyEngine, Subject
from arbiter.policies.rules import USE_ACTION, Rule, compile_condition

Verdict = Literal["allow", "approve", "deny"]  # a policy's outcome for one call (Decision.outcome)
Change = Literal[  # what a replay reports for a sample: a change of outcome, or none known
    "allow_to_deny",
    "deny_to_allow",
    "allow_to_approve",
    "approve_to_allow",
    "approve_to_deny",
    "deny_to_approve",
    "undecidable",
]
Outcome = Literal["same", Change]
CHANGES: tuple[Outcome, ...] = (  # every change of outcome, the allow<->deny ones first
    "allow_to_deny",
    "deny_to_allow",
    "allow_to_approve",
    "approve_to_allow",
    "approve_to_deny",
    "deny_to_approve",
)
# (upstream, name) -> the tool's current definition, if the catalog has it: its annotations are what a
# condition reads as r.tool, but only if it is the definition the record names (by tool_hash).
Definitions = Callable[[str, str], Mapping[str, Any] | None]

# What the redactor leaves in place of a value (audit/redact.py, audit/detectors.py), and its cut mark.
_MARKERS = ("[REDACTED:", "[TRUNCATED:")
_CUT = re.compile(r"…\[\+\d+ chars\]$")


def no_definitions(upstream: str, name: str) -> Mapping[str, Any] | None:
    return None


@dataclass(frozen=True)
class RecordedCall:
    """What the policy decided once, as the audit record tells it."""

    subject: Subject
    upstream: str
    target: str
    action: str
    args: Any  # the redacted arguments as stored (None: the call had none)
    args_truncated: bool  # the stored arguments are only a size-and-keys summary
    tool_hash: str | None
    outcome: Verdict  # what the policy decided then

    @property
    def allowed(self) -> bool:
        """Whether the policy let the call run unattended then."""
        return self.outcome == "allow"

    @property
    def object(self) -> str:
        return f"{self.upstream}/{self.target}"


@dataclass(frozen=True)
class Replayed:
    outcome: Outcome
    before: Verdict
    after: Decision | None  # None when undecidable
    why: str = ""  # for undecidable: the rule and the field it reads


def recorded_call(record: Mapping[str, Any]) -> RecordedCall | None:
    """The decision an ``mcp`` record holds, or None when it holds none to replay (a list, a request
    refused before the policy, a completion whose target kind the record does not say)."""
    policy: Any = record.get("policy")
    action = USE_ACTION.get(str(record.get("method")))
    upstream, target = record.get("upstream"), record.get("target")
    if record.get("kind") != "mcp" or not isinstance(policy, dict) or action is None:
        return None
    if not isinstance(upstream, str) or not isinstance(target, str) or not upstream or _cut(target):
        return None
    policy = cast(dict[str, Any], policy)
    actor: Any = record.get("actor") or {}
    actor = cast(dict[str, Any], actor)
    roles: Any = actor.get("roles") or []
    sub = Subject(
        subject=str(actor.get("subject") or ""),
        tenant=str(actor.get("tenant") or ""),
        roles=tuple(sorted(str(r) for r in cast(list[Any], roles))),
        issuer=str(actor.get("issuer") or ""),
        client_id=str(actor.get("client_id") or ""),
        auth_method=str(actor.get("auth_method") or ""),
    )
    tool_hash = record.get("tool_hash")
    return RecordedCall(
        subject=sub,
        upstream=upstream,
        target=target,
        action=action,
        args=record.get("args"),
        args_truncated=bool(record.get("args_truncated")),
        tool_hash=tool_hash if isinstance(tool_hash, str) else None,
        outcome=recorded_outcome(policy),
    )


def recorded_outcome(policy: Mapping[str, Any]) -> Verdict:
    """The outcome a record's ``policy`` (``Decision.to_json``) holds. Its ``decision`` says it; a record
    without one says ``allowed``, and an approval by its ``reason`` (``approval_required``)."""
    found = policy.get("decision")
    if found in ("allow", "approve", "deny"):
        return found
    if policy.get("allowed") is True:
        return "allow"
    return "approve" if policy.get("reason") == "approval_required" else "deny"


def replay(engine: PolicyEngine, call: RecordedCall, definitions: Definitions = no_definitions) -> Replayed:
    """Decide ``call`` again with ``engine`` (see ``Replayer``)."""
    return Replayer(engine, definitions)(call)


class Replayer:
    """Decides recorded calls again with one engine; undecidable when a condition that could change the
    outcome reads an argument the record redacted, or the tool's annotations the record cannot vouch for.

    A decision depends only on the caller, the target and the argument values the conditions read, so
    calls alike in those share one decision: the engine's own cache keys on all the arguments, which
    differ from call to call, and a cold Casbin decision with a condition costs about a millisecond.
    """

    def __init__(self, engine: PolicyEngine, definitions: Definitions = no_definitions) -> None:
        self.engine = engine
        self._definitions = definitions
        self._rules: dict[tuple[Subject, str, str], tuple[Rule, ...]] = {}
        self._annotations: dict[tuple[str, str, str], Mapping[str, Any] | None] = {}
        self._decisions: dict[tuple[object, ...], Decision] = {}

    def __call__(self, call: RecordedCall) -> Replayed:
        obj = call.object
        found = self._rules.get((call.subject, obj, call.action))
        if found is None:
            found = tuple(self.engine.matching(call.subject, obj, call.action))
            self._rules[(call.subject, obj, call.action)] = found
        rules = found
        annotations = self._annotations_of(call)
        if not any(r.values[4] == "deny" and not r.values[5] for r in rules):  # else denied whatever the args
            # Deny overrides approve, approve overrides allow: next to an unconditional approve only a
            # deny condition can change the outcome, next to an unconditional allow no allow condition.
            fixed_approve = any(r.effect == "approve" and not r.values[5] for r in rules)
            fixed_allow = any(r.values[4] == "allow" and not r.values[5] for r in rules)
            for rule in rules:
                cond = rule.values[5]
                if not cond or (rule.values[4] != "deny" and fixed_approve):
                    continue
                if rule.values[4] == "allow" and fixed_allow:
                    continue
                why = _unreadable(rule, cond, call, annotations)
                if why:
                    return Replayed("undecidable", call.outcome, None, why)
        raw: Any = call.args
        args: Mapping[str, Any] = cast(dict[str, Any], raw) if isinstance(raw, dict) else {}
        key = _decision_key(call, rules, args, annotations)
        decision = self._decisions.get(key) if key is not None else None
        if decision is None:
            decision = self.engine.decide(call.subject, obj, call.action, args, annotations)
            if key is not None:
                self._decisions[key] = decision
        after = decision.outcome
        if after == call.outcome:
            return Replayed("same", call.outcome, decision)
        return Replayed(cast(Outcome, f"{call.outcome}_to_{after}"), call.outcome, decision)

    def _annotations_of(self, call: RecordedCall) -> Mapping[str, Any] | None:
        """The annotations the call was decided with, if the catalog still holds that very definition."""
        if call.tool_hash is None or call.action != "call":
            return None
        key = (call.upstream, call.target, call.tool_hash)
        if key not in self._annotations:
            definition = self._definitions(call.upstream, call.target)
            found: Any = None
            if definition is not None and record_hash(canonical(definition)) == call.tool_hash:
                found = definition.get("annotations")
                found = cast(dict[str, Any], found) if isinstance(found, dict) else {}
            self._annotations[key] = found
        return self._annotations[key]


def _decision_key(
    call: RecordedCall,
    rules: tuple[Rule, ...],
    args: Mapping[str, Any],
    annotations: Mapping[str, Any] | None,
) -> tuple[object, ...] | None:
    """What the decision can depend on; None when a condition reads the arguments whole."""
    values: list[str] = []
    tool = ""
    for rule in rules:
        if not rule.values[5]:
            continue
        paths, whole, reads_tool = reads(rule.values[5])
        if whole:
            return None
        values.extend(_value_at(args, path) for path in paths)
        if reads_tool:
            tool = canonical(annotations) if annotations is not None else "-"
    return (call.subject, call.object, call.action, tuple(values), tool)


def _value_at(args: Any, path: tuple[str | int, ...]) -> str:
    value: Any = args
    for key in path:
        if isinstance(value, dict) and isinstance(key, str) and key in value:
            value = cast(dict[str, Any], value)[key]
            continue
        if isinstance(value, list) and isinstance(key, int):
            items = cast(list[Any], value)
            if -len(items) <= key < len(items):
                value = items[key]
                continue
        return "\x00missing"
    return canonical(value)


def _unreadable(rule: Rule, cond: str, call: RecordedCall, annotations: Mapping[str, Any] | None) -> str:
    paths, whole, reads_tool = reads(cond)
    if reads_tool and annotations is None:
        return f"{rule.csv()} reads r.tool, and the tool definition the call used is no longer known"
    if call.args is None:
        return ""  # no arguments at all: every r.args.<name> is missing, exactly as it was
    if call.args_truncated:
        return f"{rule.csv()} reads r.args, and the record keeps only a summary of the arguments"
    if whole and tainted(call.args):
        return f"{rule.csv()} reads the arguments whole, and the record redacted some of them"
    for path in paths:
        if _path_tainted(call.args, path):
            shown = ".".join(str(p) for p in path)
            return f"{rule.csv()} reads r.args.{shown}, which the record redacted"
    return ""


@lru_cache(maxsize=1024)
def reads(cond: str) -> tuple[tuple[tuple[str | int, ...], ...], bool, bool]:
    """What a condition reads: the ``r.args`` paths it follows (``r.args.a.b``, ``r.args['a-b']``),
    whether it also uses ``r.args`` some other way (whole, or with a computed key), whether it reads
    ``r.tool``."""
    tree = compile_condition(cond)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    paths: list[tuple[str | int, ...]] = []
    whole = reads_tool = False
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "r"
        ):
            continue
        if node.attr == "tool":
            reads_tool = True
        if node.attr != "args":
            continue
        path: list[str | int] = []
        here: ast.AST = node
        while True:
            up = parents.get(id(here))
            if isinstance(up, ast.Attribute) and up.value is here:
                path.append(up.attr)
            elif (
                isinstance(up, ast.Subscript)
                and up.value is here
                and isinstance(up.slice, ast.Constant)
                and isinstance(up.slice.value, str | int)
            ):
                path.append(cast(str | int, up.slice.value))
            else:
                break
            here = up
        if path:
            paths.append(tuple(path))
        else:
            whole = True
    return tuple(paths), whole, reads_tool


def tainted(value: Any) -> bool:
    """Whether a stored value is (or holds) something the redactor replaced or cut."""
    if isinstance(value, str):
        return any(m in value for m in _MARKERS) or _cut(value)
    if isinstance(value, dict):
        items = cast(dict[str, Any], value)
        return any(tainted(k) or tainted(v) for k, v in items.items())
    if isinstance(value, list):
        return any(tainted(v) for v in cast(list[Any], value))
    return False


def _path_tainted(args: Any, path: tuple[str | int, ...]) -> bool:
    value = args
    for key in path:
        if isinstance(value, str):
            return tainted(value)  # a marker stands where a mapping or list was
        if isinstance(value, dict):
            items = cast(dict[str, Any], value)
            if isinstance(key, str) and key in items:
                value = items[key]
                continue
            # Missing: unless a redacted key may have been this one, the condition saw it missing too.
            return any(tainted(k) for k in items)
        if isinstance(value, list) and isinstance(key, int):
            seq = cast(list[Any], value)
            if -len(seq) <= key < len(seq):
                value = seq[key]
                continue
        return False
    return tainted(value)


def _cut(text: str) -> bool:
    return _CUT.search(text) is not None
