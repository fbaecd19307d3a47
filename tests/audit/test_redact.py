"""Redaction before the audit log: path rules, value detectors, size and depth limits, hostile input."""

from __future__ import annotations

import base64
import copy
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from arbiter.audit.redact import DEPTH_MARKER, MAX_DEPTH, PATH_MARKER, Redactor
from arbiter.auth.apikeys import new_key
from arbiter.settings import REDACT_DETECTORS, RedactSettings

ARB_KEY = "arb_0123456789abcdef_Zq8vXk2mP4rT7wY1nB5cD9fG3hJ6kL0sQ-uE_aI4oU8"
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MmRqU8bA4u+Y5F1z\n"
    "q3GXNvEWxSjZ7vX+9KmL4aR2WQbdkQ0c5n3M8YbJ1vHiU9gT6kPzXwq1b4s7N2hA\n"
    "-----END RSA PRIVATE KEY-----"
)


def _redactor(**overrides: Any) -> Redactor:
    return Redactor(RedactSettings(**overrides))


def _luhn_ok(number: str) -> bool:
    # Independent of the module's implementation, so that the two can disagree.
    digits = [int(c) for c in number][::-1]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


# --- value detectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"the token {JWT} expired", "the token [REDACTED:jwt] expired"),
        (f'{{"id_token":"{JWT}"}}', '{"id_token":"[REDACTED:jwt]"}'),
        ("unsigned eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0. ok", "unsigned [REDACTED:jwt] ok"),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer [REDACTED:jwt]"),
        ("Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543", "Authorization: [REDACTED:bearer]"),
        ("authorization: basic dXNlcjpwYXNzd29yZA==", "authorization: [REDACTED:bearer]"),
        ("BEARER abcdefghijklmnopqrstuvwxyz", "[REDACTED:bearer]"),
        (f"use {ARB_KEY} for the demo", "use [REDACTED:api_key] for the demo"),
        ("key sk-proj-4f9Qx2LmN8vR1tY6wZ3aB7cD0eF5 here", "key [REDACTED:api_key] here"),
        ("stripe sk_live_51HxYzAbCdEfGhIjKlMnOp", "stripe [REDACTED:api_key]"),
        ("restricted rk_test_4eC39HqLyjWDarjtT1zdp7dc", "restricted [REDACTED:api_key]"),
        ("aws AKIAIOSFODNN7EXAMPLE,", "aws [REDACTED:api_key],"),
        ("aws ASIAY34FZKBOKMUTVV7A.", "aws [REDACTED:api_key]."),
        ("gh ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "gh [REDACTED:api_key]"),
        ("gh github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv", "gh [REDACTED:api_key]"),
        ("slack xoxb-123456789012-1234567890123-AbCdEfGhIjKl", "slack [REDACTED:api_key]"),
        ("google AIzaSyA-1234567890abcdefghijklmnopqrstu ok", "google [REDACTED:api_key] ok"),
        ("X-Api-Key: 7f3c9a1e", "X-Api-Key: [REDACTED:api_key]"),
        ("api_key='abc123xyz'", "api_key='[REDACTED:api_key]'"),
        (f"key:\n{PEM}\nend", "key:\n[REDACTED:private_key]\nend"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
            "[REDACTED:private_key]",
        ),
        ("cut off: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg", "cut off: [REDACTED:private_key]"),
        ("card 4111 1111 1111 1111 exp 12/29", "card [REDACTED:card] exp 12/29"),
        ("card 4111-1111-1111-1111", "card [REDACTED:card]"),
        ("amex 378282246310005.", "amex [REDACTED:card]."),
        ("visa13 4222222222222", "visa13 [REDACTED:card]"),
        ("mc:5555555555554444", "mc:[REDACTED:card]"),
        ("call 555 1234 4111 1111 1111 1111", "call 555 1234 [REDACTED:card]"),
        ("mail jane.doe+crm@mail.example.co.uk now", "mail [REDACTED:email] now"),
        ("postgres://app:s3cr3t@db:5432/crm down", "postgres://app:[REDACTED:url_password]@db:5432/crm down"),
        ("https://u:p%40ss@host/x", "https://u:[REDACTED:url_password]@host/x"),
        ("password=hunter22 max_tokens=5", "password=[REDACTED:credential] max_tokens=5"),
        ('client_secret: "abc-123-def"', 'client_secret: "[REDACTED:credential]"'),
        ("refresh_token=1//0gAbCdEf", "refresh_token=[REDACTED:credential]"),
    ],
)
def test_default_detectors_redact_the_secret_and_keep_the_rest(text: str, expected: str) -> None:
    assert _redactor().text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no secrets here, just a sentence about refunds",
        "eyJhbGciOiJIUzI1NiJ9 alone, or eyJhbGciOiJIUzI1NiJ9.only-two",
        "archive.tar.gz and a.b.c",
        "the bearer of this letter; basic information; Basic authentication required",
        "arb_short_key and arb_0123456789abcdef_short",
        "task-management-system-overview and sk-learn-compatible-models",
        "AKIA is a prefix, AKIAshort",
        "4111111111111112",  # fails Luhn
        "4111 1111 1111 1112",
        "order 1234567890123456",  # 16 digits, fails Luhn
        "at 1718000000000007 ms",  # starts with 1: no card network
        "dates 2024-05-01 2024-06-01 and phone +1 415-555-0123",
        "user@localhost and a@b and @handle",
        "https://example.com/path?q=1 and https://host:8443/",
        "max_tokens=500, tokens: 500, password_policy: strict, token_count=3",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
        "DE89 3704 0044 0532 0130 00 and 123-45-6789",  # iban and ssn are off by default
    ],
)
def test_default_detectors_leave_look_alikes(text: str) -> None:
    assert _redactor().text(text) == text


def test_luhn_is_what_decides_for_16_digit_numbers() -> None:
    redactor = _redactor()
    valid = [n for n in (f"45390000000000{i:02d}" for i in range(100)) if _luhn_ok(n)]
    invalid = [n for n in (f"45390000000000{i:02d}" for i in range(100)) if not _luhn_ok(n)]
    assert len(valid) == 10 and len(invalid) == 90
    for number in valid:
        assert redactor.text(f"n={number}") == "n=[REDACTED:card]"
    for number in invalid:
        assert redactor.text(f"n={number}") == f"n={number}"


def test_card_numbers_sent_as_json_numbers() -> None:
    timestamp_ms = next(n for n in range(1718000000000, 1718000000100) if _luhn_ok(str(n)))
    result = _redactor().arguments(
        {"pan": 4111111111111111, "not_a_card": 4111111111111112, "ts": timestamp_ms, "qty": 3}
    )
    assert result.value == {
        "pan": "[REDACTED:card]",
        "not_a_card": 4111111111111112,
        "ts": timestamp_ms,  # Luhn-valid, but millisecond timestamps start with 1
        "qty": 3,
    }
    assert result.redactions == 1


def test_card_detector_off_leaves_numbers() -> None:
    redactor = _redactor(detectors=["jwt"])
    assert redactor.arguments({"pan": 4111111111111111}).value == {"pan": 4111111111111111}
    assert redactor.text("4111 1111 1111 1111") == "4111 1111 1111 1111"


def test_iban_and_ssn_when_enabled() -> None:
    redactor = _redactor(detectors=["iban", "ssn"])
    assert redactor.text("pay DE89 3704 0044 0532 0130 00 EUR") == "pay [REDACTED:iban] EUR"
    assert redactor.text("pay GB82WEST12345698765432.") == "pay [REDACTED:iban]."
    assert redactor.text("bad DE89 3704 0044 0532 0130 01") == "bad DE89 3704 0044 0532 0130 01"
    assert redactor.text("ssn 123-45-6789;") == "ssn [REDACTED:ssn];"
    for never_issued in ("000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000"):
        assert redactor.text(f"x {never_issued}") == f"x {never_issued}"
    assert redactor.text("part 123-45-67890") == "part 123-45-67890"


def test_a_real_arbiter_key_is_redacted_in_text_and_arguments() -> None:
    _, secret, full = new_key()
    redactor = _redactor()
    assert secret not in redactor.text(f"retry with {full}, please")
    out = json.dumps(redactor.arguments({"note": f"key={full}", "list": [full]}).value)
    assert secret not in out and "arb_" not in out


def test_email_detector_can_be_turned_off() -> None:
    assert _redactor(detectors=["jwt", "card"]).text("jane@example.com") == "jane@example.com"


# --- custom patterns, configuration -----------------------------------------------------------------


def test_custom_patterns_are_applied_with_their_name() -> None:
    redactor = _redactor(patterns={"employee-id": r"EMP-\d{6}", "pin": r"(?i)pin[: ]+\d{4}"})
    assert redactor.text("EMP-123456 reset PIN: 1234") == "[REDACTED:employee-id] reset [REDACTED:pin]"
    result = redactor.arguments({"who": "EMP-654321", "n": "EMP-12"})
    assert result.value == {"who": "[REDACTED:employee-id]", "n": "EMP-12"}
    assert result.redactions == 1


def test_custom_pattern_that_can_match_nothing_changes_nothing() -> None:
    redactor = _redactor(patterns={"zs": r"z*"})
    assert redactor.text("abc") == "abc"
    assert redactor.text("a zz b") == "a [REDACTED:zs] b"


def test_custom_patterns_run_after_the_built_ins() -> None:
    # An operator's pattern that would cut a key in half must not leave half of it behind.
    redactor = _redactor(patterns={"hexid": r"[0-9a-f]{16}"})
    assert redactor.text(ARB_KEY) == "[REDACTED:api_key]"


def test_unknown_detector_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown detector"):
        RedactSettings(detectors=["jwt", "credit_card"])
    with pytest.raises(ValueError, match="credit_card"):
        Redactor(RedactSettings.model_construct(detectors=["credit_card"], patterns={}, paths=[]))


def test_invalid_custom_pattern_is_rejected() -> None:
    with pytest.raises(ValidationError):
        RedactSettings(patterns={"bad": "("})
    with pytest.raises(ValueError, match="bad"):
        Redactor(RedactSettings.model_construct(detectors=[], patterns={"bad": "("}, paths=[]))


@pytest.mark.parametrize("name", REDACT_DETECTORS)
def test_every_known_detector_can_be_enabled_alone(name: str) -> None:
    Redactor(RedactSettings(detectors=[name]))


# --- path rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "token", "access_token", "refresh_token", "id_token", "auth_token", "csrf_token", "accessToken",
        "X-Auth-Token", "x-api-key", "api_key", "apiKey", "OPENAI_API_KEY", "password", "db_password",
        "Passwd", "client_secret", "secret", "private_key", "privateKey", "authorization",
        "Proxy-Authorization", "cookie", "Set-Cookie", "session", "session_id", "sessionId", "ssn",
        "customer_ssn", "credentials", "auth", "cvv", "otp", "dsn", "connection_string",
    ],
)  # fmt: skip
def test_default_paths_redact_credential_keys(key: str) -> None:
    result = _redactor().arguments({key: "v4lue", "query": "q"})
    assert result.value == {key: PATH_MARKER, "query": "q"}
    assert result.redactions == 1


@pytest.mark.parametrize(
    "key",
    ["max_tokens", "token_count", "tokens", "max_output_tokens", "query", "author", "session_count",
     "sessions", "limit", "locale", "tokenizer"],
)  # fmt: skip
def test_default_paths_leave_ordinary_keys(key: str) -> None:
    assert _redactor().arguments({key: 1024}).value == {key: 1024}


def test_path_rule_replaces_whole_values_at_any_depth() -> None:
    args = {
        "config": {"db": {"Password": {"plain": "x", "rotated": ["y"]}, "host": "db"}},
        "users": [{"name": "ann", "auth": {"user": "ann", "pass": "p"}}],
        "max_tokens": 256,
    }
    result = _redactor().arguments(args)
    assert result.value == {
        "config": {"db": {"Password": PATH_MARKER, "host": "db"}},
        "users": [{"name": "ann", "auth": PATH_MARKER}],
        "max_tokens": 256,
    }
    assert result.redactions == 2


def test_dotted_and_list_paths() -> None:
    redactor = _redactor(paths=["users.[].ssn", "payment.card.*", "tags.[]", "*.internal_note"])
    args = {
        "users": [{"ssn": "078-05-1120", "name": "ann"}, {"SSN": 1, "name": "bob"}],
        "ssn": "kept: the rule names users.[].ssn only",
        "payment": {"card": {"number": "x", "exp": "y"}, "amount": 5},
        "tags": ["a", "b", "c"],
        "ticket": {"internal_note": "n", "title": "t"},
    }
    result = redactor.arguments(args)
    assert result.value == {
        "users": [{"ssn": PATH_MARKER, "name": "ann"}, {"SSN": PATH_MARKER, "name": "bob"}],
        "ssn": "kept: the rule names users.[].ssn only",
        "payment": {"card": {"number": PATH_MARKER, "exp": PATH_MARKER}, "amount": 5},
        "tags": [PATH_MARKER, PATH_MARKER, PATH_MARKER],
        "ticket": {"internal_note": PATH_MARKER, "title": "t"},
    }
    assert result.redactions == 2 + 2 + 3 + 1


def test_no_paths_means_no_path_rules() -> None:
    assert _redactor(paths=[]).arguments({"password": "hunter2"}).value == {"password": "hunter2"}


# --- shape, size, depth, robustness ------------------------------------------------------------------


def test_none_arguments() -> None:
    result = _redactor().arguments(None)
    assert (result.value, result.redactions, result.truncated) == (None, 0, False)


def test_callers_arguments_are_not_mutated_or_shared() -> None:
    args: dict[str, Any] = {
        "password": "p",
        "nested": {"list": [{"email": "a@example.com"}, [JWT]], "n": 1},
        "tuple": ("x", ARB_KEY),
    }
    before = copy.deepcopy(args)
    result = _redactor().arguments(args)
    assert args == before
    assert result.value["nested"] is not args["nested"]
    assert result.value["nested"]["list"] is not args["nested"]["list"]
    assert result.value["tuple"] == ["x", "[REDACTED:api_key]"]


def test_long_strings_are_cut_after_redaction() -> None:
    redactor = _redactor(max_string=20)
    text = f"{JWT} " + "x" * 100
    out = redactor.text(text)
    assert out == "[REDACTED:jwt] xxxxx…[+95 chars]"
    assert redactor.arguments({"q": "y" * 25}).value == {"q": "y" * 20 + "…[+5 chars]"}


def test_huge_string_is_scanned_only_near_what_is_kept() -> None:
    redactor = _redactor()
    text = "a@example.com " + "zzz " * 500_000 + f" {ARB_KEY}"
    start = time.perf_counter()
    out = redactor.text(text)
    assert time.perf_counter() - start < 1.0
    assert out.startswith("[REDACTED:email] zzz")
    assert out.endswith(" chars]") and len(out) < 2100
    assert "arb_" not in out


def test_token_cut_by_the_scan_window_is_dropped_not_kept_in_part() -> None:
    redactor = _redactor(max_string=100)
    window = 100 + 16 * 1024
    # A large JWT shrinks to a marker, which brings whatever follows it into the kept 100 characters: a
    # key straddling the end of the scanned window must not be kept in part there.
    big_jwt = "eyJhbGciOiJub25lIn0." + "A" * (window - 16 - 1 - 24) + ".sig"
    text = big_jwt + " " + ARB_KEY
    assert len(big_jwt) + 1 + 16 == window  # "arb_0123456789ab" is scanned, the rest is not
    assert redactor.text(text) == "[REDACTED:jwt] …[+64 chars]"  # not "[REDACTED:jwt] arb_0123456789ab"


@pytest.mark.parametrize(
    "hostile",
    [
        "eyJ" * 200_000,
        ("eyJa." * 100_000) + "!",
        "a" * 600_000 + "@",
        ("x" * 60 + "@") * 10_000,
        "sk-" * 200_000,
        "Bearer " * 100_000,
        "password=" * 100_000,
        "1 " * 300_000,
        "4111 " * 200_000,
        "-----BEGIN PRIVATE KEY-----" * 30_000,
        "http://" * 100_000 + "u:p",
        "arb_" * 200_000,
    ],
)
def test_hostile_strings_cost_little(hostile: str) -> None:
    redactor = Redactor(RedactSettings(detectors=list(REDACT_DETECTORS)))
    start = time.perf_counter()
    redactor.text(hostile)
    redactor.arguments({"k": hostile, hostile: 1})
    # Linear work on the scan window takes milliseconds; a quadratic pattern would take minutes.
    assert time.perf_counter() - start < 2.0


def test_truncation_summary_when_the_redacted_arguments_are_too_large() -> None:
    args = {f"k{i:03d}": "v" * 50 for i in range(80)}
    args["owner@example.com"] = "x"
    full = _redactor().arguments(args)
    size = len(json.dumps(full.value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    assert not full.truncated

    result = _redactor(max_bytes=size - 1).arguments(args)
    assert result.truncated
    assert result.value == {
        "_truncated": True,
        "bytes": size,
        "keys": [f"k{i:03d}" for i in range(50)],
    }
    assert result.redactions == 1  # the email used as a key

    exact = _redactor(max_bytes=size).arguments(args)
    assert not exact.truncated and exact.value == full.value


def test_summary_keys_are_redacted() -> None:
    result = _redactor(max_bytes=10).arguments({"jane@example.com": "x" * 100})
    assert result.truncated and result.value["keys"] == ["[REDACTED:email]"]


def test_size_is_measured_after_redaction() -> None:
    args = {"blob": JWT * 3}  # ~ 400 bytes before, a marker after
    assert not _redactor(max_bytes=100).arguments(args).truncated


def test_depth_is_capped() -> None:
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"d": [deep]}
    result = _redactor().arguments(deep)
    depth, node = 0, result.value
    while isinstance(node, dict | list):
        node = node["d"] if isinstance(node, dict) else node[0]
        depth += 1
    assert depth == MAX_DEPTH
    assert node == DEPTH_MARKER


def test_self_referencing_mapping_stops_at_the_depth_cap() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    assert DEPTH_MARKER in json.dumps(_redactor().arguments(loop).value)


def test_awkward_values_become_plain_json() -> None:
    args: dict[Any, Any] = {
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf")],
        1: "int key",
        None: "none key",
        False: "bool key",
        2.5: "float key",
        (1, 2): "tuple key",
        "bytes": b"\x00\x01",
        "set": {1},
        "huge": 10**5000,
        "surrogate": "a\ud800b",
        "\udc00key": "v",
        "big": 2**70,
    }
    result = _redactor().arguments(args)
    data = json.dumps(
        result.value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    data.encode("utf-8")  # no lone surrogate is left
    value = result.value
    assert value["nan"] == "NaN" and value["inf"] == ["Infinity", "-Infinity"]
    assert value["1"] == "int key" and value["null"] == "none key" and value["false"] == "bool key"
    assert value["2.5"] == "float key" and value["[UNSUPPORTED:tuple]"] == "tuple key"
    assert value["bytes"] == "[UNSUPPORTED:bytes]" and value["set"] == "[UNSUPPORTED:set]"
    assert value["huge"] == "[TRUNCATED:int]" and value["big"] == 2**70
    assert value["surrogate"] == "a?b"


def test_keys_that_redact_alike_are_kept_apart() -> None:
    result = _redactor().arguments({"a@example.com": 1, "b@example.com": 2, "c@example.com": 3})
    assert result.value == {"[REDACTED:email]": 1, "[REDACTED:email]~2": 2, "[REDACTED:email]~3": 3}
    assert result.redactions == 3


def test_error_messages_are_redacted_and_cut() -> None:
    redactor = _redactor(max_string=100)
    message = (
        "401 from upstream: invalid token "
        f"{JWT} for jane@example.com; postgres://svc:pw123@db failed " + "detail " * 50
    )
    out = redactor.text(message)
    assert JWT not in out and "jane@" not in out and "pw123" not in out
    assert out.startswith("401 from upstream: invalid token [REDACTED:jwt] for [REDACTED:email]")
    assert "…[+" in out


# --- properties over arbitrary JSON -------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)
_b64 = st.binary(max_size=48).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())
_arb_keys = st.builds(
    lambda key_id, secret: f"arb_{key_id}_{secret}",
    st.text("0123456789abcdef", min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()),
)
_jwts = st.builds(
    lambda header, claims, signature: ".".join(
        [
            base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode(),
            base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(),
            signature,
        ]
    ),
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none"]), "typ": st.just("JWT")}
    ),
    st.dictionaries(
        st.sampled_from(["sub", "iss", "aud", "scope", "tenant"]), st.text(max_size=20), min_size=1
    ),
    _b64,
)


@st.composite
def _planted(draw: st.DrawFn, secret: str) -> Any:
    """Arbitrary JSON with ``secret`` somewhere in it: a value, part of a string, or a key."""

    def embed() -> str:
        return draw(st.text(max_size=8)) + secret + draw(st.text(max_size=8))

    def plant(value: Any) -> Any:
        if isinstance(value, dict) and value and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(value)))
            return {**value, key: plant(value[key])}
        if isinstance(value, list) and value and draw(st.booleans()):
            i = draw(st.integers(0, len(value) - 1))
            return [*value[:i], plant(value[i]), *value[i + 1 :]]
        if isinstance(value, dict):
            if draw(st.booleans()):
                return {**value, embed(): draw(_json)}
            return {**value, draw(st.text(max_size=12)): embed()}
        if isinstance(value, list):
            return [*value, embed()]
        return embed()

    root = draw(st.dictionaries(st.text(max_size=12), _json, max_size=6))
    return plant(root)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_arguments_never_raise_and_give_plain_json(value: Any) -> None:
    redactor = _redactor()
    for args in ({"v": value}, value if isinstance(value, dict) else {"x": value}):
        result = redactor.arguments(args)
        json.dumps(result.value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.data(), _arb_keys)
def test_planted_arbiter_key_never_survives(data: st.DataObject, key: str) -> None:
    args = data.draw(_planted(key))
    out = json.dumps(_redactor().arguments(args).value)
    assert key not in out
    assert key.split("_", 2)[2] not in out  # not even the secret part alone


@settings(max_examples=300, deadline=None)
@given(st.data(), _jwts)
def test_planted_jwt_never_survives(data: st.DataObject, token: str) -> None:
    args = data.draw(_planted(token))
    out = json.dumps(_redactor().arguments(args).value)
    assert token not in out
    assert token.rsplit(".", 1)[0] not in out  # header and claims


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_planted_secrets_never_survive_in_free_text(before: str, after: str) -> None:
    redactor = _redactor()
    for secret in (ARB_KEY, JWT, "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in redactor.text(before + secret + after)
    # A card is digit groups: digits glued on either side make it another number (documented).
    card = "4111 1111 1111 1111"
    assert card not in redactor.text(before.rstrip("0123456789") + card + after.lstrip("0123456789"))
