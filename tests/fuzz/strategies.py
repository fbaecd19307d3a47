"""Hypothesis strategies for hostile input: JSON of every type and depth, odd ids, odd header values."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

HUGE = 1180591620717411303424  # 2**70: past int64, past float precision

# Text with the characters that trip parsers and encoders: NUL, surrogates' neighbours, RTL marks,
# combining marks, emoji, the replacement character.
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\u202e",
            "\ufeff",
            "\ufffd",
            "e\u0301",
            "\U0001f4a9",
            "../../etc/passwd",
            "%00",
            "%2F",
            "null",
            "NaN",
            "1e309",
            "-0",
            "'; DROP TABLE x; --",
            "=cmd|' /C calc'!A0",
            "a" * 5000,
        ]
    ),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, HUGE, -HUGE, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class Deep:
    """``depth`` levels of alternating arrays and objects: too deep for ``json.dumps``, so ``encode``
    writes it out by hand."""

    depth: int

    def text(self) -> str:
        opening = "".join('{"a":' if i % 2 else "[" for i in range(self.depth))
        closing = "".join("}" if i % 2 else "]" for i in reversed(range(self.depth)))
        return f"{opening}1{closing}"


_DEEP = "\u0000deep\u0000"


def encode(value: Any) -> bytes:
    """JSON text (UTF-8) of ``value``, which may hold one ``Deep``."""
    found: list[Deep] = []

    def default(obj: object) -> object:
        if isinstance(obj, Deep):
            found.append(obj)
            return _DEEP
        raise TypeError(type(obj).__name__)

    text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=default)
    for deep in found:
        text = text.replace(json.dumps(_DEEP), deep.text(), 1)
    return text.encode("utf-8")


deep_values = st.integers(min_value=1, max_value=5000).map(Deep)

# Request ids MCP does not allow (null, bool, fractional, structured), and allowed but extreme ones.
bad_ids = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)
good_ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([HUGE, -HUGE]),
    st.text(max_size=20),
    st.text(min_size=1000, max_size=3000, alphabet="ab\u00e9\U0001f600"),
)

# Header values as bytes (obs-text allowed by HTTP/1.1, no CR/LF/NUL); some are the SDK's base64 form.
_header_chars = st.characters(blacklist_categories=("Cc", "Cs"))


def _sentinel(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode("utf-8")).decode() + "?="


header_text = st.one_of(
    st.text(_header_chars, max_size=30),
    st.text(_header_chars, max_size=30).map(_sentinel),
    st.sampled_from(["=?base64?!!!?=", "=?base64??=", "=?base64?AAAA", "  padded  ", "\t", "x" * 9000]),
)
header_values = header_text.map(lambda t: t.strip(" \t").encode("utf-8"))
