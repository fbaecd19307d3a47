"""Arbiter's one glob dialect, shared by policies, limits and redaction paths.

``*`` matches any run of characters (``/`` and newlines included: resource URIs and tool patterns have
slashes), ``?`` exactly one character, and everything else only itself. There are no character classes:
``[]`` is a literal here (a list item in a redaction path), unlike in ``fnmatch``. Matching is always
against the whole value. Imports nothing of Arbiter, so any module may use it.
"""

from __future__ import annotations

import re
from functools import lru_cache


def glob_to_regex(pattern: str) -> str:
    """The regular expression source for ``pattern``, unanchored (use ``fullmatch``) and meant for
    ``re.DOTALL``, so that ``*`` and ``?`` cross newlines too."""
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


@lru_cache(maxsize=8192)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled (cached, case-sensitive); match with ``fullmatch``."""
    return re.compile(glob_to_regex(pattern), re.DOTALL)


def glob_match(pattern: str, value: str) -> bool:
    """Does the case-sensitive glob ``pattern`` match the whole of ``value``?"""
    return pattern == "*" or compile_glob(pattern).fullmatch(value) is not None
