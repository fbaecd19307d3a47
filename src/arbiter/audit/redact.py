"""Redaction of tool-call arguments and free text before anything reaches the audit log.

Two kinds of rule (``RedactSettings``): *path rules* replace the whole value under a matching key, and
*value detectors* (``arbiter.audit.detectors``) replace only the matching part of a string. This module
walks the structure: it matches paths, applies the detectors to every string and key, bounds depth,
string length and size, and never mutates what it is given. Everything is compiled once per
``Redactor``.

This module never logs: whatever it sees may be a secret.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from arbiter.audit.detectors import Detectors, is_card_number
from arbiter.globs import glob_to_regex
from arbiter.settings import RedactSettings

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"

MAX_DEPTH = 32
PATH_MARKER = "[REDACTED:path]"
DEPTH_MARKER = "[TRUNCATED:depth]"
SUMMARY_KEYS = 50
# A string is scanned this far past max_string and no further, so a hostile 1 MiB string costs what a
# 18 KiB one does; only scanned text is ever kept.
_SCAN_MARGIN = 16 * 1024
# Beyond this length a dotted path is no longer matched (its last key's name still is): bounded work
# for hostile nesting of long keys. Names and paths up to 256 characters are cached, at most 4096.
_MAX_PATH = 1024
_CACHE_MAX = 4096
_SUMMARY_KEY_CHARS = 64
# A scanned prefix ends before the token it cuts through: a secret split there could not be recognised
# and its first half would otherwise be kept.
_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.+/=~@%:"
# Python refuses to print ints past 4300 digits; 14,000 bits stays below that.
_MAX_INT_BITS = 14_000


@dataclass(frozen=True, slots=True)
class RedactedArgs:
    """Arguments as the audit log may store them."""

    # JSON-compatible (a ``JSONValue``); a new structure, the caller's objects are never mutated. None when
    # args is None.
    value: Any
    redactions: int  # values and matches replaced
    truncated: bool  # the redacted arguments exceeded max_bytes and ``value`` is a summary


def _key_name(key: object) -> str:
    """A key as JSON would write it (JSON objects only have string keys)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return str(key) if key.bit_length() <= _MAX_INT_BITS else "[TRUNCATED:int]"
    if isinstance(key, float):
        return json.dumps(key)
    return f"[UNSUPPORTED:{type(key).__name__}]"


class _Walk:
    """What one ``arguments`` call accumulates besides the copy."""

    __slots__ = ("bound", "n", "wide")

    def __init__(self) -> None:
        self.n = 0  # redactions
        # An upper bound on the size of the copy as canonical JSON, so that the copy is serialised only
        # when it might be too large: a UTF-8 character or a JSON escape is at most 6 bytes, a scalar
        # and its punctuation (float repr, true, null) at most 32.
        self.bound = 2
        self.wide = False  # some string is not ASCII (and so might hold a lone surrogate)


class Redactor:
    """Applies ``RedactSettings`` to tool-call arguments and to free text such as upstream errors."""

    def __init__(self, settings: RedactSettings) -> None:
        self._detectors = detectors = Detectors(settings)
        # Path globs are matched whatever the case of the key.
        self._paths = (
            re.compile("|".join(glob_to_regex(p) for p in settings.paths), re.IGNORECASE | re.DOTALL)
            if settings.paths
            else None
        )
        # Key names and paths repeat from call to call: both lookups are cached (bounded).
        self._path_cache: dict[str, bool] = {}
        self._key_cache: dict[str, tuple[str, int]] = {}
        self._cards = detectors.cards
        self._max_bytes = settings.max_bytes
        self._max_string = settings.max_string
        self._window = settings.max_string + _SCAN_MARGIN
        self._min_len = detectors.min_len

    def arguments(self, args: Mapping[str, Any] | None) -> RedactedArgs:
        """A redacted copy of ``args``, or a size-and-keys summary when that copy exceeds ``max_bytes``."""
        if args is None:
            return RedactedArgs(None, 0, False)
        walk = _Walk()
        value = self._walk(args, "", 0, walk)
        if walk.bound <= self._max_bytes and not walk.wide:
            return RedactedArgs(value, walk.n, False)
        data = _canonical(value)
        try:
            size = len(data) if data.isascii() else len(data.encode())
        except UnicodeEncodeError:  # lone surrogates ("\ud800" is valid JSON): no store accepts them
            value = _replace_surrogates(value)
            size = len(_canonical(value).encode())
        if size <= self._max_bytes:
            return RedactedArgs(value, walk.n, False)
        keys: list[JSONValue] = (
            [k[:_SUMMARY_KEY_CHARS] for k in list(value)[:SUMMARY_KEYS]] if isinstance(value, dict) else []
        )
        return RedactedArgs({"_truncated": True, "bytes": size, "keys": keys}, walk.n, True)

    def text(self, value: str) -> str:
        """Free text such as an upstream error message: detectors and patterns applied, cut to max_string."""
        return self._text(value)[0]

    # --- internals ----------------------------------------------------------------------------------

    def _text(self, s: str) -> tuple[str, int]:
        size = len(s)
        if size < self._min_len:
            return (s, 0) if size <= self._max_string else (self._cut(s, 0), 0)
        text = s if size <= self._window else s[: self._window].rstrip(_TOKEN_CHARS)
        unscanned = size - len(text)
        text, count = self._detectors.scan(text)
        if unscanned or len(text) > self._max_string:
            text = self._cut(text, unscanned)
        return text, count

    def _cut(self, text: str, unscanned: int) -> str:
        kept = text[: self._max_string]
        return f"{kept}…[+{len(text) - len(kept) + unscanned} chars]"

    def _path_hit(self, name: str) -> bool:
        assert self._paths is not None
        hit = self._path_cache.get(name)
        if hit is None:
            hit = self._paths.fullmatch(name) is not None
            if len(name) <= 256:
                if len(self._path_cache) >= _CACHE_MAX:
                    self._path_cache.clear()
                self._path_cache[name] = hit
        return hit

    def _key(self, name: str) -> tuple[str, int]:
        shown = self._key_cache.get(name)
        if shown is None:
            shown = self._text(name)
            if len(name) <= 256:
                if len(self._key_cache) >= _CACHE_MAX:
                    self._key_cache.clear()
                self._key_cache[name] = shown
        return shown

    def _int(self, value: int, walk: _Walk) -> JSONValue:
        # Agents send card numbers as JSON numbers too.
        if self._cards and 10**12 <= value < 10**19 and is_card_number(str(value)):
            walk.n += 1
            return "[REDACTED:card]"
        bits = value.bit_length()
        if bits > _MAX_INT_BITS:
            return "[TRUNCATED:int]"
        walk.bound += bits // 3  # more than enough digits
        return int(value)

    def _walk(self, value: object, path: str, depth: int, walk: _Walk) -> JSONValue:
        walk.bound += 32
        if isinstance(value, str):
            text, n = self._text(value)
            walk.n += n
            walk.bound += 6 * len(text)
            if not text.isascii():
                walk.wide = True
            return text
        if value is None or isinstance(value, bool | float):
            if isinstance(value, float) and not math.isfinite(value):
                return json.dumps(value)  # NaN and Infinity are not JSON; the store would refuse them
            return value
        if isinstance(value, int):
            return self._int(value, walk)
        if isinstance(value, dict | Mapping):
            if depth >= MAX_DEPTH:
                return DEPTH_MARKER
            return self._mapping(cast(Mapping[object, object], value), path, depth, walk)
        if isinstance(value, list | tuple):
            if depth >= MAX_DEPTH:
                return DEPTH_MARKER
            items = cast(list[object] | tuple[object, ...], value)
            item_path = f"{path}.[]" if path else "[]"
            if self._paths is not None and len(item_path) <= _MAX_PATH and self._path_hit(item_path):
                walk.n += len(items)
                walk.bound += 32 * len(items)
                markers: list[JSONValue] = [PATH_MARKER] * len(items)
                return markers
            return [self._walk(item, item_path, depth + 1, walk) for item in items]
        return f"[UNSUPPORTED:{type(value).__name__}]"

    def _mapping(self, value: Mapping[object, object], path: str, depth: int, walk: _Walk) -> JSONValue:
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            name = _key_name(key)
            child = f"{path}.{name}" if path else name
            if self._paths is not None and (
                self._path_hit(name) or (path and len(child) <= _MAX_PATH and self._path_hit(child))
            ):
                shown: JSONValue = PATH_MARKER
                walk.n += 1
                walk.bound += 32
            else:
                shown = self._walk(item, child, depth + 1, walk)
            # Path rules look at the name as sent, but an email address or a key used as a key is still
            # one, so keys are redacted too; two keys that redact alike are kept apart.
            out_key, n = self._key(name)
            walk.n += n
            walk.bound += 6 * len(out_key) + 32
            if not out_key.isascii():
                walk.wide = True
            if out_key in out:
                base, i = out_key, 2
                while f"{base}~{i}" in out:
                    i += 1
                out_key = f"{base}~{i}"
                walk.bound += 32
            out[out_key] = shown
        return out


def _canonical(value: JSONValue) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _replace_surrogates(value: JSONValue) -> JSONValue:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {cast(str, _replace_surrogates(k)): _replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    return value
