"""Shadowing: a tool whose exposed name looks like another upstream's, or that claims to replace one.

Confusables come from the ``confusable-homoglyphs`` package, which ships Unicode's UTS #39
``confusables.txt`` as data (each source character linked both ways with its prototype). Each source
maps to exactly one prototype, so the links form stars; mapping every member of a star to its centre
gives the UTS #39 skeleton relation (``m`` and ``rn`` share one, as do Cyrillic ``\\u0441`` and Latin ``c``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from functools import cache
from typing import cast

from confusable_homoglyphs import confusables as _homoglyphs  # pyright: ignore[reportMissingTypeStubs]

from arbiter.integrity.findings import Finding, excerpt
from arbiter.naming import exposed_name

_SEPARATORS = re.compile(r"[\s_.\-]+")
_CLAIM = (
    r"\b(?:replaces?|replacement\s+for|supersedes?|overrides?|shadows?|takes?\s+precedence\s+over|"
    r"deprecates?|instead\s+of|in\s+place\s+of|rather\s+than|new\s+version\s+of|drop-in\s+for|"
    r"(?:use|call)\s+this\s+(?:tool\s+)?instead)\b"
)


@cache
def _prototypes() -> dict[str, str]:
    data = cast(dict[str, list[dict[str, str]]], _homoglyphs.confusables_data)
    links: dict[str, set[str]] = {}
    for key, entries in data.items():
        # The generator copied the left-to-right marks around RTL glyphs from the file's comments.
        a = key.strip("\u200e\u200f")
        for entry in entries:
            b = entry["c"].strip("\u200e\u200f")
            if a and b and a != b:
                links.setdefault(a, set()).add(b)
                links.setdefault(b, set()).add(a)
    mapping: dict[str, str] = {}
    for node, neighbours in links.items():
        if len(node) != 1:
            continue  # prototypes can be sequences (``rn``); sources are single code points
        centre = min((node, *neighbours), key=lambda n: _centre_rank(n, links))
        if centre != node:
            mapping[node] = centre
    return mapping


def _centre_rank(node: str, links: dict[str, set[str]]) -> tuple[int, int, int, str]:
    # The prototype is the star's centre: most links, then a sequence, then ASCII, then lowest.
    return (-len(links.get(node, ())), -len(node), 0 if node.isascii() else 1, node)


def skeleton(name: str) -> str:
    """A key under which names that look alike are equal: NFKC, casefold, combining marks and invisible
    characters removed, confusables mapped to their UTS #39 prototype, separators ``_ - . space`` removed."""
    text = unicodedata.normalize("NFKC", name).casefold()
    # Stricter than UTS #39 on purpose: accents and invisible characters go too, since "réad_file"
    # passes for "read_file" in a tool list, and a flag only asks for a human review.
    text = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc", "Mn"))
    mapping = _prototypes()
    text = "".join(mapping.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SEPARATORS.sub("", text)


def find_shadowing(
    candidate: tuple[str, str],
    description: str,
    others: Collection[tuple[str, str]],
) -> list[Finding]:
    """Findings when ``candidate`` (upstream, tool) looks like another upstream's tool or claims to
    replace one in its description. Tools of the candidate's own upstream are not shadowing."""
    upstream, tool = candidate
    exposed = exposed_name(upstream, tool)
    key = skeleton(exposed)
    findings: list[Finding] = []
    foreign = sorted({o for o in others if o[0] != upstream})
    for other_upstream, other_tool in foreign:
        other = exposed_name(other_upstream, other_tool)
        if other != exposed and skeleton(other) == key:
            findings.append(
                Finding(
                    "shadowing.name-collision",
                    "shadowing",
                    "name",
                    0,
                    len(tool),
                    excerpt(tool, 0, len(tool)),
                    f"exposed name {exposed!r} looks like {other!r} of upstream {other_upstream!r}",
                )
            )
    findings.extend(_replace_claims(description, foreign))
    return findings


def _replace_claims(description: str, foreign: list[tuple[str, str]]) -> list[Finding]:
    if not description or not foreign:
        return []
    names = {exposed_name(u, t): (u, t) for u, t in foreign}
    names.update({t: (u, t) for u, t in foreign})
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    named = r"[`'\"]?(?<![\w-])(?P<{group}>" + alternatives + r")(?![\w-])[`'\"]?"
    pattern = re.compile(
        rf"{_CLAIM}[^.\n]{{0,40}}?{named.replace('{group}', 'a')}|"
        rf"{named.replace('{group}', 'b')}[^.\n]{{0,40}}?\b(?:is\s+(?:now\s+)?)?deprecated\b",
        re.IGNORECASE,
    )
    findings: list[Finding] = []
    for m in pattern.finditer(description):
        name = m.group("a") or m.group("b")
        owner = next(v for k, v in names.items() if k.lower() == name.lower())
        findings.append(
            Finding(
                "shadowing.replaces-tool",
                "shadowing",
                "description",
                m.start(),
                m.end(),
                excerpt(description, m.start(), m.end()),
                f"description claims to replace {exposed_name(*owner)!r} of upstream {owner[0]!r}",
            )
        )
    return findings
