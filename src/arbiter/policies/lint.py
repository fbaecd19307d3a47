"""Warnings for a policy write: rules naming an upstream, tool, prompt or admin area that does not exist.

A warning, never a refusal: a security team may write the rule before the upstream is registered or
before the tool ships. But a misspelt name otherwise fails silently (the rule simply never matches),
so the write's answer says which names match nothing, and the nearest name that exists.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from arbiter.globs import glob_match
from arbiter.policies.rules import ADMIN_ACTIONS, Rule

# The catalog kinds each agent action can use (``list`` makes any of them visible).
_ACTION_KINDS: dict[str, tuple[str, ...]] = {
    "call": ("tool",),
    "get": ("prompt",),
    "read": ("resource", "resource_template"),
    "list": ("tool", "prompt", "resource", "resource_template"),
}
_NOUNS = {"call": "tool", "get": "prompt", "read": "resource", "list": "tool, prompt or resource"}


@dataclass(frozen=True)
class Known:
    """What exists now: registered upstreams, each one's catalog names per kind, and the admin areas."""

    upstreams: frozenset[str]
    areas: frozenset[str]
    # upstream -> kind -> names (tool/prompt names, resource URIs, template strings), held ones included
    entries: Mapping[str, Mapping[str, frozenset[str]]] = field(
        default_factory=dict[str, Mapping[str, frozenset[str]]]
    )


def object_warnings(rules: Sequence[Rule], known: Known) -> list[str]:
    """One warning per ``p`` rule whose object names nothing that exists (``rule N`` counts from 1)."""
    warnings: list[str] = []
    for number, rule in enumerate(rules, start=1):
        if rule.ptype != "p" or rule.values[2] == "*":
            continue
        problem = _problem(rule.values[2], rule.values[3], known)
        if problem:
            warnings.append(f"rule {number} ({rule.csv()}): {problem}")
    return warnings


def _problem(obj: str, action: str, known: Known) -> str | None:
    upstream, _, name = obj.partition("/")
    if action in ADMIN_ACTIONS:
        if any(glob_match(name, a) for a in known.areas):
            return None
        areas = ", ".join(sorted(known.areas))
        return f"admin area {name!r} does not exist{_hint(name, known.areas)} (areas: {areas})"
    upstreams = [u for u in known.upstreams if glob_match(upstream, u)]
    if not upstreams:
        registered = ", ".join(sorted(known.upstreams)) or "none"
        return (
            f"no registered upstream matches {upstream!r}{_hint(upstream, known.upstreams)} "
            f"(registered: {registered}); the rule applies once one is registered"
        )
    if action == "read" and not _glob(name):
        return None  # a concrete URI may be an instance of a template: nothing to check it against
    names = {
        n
        for u in upstreams
        for kind in _ACTION_KINDS.get(action, ())
        for n in known.entries.get(u, {}).get(kind, ())
    }
    if any(glob_match(name, n) for n in names):
        return None
    where = upstreams[0] if len(upstreams) == 1 else f"the upstreams matching {upstream!r}"
    return f"{where} offers no {_NOUNS.get(action, 'item')} matching {name!r}{_hint(name, names)}"


def _glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _hint(name: str, choices: Iterable[str]) -> str:
    if _glob(name):
        return ""
    near = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""
