"""Redaction of tool-call arguments and free text before anything reaches the audit log.

Two kinds of rule (``RedactSettings``): *path rules* replace the whole value under a matching key, and
*value detectors* replace only the matching part of a string. Everything is compiled once per
``Redactor``. Each detector runs as its own pass, gated by substrings that any match must contain, so
the common string (no digits, no ``@``, no key-shaped prefix) costs a few ``in`` tests; separate passes
also mean that a match can never swallow the start of a secret another detector would have caught.

This module never logs: whatever it sees may be a secret.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from arbiter.settings import REDACT_DETECTORS, RedactSettings

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"

MAX_DEPTH = 32
PATH_MARKER = "[REDACTED:path]"
DEPTH_MARKER = "[TRUNCATED:depth]"
SUMMARY_KEYS = 50
# A string is scanned this far past max_string and no further, so a hostile 1 MiB string costs what a
# 18 KiB one does; only scanned text is ever kept.
_SCAN_MARGIN = 16 * 1024
# The shortest text any built-in detector can match ("a@b.cd").
_MIN_MATCH = 6
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

_RUN = r"A-Za-z0-9_\-"  # base64url and identifier characters: what tokens are made of
_NOT_MARKER = r"(?!\[REDACTED:)"  # an assignment whose value an earlier pass already redacted


@dataclass(frozen=True, slots=True)
class RedactedArgs:
    """Arguments as the audit log may store them."""

    # JSON-compatible (a ``JSONValue``); a new structure, the caller's objects are never mutated. None when
    # args is None.
    value: Any
    redactions: int  # values and matches replaced
    truncated: bool  # the redacted arguments exceeded max_bytes and ``value`` is a summary


Replace = Callable[[re.Match[str], str], "tuple[str, int]"]


class _Pass:
    """One regular expression of one detector, with the substrings a match cannot do without."""

    __slots__ = ("lower", "marker", "name", "regex", "replace", "triggers")

    def __init__(
        self,
        name: str,
        regex: re.Pattern[str],
        triggers: tuple[str, ...] = (),
        *,
        lower: bool = False,
        replace: Replace | None = None,
    ) -> None:
        self.name = name
        self.regex = regex
        self.triggers = triggers  # empty: always run
        self.lower = lower  # triggers are looked up in the lowercased text
        self.marker = f"[REDACTED:{name}]"
        # A pattern with a "keep" group redacts only what follows it (the value, not "password=").
        self.replace = replace or (_keep_replace if "keep" in regex.groupindex else _plain_replace)

    def apply(self, text: str) -> tuple[str, int]:
        first = self.regex.search(text)
        if first is None:
            return text, 0
        parts: list[str] = []
        last = count = 0
        for m in self.regex.finditer(text, first.start()):
            if m.end() == m.start():  # an operator's pattern that can match nothing
                continue
            replacement, n = self.replace(m, self.marker)
            if n:
                parts.append(text[last : m.start()])
                parts.append(replacement)
                last = m.end()
                count += n
        if not count:
            return text, 0
        parts.append(text[last:])
        return "".join(parts), count


def _plain_replace(m: re.Match[str], marker: str) -> tuple[str, int]:
    return marker, 1


def _keep_replace(m: re.Match[str], marker: str) -> tuple[str, int]:
    return m.group("keep") + marker, 1


# --- checks that regular expressions cannot do ------------------------------------------------------

_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLED[d] if i & 1 else d
    return total % 10 == 0


def is_card_number(digits: str) -> bool:
    """13-19 digits, Luhn-valid, starting 2-6.

    Every payment network's numbers start with 2-6 (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4, Discover
    and UnionPay 6); requiring it spares millisecond and nanosecond timestamps (which start with 1), a
    tenth of which would pass Luhn.
    """
    return (
        13 <= len(digits) <= 19
        and digits.isascii()
        and digits.isdigit()
        and digits[0] in "23456"
        and _luhn(digits)
    )


_DIGIT_GROUP = re.compile(r"[0-9]+")


def _replace_cards(m: re.Match[str], marker: str) -> tuple[str, int]:
    # The candidate is a run of digit groups ("call 555 1234 4111 1111 1111 1111"): a card is a few
    # consecutive groups, each of at least 3 digits (as cards are printed), or one group of 13-19.
    text = m.group()
    if text.isdigit():
        return (marker, 1) if is_card_number(text) else (text, 0)
    groups = [(g.start(), g.end()) for g in _DIGIT_GROUP.finditer(text)]
    parts: list[str] = []
    last = count = i = 0
    while i < len(groups):
        hit = -1
        for j in range(min(i + 4, len(groups) - 1), i - 1, -1):
            span = groups[i : j + 1]
            if j > i and any(end - start < 3 for start, end in span):
                continue
            digits = "".join(text[start:end] for start, end in span)
            if is_card_number(digits):
                hit = j
                break
        if hit < 0:
            i += 1
            continue
        parts.append(text[last : groups[i][0]])
        parts.append(marker)
        last = groups[hit][1]
        count += 1
        i = hit + 1
    if not count:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), count


def _iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _replace_iban(m: re.Match[str], marker: str) -> tuple[str, int]:
    # The pattern may run on into a following word ("… 0130 00 EUR"): try shorter cuts at the spaces.
    text = m.group()
    for end in [len(text), *(i for i in range(len(text) - 1, 0, -1) if text[i] == " ")]:
        if _iban_valid(text[:end].replace(" ", "")):
            return marker + text[end:], 1
    return text, 0


# --- the built-in detectors -------------------------------------------------------------------------
# Every pattern either ends at a delimiter or runs to the end of the token it is in, so no match can
# end inside (and so hide the start of) a secret that a later pass would have recognised. An unbounded
# repeat starts at a literal, or at the start of a token (a lookbehind), never at every position of a
# long run: each pass stays linear in the text, whatever an agent sends.


def _c(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


_PASSES: tuple[_Pass, ...] = (
    # PEM private keys, up to their END line; an unterminated block (a key cut off by whoever sent it)
    # is redacted to the end of the text.
    _Pass(
        "private_key",
        _c(
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:.*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|.*)",
            re.DOTALL,
        ),
        ("PRIVATE KEY",),
    ),
    # A token containing "eyJ" (base64 of '{"', how every JWT header starts) followed by two or more
    # dot-separated segments: JWS (signature may be empty for alg "none") and JWE (five segments). It is
    # matched from the start of its token, whatever is glued before "eyJ", and the atomic group looks
    # for "eyJ" once per token: "eyJeyJeyJ…" costs one scan, not one per occurrence.
    _Pass(
        "jwt",
        _c(rf"(?<![{_RUN}])(?>[{_RUN}]*?eyJ)[{_RUN}]*+\.[{_RUN}]++\.[{_RUN}]*+(?:\.[{_RUN}]*+)*+"),
        ("eyJ",),
    ),
    # Authorization-header values. The token must look like one (a digit or symbol, or 20+ letters) so
    # that prose such as "basic information" survives.
    _Pass(
        "bearer",
        _c(
            r"\b(?i:bearer|basic)[ \t]+(?=[A-Za-z0-9._~+/=-]{8})"
            r"(?=[A-Za-z0-9._~+/-]*[0-9_~+/=]|[A-Za-z]{20})[A-Za-z0-9._~+/-]+=*"
        ),
        ("bearer", "basic"),
        lower=True,
    ),
    # Credentials in URLs (scheme://user:password@host): the password only.
    _Pass(
        "url_password",
        _c(
            rf"(?P<keep>[A-Za-z][A-Za-z0-9+.-]{{0,30}}://[^\s:/?#@\[\]]{{0,256}}:)"
            rf"{_NOT_MARKER}[^\s/?#]{{1,256}}(?=@)"  # up to the last "@": "p@ss" is one password
        ),
        ("://",),
    ),
    # Key shapes: Arbiter's own (arb_<16-char id>_<secret>), OpenAI/Anthropic (sk-…, with a digit), Stripe
    # (sk_live_, rk_test_, whsec_), AWS access key ids, GitHub, Slack, Google. "sk" must start its token,
    # or "task-management-…" would be a key.
    _Pass(
        "api_key",
        _c(
            rf"arb_[A-Za-z0-9]{{16}}_[{_RUN}]{{8,}}"
            rf"|(?<![{_RUN}])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{{10,}}[{_RUN}]*+"
            rf"|(?<![{_RUN}])sk-(?=[{_RUN}]*?[0-9])[{_RUN}]{{20,}}"
            rf"|(?:AKIA|ASIA)[A-Z0-9]{{16}}[{_RUN}]*+"
            rf"|gh[pousr]_[A-Za-z0-9]{{30,}}[{_RUN}]*+"
            rf"|github_pat_[A-Za-z0-9_]{{20,}}[{_RUN}]*+"
            rf"|xox[abeposr]-[A-Za-z0-9-]{{10,}}[{_RUN}]*+"
            rf"|AIza[{_RUN}]{{35,}}"
            rf"|whsec_[A-Za-z0-9]{{20,}}[{_RUN}]*+"
        ),
        (
            *("arb_", "sk-", "sk_", "rk_", "whsec_", "AKIA", "ASIA", "AIza", "xox"),
            *("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        ),
    ),
    # ... and any value assigned to something called an API key ("X-Api-Key: …", "api_key=…").
    _Pass(
        "api_key",
        _c(rf"(?P<keep>(?i:api[_-]?key)[\"']?[ \t]*[:=][ \t]*[\"']?){_NOT_MARKER}[^\s\"',;&]{{3,}}"),
        ("api",),
        lower=True,
    ),
    # Values assigned to passwords, secrets and tokens in free text ("password=…", "client_secret: …",
    # "access_token=…"); "max_tokens=5" does not match, as "tokens" is not followed by the assignment.
    _Pass(
        "credential",
        _c(
            r"(?P<keep>(?i:password|passwd|passphrase|secret|token)[\"']?[ \t]*[:=][ \t]*[\"']?)"
            rf"{_NOT_MARKER}[^\s\"',;&]{{3,}}"
        ),
        ("password", "passwd", "passphrase", "secret", "token"),
        lower=True,
    ),
    _Pass(
        "email",
        _c(
            r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,63}"
            rf"[{_RUN}]*+"
        ),
        ("@",),
    ),
    # US social security numbers with dashes; area 000, 666 and 9xx, group 00 and serial 0000 are never
    # issued.
    _Pass(
        "ssn",
        _c(r"(?<![0-9-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9-])"),
        ("-",),
    ),
    # Digit groups holding 13+ digits; _replace_cards finds the card numbers among them. No lookbehind:
    # the leftmost match already starts at the first digit of its run.
    _Pass("card", _c(r"[0-9](?:[ -]?[0-9]){12,}"), replace=_replace_cards),
    _Pass(
        "iban",
        _c(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"),
        replace=_replace_iban,
    ),
)

assert {p.name for p in _PASSES} == set(REDACT_DETECTORS), "settings.REDACT_DETECTORS is out of step"


def _glob(pattern: str) -> str:
    # fnmatch without character classes: "[]" means a list item here, not an empty class.
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


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
        unknown = sorted(set(settings.detectors) - set(REDACT_DETECTORS))
        if unknown:
            raise ValueError(f"unknown redaction detector(s) {unknown}; known: {sorted(REDACT_DETECTORS)}")
        enabled = set(settings.detectors)
        self._passes = tuple(p for p in _PASSES if p.name in enabled)
        custom: list[_Pass] = []
        for name, pattern in settings.patterns.items():
            try:
                custom.append(_Pass(name, re.compile(pattern)))
            except re.error as exc:
                raise ValueError(
                    f"redaction pattern {name!r} is not a valid regular expression: {exc}"
                ) from None
        # Operators' patterns run last, so that they cannot break up a secret a built-in would catch.
        self._passes += tuple(custom)
        self._paths = (
            re.compile("|".join(_glob(p) for p in settings.paths), re.IGNORECASE | re.DOTALL)
            if settings.paths
            else None
        )
        # Key names and paths repeat from call to call: both lookups are cached (bounded).
        self._path_cache: dict[str, bool] = {}
        self._key_cache: dict[str, tuple[str, int]] = {}
        self._cards = "card" in enabled
        self._max_bytes = settings.max_bytes
        self._max_string = settings.max_string
        self._window = settings.max_string + _SCAN_MARGIN
        # An operator's pattern may match a single character; the built-ins need at least _MIN_MATCH.
        self._min_len = 1 if custom else _MIN_MATCH

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
        count = 0
        lowered: str | None = None
        for p in self._passes:
            if p.triggers:
                if p.lower:
                    if lowered is None:
                        lowered = text.lower()
                    hay = lowered
                else:
                    hay = text
                for trigger in p.triggers:
                    if trigger in hay:
                        break
                else:
                    continue
            text, n = p.apply(text)
            if n:
                count += n
                lowered = None
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
