"""The value detectors redaction applies to every string: secrets (private keys, JWTs, bearer tokens,
URL passwords, API keys, assigned credentials) and personal data (emails, SSNs, card numbers, IBANs),
plus operators' own patterns (``RedactSettings.patterns``). ``arbiter.audit.redact`` walks the
structures and applies them.

Each detector runs as its own pass, gated by substrings that any match must contain, so the common
string (no digits, no ``@``, no key-shaped prefix) costs a few ``in`` tests; separate passes also mean
that a match can never swallow the start of a secret another detector would have caught.

This module never logs: whatever it sees may be a secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from arbiter.settings import REDACT_DETECTORS, RedactSettings

# The shortest text any built-in detector can match ("a@b.cd").
MIN_MATCH = 6

_RUN = r"A-Za-z0-9_\-"  # base64url and identifier characters: what tokens are made of
_NOT_MARKER = r"(?!\[REDACTED:)"  # an assignment whose value an earlier pass already redacted

Replace = Callable[[re.Match[str], str], "tuple[str, int]"]


class Pass:
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


PASSES: tuple[Pass, ...] = (
    # PEM private keys, up to their END line; an unterminated block (a key cut off by whoever sent it)
    # is redacted to the end of the text.
    Pass(
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
    Pass(
        "jwt",
        _c(rf"(?<![{_RUN}])(?>[{_RUN}]*?eyJ)[{_RUN}]*+\.[{_RUN}]++\.[{_RUN}]*+(?:\.[{_RUN}]*+)*+"),
        ("eyJ",),
    ),
    # Authorization-header values. The token must look like one (a digit or symbol, or 20+ letters) so
    # that prose such as "basic information" survives.
    Pass(
        "bearer",
        _c(
            r"\b(?i:bearer|basic)[ \t]+(?=[A-Za-z0-9._~+/=-]{8})"
            r"(?=[A-Za-z0-9._~+/-]*[0-9_~+/=]|[A-Za-z]{20})[A-Za-z0-9._~+/-]+=*"
        ),
        ("bearer", "basic"),
        lower=True,
    ),
    # Credentials in URLs (scheme://user:password@host): the password only.
    Pass(
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
    Pass(
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
    Pass(
        "api_key",
        _c(rf"(?P<keep>(?i:api[_-]?key)[\"']?[ \t]*[:=][ \t]*[\"']?){_NOT_MARKER}[^\s\"',;&]{{3,}}"),
        ("api",),
        lower=True,
    ),
    # Values assigned to passwords, secrets and tokens in free text ("password=…", "client_secret: …",
    # "access_token=…"); "max_tokens=5" does not match, as "tokens" is not followed by the assignment.
    Pass(
        "credential",
        _c(
            r"(?P<keep>(?i:password|passwd|passphrase|secret|token)[\"']?[ \t]*[:=][ \t]*[\"']?)"
            rf"{_NOT_MARKER}[^\s\"',;&]{{3,}}"
        ),
        ("password", "passwd", "passphrase", "secret", "token"),
        lower=True,
    ),
    Pass(
        "email",
        _c(
            r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,63}"
            rf"[{_RUN}]*+"
        ),
        ("@",),
    ),
    # US social security numbers with dashes; area 000, 666 and 9xx, group 00 and serial 0000 are never
    # issued.
    Pass(
        "ssn",
        _c(r"(?<![0-9-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9-])"),
        ("-",),
    ),
    # Digit groups holding 13+ digits; _replace_cards finds the card numbers among them. No lookbehind:
    # the leftmost match already starts at the first digit of its run.
    Pass("card", _c(r"[0-9](?:[ -]?[0-9]){12,}"), replace=_replace_cards),
    Pass(
        "iban",
        _c(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"),
        replace=_replace_iban,
    ),
)

assert {p.name for p in PASSES} == set(REDACT_DETECTORS), "settings.REDACT_DETECTORS is out of step"


class Detectors:
    """The enabled built-in detectors, then the operator's patterns, compiled once."""

    __slots__ = ("cards", "min_len", "passes")

    def __init__(self, settings: RedactSettings) -> None:
        unknown = sorted(set(settings.detectors) - set(REDACT_DETECTORS))
        if unknown:
            raise ValueError(f"unknown redaction detector(s) {unknown}; known: {sorted(REDACT_DETECTORS)}")
        enabled = set(settings.detectors)
        custom: list[Pass] = []
        for name, pattern in settings.patterns.items():
            try:
                custom.append(Pass(name, re.compile(pattern)))
            except re.error as exc:
                raise ValueError(
                    f"redaction pattern {name!r} is not a valid regular expression: {exc}"
                ) from None
        # Operators' patterns run last, so that they cannot break up a secret a built-in would catch.
        self.passes = tuple(p for p in PASSES if p.name in enabled) + tuple(custom)
        self.cards = "card" in enabled  # integers are checked for card numbers too
        # An operator's pattern may match a single character; the built-ins need at least MIN_MATCH.
        self.min_len = 1 if custom else MIN_MATCH

    def scan(self, text: str, found: dict[str, int] | None = None) -> tuple[str, int]:
        """``text`` with every match replaced by its marker, and how many were (per detector, added to
        ``found`` when given: the argument and result guards say which detector found what)."""
        count = 0
        lowered: str | None = None
        for p in self.passes:
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
                if found is not None:
                    found[p.name] = found.get(p.name, 0) + n
        return text, count
