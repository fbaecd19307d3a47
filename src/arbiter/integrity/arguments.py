"""The argument guard: a tool call's arguments are checked before anything is forwarded.

In order: the depth and size caps (cheap, before any validator runs on hostile input); the deny rules'
detectors (a secret is refused as ``sensitive_argument`` whatever else is wrong with the call, so the
refusal never depends on the schema); the pinned input schema (``invalid_arguments``); then the redact
rules, whose matches are replaced by ``[REDACTED:<detector>]`` in what is forwarded. The schema judges
the arguments as the agent sent them, before redaction.

Detectors look at string values (keys are names the tool's schema chose, not data). What a detector
found is reported by detector name and argument path, never by value.

This module never logs: whatever it sees may be a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from arbiter.errors import ArbiterError, InvalidArguments, SensitiveArgument
from arbiter.globs import glob_match
from arbiter.integrity.detect import NamedDetectors
from arbiter.integrity.schemas import SchemaCache, Unchecked, errors, refusal
from arbiter.settings import ArgumentGuardSettings, ArgumentRule

_RULE_CACHE_MAX = 4096
_MAX_PATHS = 20


@dataclass(slots=True)
class Checked:
    """What the guard made of one call: the arguments to forward (a new structure when redacted), what
    it found (for the audit record), and its refusal, if any."""

    arguments: dict[str, Any]
    found: dict[str, object] = field(default_factory=dict[str, object])
    refusal: ArbiterError | None = None


@dataclass(frozen=True, slots=True)
class _Rules:
    deny: NamedDetectors
    redact: NamedDetectors


class ArgumentGuard:
    def __init__(self, settings: ArgumentGuardSettings, patterns: dict[str, str]) -> None:
        self._settings = settings
        self._patterns = patterns
        self._schemas = SchemaCache(settings.validator_cache)
        # Per distinct set of detector names: compiled once; per (tool, roles): which apply.
        self._compiled: dict[tuple[str, ...], NamedDetectors] = {}
        self._for_call: dict[tuple[str, frozenset[str]], _Rules] = {}
        for i, rule in enumerate(settings.rules):  # unknown names fail at start, not on a call
            self._named(tuple(rule.detectors), f"integrity.arguments.rules[{i}]")

    def check(
        self,
        tool: str,
        roles: frozenset[str],
        arguments: Mapping[str, Any],
        schema: Mapping[str, Any] | None,
    ) -> Checked:
        args = cast(dict[str, Any], arguments)
        settings = self._settings
        depth = _depth(args, settings.max_depth)
        if depth > settings.max_depth:
            return Checked(args, refusal=_capped(f"are nested deeper than {settings.max_depth} levels"))
        if _size(args) > settings.max_bytes:
            return Checked(args, refusal=_capped(f"are larger than {settings.max_bytes} bytes as JSON"))
        rules = self._rules(tool, roles)
        if rules.deny.passes:
            found: dict[str, int] = {}
            paths: list[str] = []
            redacted = _rewrite(args, rules.deny, found, paths)
            if found:
                detectors = sorted(found)
                shown = paths[:_MAX_PATHS]
                return Checked(
                    cast(dict[str, Any], redacted),  # the audit record gets these, never the originals
                    {"detectors": found, "paths": shown, "action": "deny"},
                    SensitiveArgument(
                        f"the arguments of {tool} hold data Arbiter does not forward "
                        f"({', '.join(detectors)})",
                        detectors=detectors,
                        paths=shown,
                    ),
                )
        if settings.validate_schema and schema is not None:
            try:
                problems = errors(self._schemas.validator(tool, schema), args)
            except Unchecked as why:
                return Checked(args, refusal=refusal(tool, why))
            if problems:
                return Checked(
                    args,
                    refusal=InvalidArguments(
                        f"the arguments of {tool} do not match its input schema", errors=problems
                    ),
                )
        if rules.redact.passes:
            found = {}
            paths = []
            redacted = _rewrite(args, rules.redact, found, paths)
            if found:
                return Checked(
                    cast(dict[str, Any], redacted),
                    {"detectors": found, "paths": paths[:_MAX_PATHS], "action": "redact"},
                )
        return Checked(args)

    def _rules(self, tool: str, roles: frozenset[str]) -> _Rules:
        key = (tool, roles)
        rules = self._for_call.get(key)
        if rules is None:
            deny: list[str] = []
            redact: list[str] = []
            for rule in self._settings.rules:
                if _applies(rule, tool, roles):
                    (deny if rule.action == "deny" else redact).extend(rule.detectors)
            rules = _Rules(self._named(tuple(deny), "deny"), self._named(tuple(redact), "redact"))
            if len(self._for_call) >= _RULE_CACHE_MAX:
                self._for_call.clear()
            self._for_call[key] = rules
        return rules

    def _named(self, names: tuple[str, ...], where: str) -> NamedDetectors:
        key = tuple(sorted(set(names)))
        named = self._compiled.get(key)
        if named is None:
            named = self._compiled[key] = NamedDetectors(key, self._patterns, where)
        return named


def _applies(rule: ArgumentRule, tool: str, roles: frozenset[str]) -> bool:
    if rule.roles and roles.isdisjoint(rule.roles):
        return False
    return any(glob_match(pattern, tool) for pattern in rule.tools)


def _capped(what: str) -> InvalidArguments:
    return InvalidArguments(f"the arguments {what}", errors=[{"path": "$", "keyword": "arbiter_cap"}])


def _depth(value: object, limit: int) -> int:
    """How deep ``value`` nests (1 for a flat object), counting no further than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in cast(dict[str, object], item).values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in cast(list[object], item))
    return deepest


def _size(value: dict[str, Any]) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:  # an integer beyond 64 bits, or nesting orjson refuses: the standard library
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace"))


def _rewrite(value: object, detectors: NamedDetectors, found: dict[str, int], paths: list[str]) -> object:
    """``value`` with detector matches replaced in every string (a new structure only where something
    changed); each path where something was found is added to ``paths``. Depth is capped beforehand."""
    return _walk(value, "$", detectors, found, paths)


def _walk(
    value: object, path: str, detectors: NamedDetectors, found: dict[str, int], paths: list[str]
) -> object:
    if isinstance(value, str):
        before = sum(found.values())
        text = detectors.scan(value, found)
        if sum(found.values()) != before:
            paths.append(path)
        return text
    if isinstance(value, dict):
        items = cast(dict[str, object], value)
        out: dict[str, object] = {}
        changed = False
        for key, item in items.items():
            new = _walk(item, f"{path}.{key}", detectors, found, paths)
            changed = changed or new is not item
            out[key] = new
        return out if changed else items
    if isinstance(value, list):
        seq = cast(list[object], value)
        rewritten = [_walk(item, f"{path}[{i}]", detectors, found, paths) for i, item in enumerate(seq)]
        return rewritten if any(a is not b for a, b in zip(rewritten, seq, strict=True)) else seq
    return value
