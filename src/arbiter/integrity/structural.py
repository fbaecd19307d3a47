"""Checks that are about the shape of text rather than its words: hidden characters, HTML comments,
base64 blobs and excessive length. Each yields ``(rule, category, start, end, message)``."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterator

from arbiter.integrity.rules import Thresholds

Hit = tuple[str, str, int, int, str]

# ANSI/VT escape sequences (CSI, OSC, two-character escapes): Trail of Bits showed them hiding text in
# terminals that render tool descriptions.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]{0,512}(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|\x9b")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200f\u2060-\u2064\ufeff\u180e\u115f\u1160\u3164\uffa0]+")
_TAGS = re.compile(r"[\U000e0000-\U000e007f]+")
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069\u061c]+")
_VARIATION = re.compile(r"[\U000e0100-\U000e01ef]+")
_HTML_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_B64_CANDIDATE = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Every Cc/Cf/Zl/Zp code point except \n \t \r (Unicode 15.1), as a regex so the scan never walks
# ordinary text character by character; matches are confirmed with ``unicodedata`` and a test checks
# that no such character of the running Python's Unicode version falls outside it.
CONTROL_CANDIDATES = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]+"
)


def structural_hits(text: str, thresholds: Thresholds) -> Iterator[Hit]:
    # Positions already reported by a specific check, so the generic control-character check skips them.
    covered = bytearray(len(text))
    for m in _ANSI.finditer(text):
        covered[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
        yield ("hidden.ansi-escape", "hidden_text", *m.span(), "ANSI terminal escape sequence")
    for m in _TAGS.finditer(text):
        covered[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
        decoded = "".join(chr(ord(c) - 0xE0000) for c in m.group() if 0x20 <= ord(c) - 0xE0000 < 0x7F)
        yield (
            "hidden.tag-characters",
            "hidden_text",
            *m.span(),
            f"invisible Unicode tag characters spelling {decoded[:80]!r}",
        )
    for pattern, rule, what in (
        (_ZERO_WIDTH, "hidden.zero-width", "zero-width or invisible filler characters"),
        (_BIDI, "hidden.bidi-control", "bidirectional control characters that reorder displayed text"),
        (_VARIATION, "hidden.variation-selector", "invisible variation selectors (can encode data)"),
    ):
        for m in pattern.finditer(text):
            covered[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
            yield (rule, "hidden_text", *m.span(), what)
    yield from _other_controls(text, covered)
    for m in _HTML_COMMENT.finditer(text):
        yield ("markup.html-comment", "hidden_text", *m.span(), "HTML comment (hidden when rendered)")
    yield from _base64_blobs(text, thresholds.base64_min_length)
    if len(text) > thresholds.max_text_length:
        yield (
            "structure.too-long",
            "length",
            thresholds.max_text_length,
            len(text),
            f"text of {len(text)} characters exceeds {thresholds.max_text_length}",
        )


def _other_controls(text: str, covered: bytearray) -> Iterator[Hit]:
    """Remaining Cc/Cf/line-separator characters not reported by a specific check, grouped into runs."""
    for m in CONTROL_CANDIDATES.finditer(text):
        start = -1
        for i in range(m.start(), m.end() + 1):
            hidden = i < m.end() and not covered[i] and unicodedata.category(text[i]) in _CONTROL_CATEGORIES
            if hidden and start < 0:
                start = i
            elif not hidden and start >= 0:
                yield ("hidden.control", "hidden_text", start, i, "invisible format or control characters")
                start = -1


def _base64_blobs(text: str, min_length: int) -> Iterator[Hit]:
    for m in _B64_CANDIDATE.finditer(text):
        blob = m.group()
        if len(blob) < min_length or not _looks_encoded(blob):
            continue
        decoded = _decode(blob)
        if decoded is None:
            continue
        if _is_text(decoded):
            what = f"base64 blob decoding to {decoded.decode('utf-8', 'replace')[:60]!r}"
        elif len(blob) >= 2 * min_length:
            what = f"base64 blob of {len(blob)} characters"
        else:
            continue
        yield ("encoding.base64-blob", "encoded", *m.span(), what)


def _looks_encoded(blob: str) -> bool:
    # Identifiers, paths and words are long runs too; real encodings mix cases and digits.
    return (
        any(c.isupper() for c in blob)
        and any(c.islower() for c in blob)
        and (any(c.isdigit() for c in blob) or any(c in "+/=" for c in blob))
    )


def _decode(blob: str) -> bytes | None:
    body = blob.rstrip("=")
    altchars = b"-_" if ("-" in body or "_" in body) else None
    if altchars and ("+" in body or "/" in body):
        return None
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw or None


def _is_text(raw: bytes) -> bool:
    # Short random-looking tokens in examples decode to noise; hidden instructions decode to text.
    printable = sum(1 for b in raw if 32 <= b < 127 or b in (9, 10, 13))
    return printable / len(raw) >= 0.85
