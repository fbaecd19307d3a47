"""A finding of the integrity scan: which rule fired, where, and an excerpt an admin can read safely."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

# Characters a reviewer must see as escapes: invisible ones would otherwise hide the very thing flagged,
# and terminal control sequences must not reach an admin's terminal or console raw.
_VISIBLE_CATEGORIES_EXCLUDED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
EXCERPT_MAX = 160
_CONTEXT = 40


@dataclass(frozen=True)
class Finding:
    rule: str
    category: str
    field: str  # JSON path within the definition, e.g. "inputSchema.properties.path.description"
    start: int  # span [start, end) in that field's text
    end: int
    excerpt: str
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "category": self.category,
            "field": self.field,
            "start": self.start,
            "end": self.end,
            "excerpt": self.excerpt,
            "message": self.message,
        }


def _is_hidden(ch: str) -> bool:
    cp = ord(ch)
    if unicodedata.category(ch) in _VISIBLE_CATEGORIES_EXCLUDED:
        return True
    # Variation selectors and Hangul/halfwidth fillers render as nothing but are not Cf.
    return 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF or cp in (0x115F, 0x1160, 0x3164, 0xFFA0)


def escape_hidden(text: str) -> str:
    """Show invisible and control characters as ``\\uXXXX`` (``\\UXXXXXXXX`` beyond the BMP)."""
    out: list[str] = []
    for ch in text:
        if ch == " " or not _is_hidden(ch):
            out.append(ch)
        elif ord(ch) > 0xFFFF:
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def excerpt(text: str, start: int, end: int) -> str:
    """The span with a little context, escaped, at most about ``EXCERPT_MAX`` characters."""
    budget = EXCERPT_MAX - 2  # room for the two ellipses
    shown = escape_hidden(text[start : min(end, start + EXCERPT_MAX)])
    if len(shown) >= budget or end - start >= EXCERPT_MAX:
        return ("…" if start else "") + shown[: budget - 1] + "…"
    left = escape_hidden(text[max(0, start - _CONTEXT) : start])
    right = escape_hidden(text[end : end + _CONTEXT])
    room = budget - len(shown)
    pre = left[len(left) - min(len(left), room // 2) :]
    post = right[: room - len(pre)]
    cut_left = start > _CONTEXT or len(pre) < len(left)
    cut_right = end + _CONTEXT < len(text) or len(post) < len(right)
    return ("…" if cut_left else "") + pre + shown + post + ("…" if cut_right else "")
