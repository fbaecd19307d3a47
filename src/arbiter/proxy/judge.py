"""The integrity scans a new definition gets before its review status is decided (docs/integrity.md):
the poisoning scan of its text, and for tools the shadowing check against the other upstreams' tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arbiter.integrity.scan import RuleSet, scan_definition
from arbiter.integrity.shadowing import find_shadowing
from arbiter.naming import exposed_name
from arbiter.proxy.catalog import Catalog


class DefinitionScan:
    """``DefinitionJudge`` for the registry: findings as JSON (empty when the definition is clean)."""

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules

    def __call__(
        self, upstream: str, kind: str, name: str, definition: Mapping[str, Any], catalog: Catalog
    ) -> list[dict[str, Any]]:
        others = [
            (other, tool)
            for other in catalog.upstreams()
            if other != upstream
            for tool in _tools(catalog, other)
        ]
        names = {exposed_name(u, t) for u, t in others} | {t for _, t in others}
        findings = scan_definition(kind, definition, self._rules, other_tools=names)
        if kind == "tool":
            description = definition.get("description")
            text = description if isinstance(description, str) else ""
            findings.extend(find_shadowing((upstream, name), text, others))
        return [f.to_json() for f in findings]


def _tools(catalog: Catalog, upstream: str) -> list[str]:
    """An upstream's tools, served or held: a held tool is shadowed as much as a served one."""
    snap = catalog.get(upstream)
    if snap is None:
        return []
    return [*snap.tools, *(name for kind, name in snap.held if kind == "tool")]
