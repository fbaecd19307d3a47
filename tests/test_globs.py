"""The one glob dialect policies, limits and redaction paths share."""

from __future__ import annotations

import re

import pytest

from arbiter.globs import compile_glob, glob_match, glob_to_regex


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("*", "", True),
        ("*", "anything/at all\n", True),
        ("crm/*", "crm/get_customer", True),
        ("crm/*", "crm/a/b", True),  # `*` crosses `/` (resource URIs, <upstream>/<tool>)
        ("file:///docs/*", "file:///docs/a\nb", True),  # and newlines
        ("delete_*", "delete_customer", True),
        ("delete_*", "soft_delete_customer", False),  # anchored at the start...
        ("*_customer", "get_customer_v2", False),  # ...and at the end
        ("get_?", "get_x", True),
        ("get_?", "get_", False),  # `?` is exactly one character
        ("get_?", "get_xy", False),
        ("a.b", "a.b", True),
        ("a.b", "axb", False),  # regex characters are literals
        ("items.[].card", "items.[].card", True),  # no character classes: `[]` is literal
        ("(x)+", "(x)+", True),
        ("Alice", "alice", False),  # case-sensitive
    ],
)
def test_glob_match(pattern: str, value: str, matches: bool) -> None:
    assert glob_match(pattern, value) is matches
    assert (compile_glob(pattern).fullmatch(value) is not None) is matches


def test_regex_source_combines_and_takes_flags() -> None:
    # Redaction paths join several globs into one alternation and match them whatever the case.
    paths = re.compile(
        "|".join(glob_to_regex(p) for p in ("*password", "card.[]")), re.IGNORECASE | re.DOTALL
    )
    assert paths.fullmatch("db_PASSWORD") is not None
    assert paths.fullmatch("CARD.[]") is not None
    assert paths.fullmatch("card.[].x") is None
    assert glob_to_regex("a*b?c") == "a.*b.c"
