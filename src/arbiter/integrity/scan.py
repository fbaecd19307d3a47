"""The poisoning scan: run the rules and the structural checks over every text of a definition.

It runs when a definition is first seen or changes, so it can afford every text at any depth; the rules
are compiled once by ``load_rules`` and reused.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

from arbiter.integrity.findings import Finding, excerpt
from arbiter.integrity.rules import Rule, RuleSet, Thresholds, load_rules
from arbiter.integrity.structural import structural_hits
from arbiter.integrity.texts import Text, collect
from arbiter.naming import split_name

__all__ = ["Finding", "Rule", "RuleSet", "Thresholds", "load_rules", "scan_definition"]

# "resource" too: the catalog pins static resources alongside the three kinds the issue names.
KINDS = frozenset({"tool", "prompt", "resource_template", "resource"})
# Past this, regexes only see the head of a field; the length check has already flagged it.
_SCAN_LIMIT = 16_384
_MAX_FINDINGS = 200
_PER_RULE = 5
# A plain one-word tool name ("search") is an ordinary word too: it counts as a reference only when
# quoted, called by a verb right before it, or followed by "tool"/"function".
_CALL_BEFORE = re.compile(
    r"\b(?:call|calling|use|using|invoke|invoking|run|running|execute|executing|trigger)\s+(?:the\s+)?$",
    re.IGNORECASE,
)
_TOOL_AFTER = re.compile(r"\s+(?:tool|function)\b", re.IGNORECASE)


def scan_definition(
    kind: str,
    definition: Mapping[str, Any],
    rules: RuleSet,
    *,
    other_tools: Collection[str] = (),
) -> list[Finding]:
    """Findings for one MCP definition (``kind`` is "tool", "prompt", "resource_template" or "resource").

    ``other_tools`` are names of other tools (exposed ``<upstream>__<tool>`` and plain): a text telling
    the model to call one of them by name is flagged.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown definition kind {kind!r}")
    walk = collect(kind, definition, rules.thresholds.max_depth)
    findings: list[Finding] = [
        Finding("structure.too-deep", "structure", path, 0, 0, "", "nesting deeper than the scan bound")
        for path in dict.fromkeys(walk.too_deep)
    ]
    refs = _tool_reference_pattern(definition, other_tools)
    for item in walk.texts:
        if len(findings) >= _MAX_FINDINGS:
            break
        findings.extend(_scan_text(item, rules, refs))
    return findings[:_MAX_FINDINGS]


def _scan_text(item: Text, rules: RuleSet, refs: re.Pattern[str] | None) -> list[Finding]:
    text = item.text
    head = text[:_SCAN_LIMIT]
    out: list[Finding] = []
    per_rule: Counter[str] = Counter()

    def add(rule: str, category: str, start: int, end: int, message: str) -> None:
        # A few findings per rule and field show the problem; thousands of zero-width runs would only
        # crowd out the other rules' findings and cost time.
        per_rule[rule] += 1
        if per_rule[rule] <= _PER_RULE:
            out.append(Finding(rule, category, item.path, start, end, excerpt(text, start, end), message))

    # Structural checks are linear, so they see all of it: hidden characters may sit past the head.
    for hit in structural_hits(text, rules.thresholds):
        add(*hit)
    for rule in rules.rules:
        for m in itertools.islice(rule.pattern.finditer(head), _PER_RULE):
            if m.end() > m.start():
                add(rule.id, rule.category, m.start(), m.end(), rule.message)
    if refs is not None and item.path != "name":
        for m in refs.finditer(head):
            name = m.group("name")
            distinctive = m.group("q") is not None or any(c in name for c in "_-.")
            if (
                distinctive
                or _CALL_BEFORE.search(head, max(0, m.start() - 30), m.start())
                or _TOOL_AFTER.match(head, m.end())
            ):
                add(
                    "tool.reference",
                    "tool_reference",
                    m.start(),
                    m.end(),
                    f"references another tool {name!r}",
                )
            if per_rule["tool.reference"] >= _PER_RULE:
                break
    return out


def _tool_reference_pattern(
    definition: Mapping[str, Any], other_tools: Collection[str]
) -> re.Pattern[str] | None:
    own = definition.get("name")
    names: set[str] = set()
    for name in other_tools:
        if not name or name == own:
            continue
        names.add(name)
        parts = split_name(name)
        if parts is not None and parts[1] != own:
            names.add(parts[1])
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    # Word-like boundaries that treat _ and - as part of a name, optionally quoted or in backticks.
    return re.compile(
        rf"(?P<q>[`'\"])?(?<![\w-])(?P<name>{alternatives})(?![\w-])(?(q)[`'\"])",
        re.IGNORECASE,
    )
