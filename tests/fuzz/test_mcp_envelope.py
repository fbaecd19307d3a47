"""Property-based tests of /mcp in both protocol eras: the JSON-RPC envelope, the body's encoding and the
``Mcp-*``/content headers, against one Arbiter with a recording upstream (see exchange.py for the
properties every answer must have)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.inbound import decode_header_value, encode_header_value

from tests.conftest import INITIALIZE
from tests.fuzz.conftest import ACCEPT, HANDSHAKE, META, MODERN, Target, fuzz, new_trace
from tests.fuzz.exchange import check, send, still_serves
from tests.fuzz.strategies import (
    bad_ids,
    deep_values,
    encode,
    good_ids,
    header_values,
    json_values,
    odd_text,
)

ABSENT = object()
TOOLS = ["rec__echo", "rec__lookup", "rec__hidden_lookup", "rec__nope", "nope__echo", "noseparator", ""]
METHODS = [
    "tools/call",
    "tools/list",
    "resources/read",
    "resources/list",
    "resources/templates/list",
    "prompts/get",
    "prompts/list",
    "ping",
    "initialize",
    "notifications/initialized",
    "notifications/cancelled",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "foo/bar",
]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def session(target: Target, http: httpx.Client) -> str:
    """A handshake-era (2025-11-25) session of the test agent."""
    headers = {"accept": ACCEPT, "content-type": "application/json", "authorization": f"Bearer {target.key}"}
    resp = http.post(target.server.mcp_url, json=INITIALIZE, headers=headers)
    assert resp.status_code == 200, resp.text
    sid = resp.headers["mcp-session-id"]
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    resp = http.post(
        target.server.mcp_url,
        json=done,
        headers={**headers, "mcp-session-id": sid, "mcp-protocol-version": HANDSHAKE},
    )
    assert resp.status_code == 202, resp.text
    return sid


def _params_for(method: Any, modern: bool) -> st.SearchStrategy[Any]:
    args = st.one_of(
        st.fixed_dictionaries({"text": odd_text}),
        st.fixed_dictionaries(
            {"region": st.sampled_from(["eu", "us", ""]) | odd_text}, optional={"q": json_values}
        ),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        json_values,
    )
    shaped: st.SearchStrategy[Any]
    if method in ("tools/call", "prompts/get"):
        shaped = st.fixed_dictionaries(
            {"name": st.sampled_from([*TOOLS, "rec__greet"]) | odd_text | json_values},
            optional={"arguments": args},
        )
    elif method == "resources/read":
        uris = st.sampled_from(["arbiter://rec/rec://note", "arbiter://rec/rec://none", "rec://note", ""])
        shaped = st.fixed_dictionaries({"uri": uris | odd_text | json_values})
    else:
        shaped = st.fixed_dictionaries({}, optional={"cursor": odd_text | json_values})
    if modern:
        meta = st.one_of(
            st.just(META), st.just(META), json_values, st.dictionaries(st.text(max_size=40), json_values)
        )
        shaped = st.tuples(shaped, meta).map(lambda pm: {**pm[0], "_meta": pm[1]})
    return st.one_of(shaped, shaped, shaped, json_values, deep_values, st.just(ABSENT))


@dataclass
class Envelope:
    body: dict[str, Any]
    malformed: bool


@st.composite
def envelopes(draw: st.DrawFn, modern: bool) -> Envelope:
    # Mostly well-formed, so that one odd member at a time gets past the others.
    jsonrpc = draw(st.one_of(*[st.just("2.0")] * 5, json_values, st.just(ABSENT)))
    method = draw(st.one_of(*[st.sampled_from(METHODS)] * 5, odd_text, json_values, st.just(ABSENT)))
    request_id = draw(st.one_of(good_ids, good_ids, bad_ids, bad_ids, st.just(ABSENT)))
    params = draw(_params_for(method, modern))
    body = {
        k: v
        for k, v in (("jsonrpc", jsonrpc), ("id", request_id), ("method", method), ("params", params))
        if v is not ABSENT
    }
    body.update(
        draw(
            st.dictionaries(
                st.sampled_from(["result", "error", "extra", "_meta", "ID"]), json_values, max_size=2
            )
        )
    )
    # Ground truth, by construction: what no JSON-RPC 2.0 / MCP server may accept as a request.
    bad_id = "id" in body and (request_id is None or isinstance(request_id, bool | float | list | dict))
    # Without a method it may be a client's answer to a request of the server's (elicitation, sampling):
    # an id, exactly one object-valued result or error, no params.
    outcome = [k for k in ("result", "error") if k in body]
    response = (
        method is ABSENT
        and "params" not in body
        and "id" in body
        and not bad_id
        and len(outcome) == 1
        and isinstance(body[outcome[0]], dict)
    )
    malformed = jsonrpc != "2.0" or (
        not response
        and (
            not isinstance(method, str)
            or (params is not ABSENT and params is not None and not isinstance(params, dict))
            or bad_id
        )
    )
    return Envelope(body, malformed)


@st.composite
def header_choice(draw: st.DrawFn, right: Any) -> tuple[bytes | None, bool]:
    """A header value: the right one, none, or another; and whether it disagrees with the body."""
    kind = draw(st.sampled_from(["right", "right", "missing", "other"]))
    if kind == "missing" or not isinstance(right, str):
        return (None, True) if kind == "missing" else (draw(header_values), True)
    if kind == "right":
        return encode_header_value(right).encode("ascii"), False
    value = draw(header_values)
    try:
        same = decode_header_value(value.decode("utf-8")) == right
    except Exception:  # noqa: BLE001 - any failure to decode means it cannot match
        same = False
    return value, not same


@fuzz(120)
@given(data=st.data(), with_session=st.booleans())
def test_handshake_era_envelope(
    target: Target, http: httpx.Client, session: str, data: st.DataObject, with_session: bool
) -> None:
    env = data.draw(envelopes(modern=False), "envelope")
    headers: dict[str, str | bytes] = {
        "accept": ACCEPT,
        "content-type": "application/json",
        "mcp-protocol-version": HANDSHAKE,
    }
    if with_session:
        headers["mcp-session-id"] = session
    malformed = env.malformed
    # Handshake-era clients need not send Mcp-Method, but one that disagrees with the body is refused.
    if data.draw(st.booleans(), "send mcp-method"):
        value, mismatch = data.draw(header_choice(env.body.get("method")), "mcp-method")
        if value is not None:
            headers["mcp-method"] = value
            malformed |= mismatch
    ex = send(target, http, encode(env.body), headers)
    check(target, ex, malformed=malformed)
    still_serves(target, http, session)


@fuzz(120)
@given(data=st.data())
def test_stateless_era_envelope_and_headers(target: Target, http: httpx.Client, data: st.DataObject) -> None:
    env = data.draw(envelopes(modern=True), "envelope")
    body = env.body
    malformed = env.malformed
    headers: dict[str, str | bytes] = {
        "accept": ACCEPT,
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
    }
    method = body.get("method")
    value, mismatch = data.draw(header_choice(method), "mcp-method")
    if value is not None:
        headers["mcp-method"] = value
    # A notification is acknowledged (202) and dropped unseen, so only requests must match their headers.
    request = "id" in body
    malformed |= mismatch and request
    params: Any = body.get("params")
    params = params if isinstance(params, dict) else {}
    key = (
        {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
        if isinstance(method, str)
        else None
    )
    if key is not None:
        value, mismatch = data.draw(header_choice(params.get(key)), "mcp-name")
        if value is not None:
            headers["mcp-name"] = value
        malformed |= mismatch and request
    elif data.draw(st.booleans(), "stray mcp-name"):
        headers["mcp-name"] = data.draw(header_values, "mcp-name")
    if request and params.get("_meta") != META:
        malformed = True  # a 2026-07-28 request carries its envelope in params._meta
    arguments = params.get("arguments")
    region = arguments.get("region") if isinstance(arguments, dict) else None
    if method == "tools/call" and params.get("name") in ("rec__lookup", "rec__hidden_lookup"):
        value, mismatch = data.draw(header_choice(region), "mcp-param-region")
        if value is not None:
            headers["mcp-param-region"] = value
        malformed |= mismatch and request
    for name in data.draw(
        st.lists(st.sampled_from(["Region", "Other", "region", "Q", ""]), max_size=2), "extra"
    ):
        headers[f"mcp-param-{name}"] = data.draw(header_values, "mcp-param value")
    ex = send(target, http, encode(body), headers)
    check(target, ex, malformed=malformed)
    still_serves(target, http)


def _raw_bodies() -> st.SearchStrategy[bytes]:
    valid = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "rec__echo", "arguments": {"text": "x"}, "_meta": META},
    }
    text = json.dumps(valid)
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8")),
        st.integers(min_value=1, max_value=len(text) - 1).map(lambda n: text[:n].encode()),  # truncated
        st.just(b""),
        st.just(b"[]"),
        st.lists(st.just(valid), min_size=1, max_size=3).map(lambda b: json.dumps(b).encode()),  # batches
        json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999999", b"\xef\xbb\xbf{}", b'{"id": NaN}']),
        st.integers(min_value=900, max_value=100_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
        st.integers(min_value=900, max_value=100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.just(text.encode("utf-16")),
        st.just(text.replace('"id": 1', '"id": 1, "id": NaN').encode()),
    )


def _is_single_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


@fuzz(80)
@given(body=_raw_bodies(), modern=st.booleans(), with_session=st.booleans())
def test_non_json_and_non_object_bodies(
    target: Target, http: httpx.Client, session: str, body: bytes, modern: bool, with_session: bool
) -> None:
    headers: dict[str, str | bytes] = {"accept": ACCEPT, "content-type": "application/json"}
    if modern:
        headers.update({"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "rec__echo"})
    else:
        headers["mcp-protocol-version"] = HANDSHAKE
        if with_session:
            headers["mcp-session-id"] = session
    ex = send(target, http, body, headers)
    # Anything that is not one JSON object (bad bytes, truncated, batches, scalars, NaN ids) is malformed.
    check(target, ex, malformed=not _is_single_object(body) or b"NaN" in body)
    still_serves(target, http, session)


CONTENT_TYPES = [
    None,
    "",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
    "application/json-patch+json",
    "json",
    "application/xml",
    "*/*",
]
ACCEPTS = [None, "", "text/html", "application/json", "text/event-stream", "*/*", "application/*", ACCEPT]


@fuzz(60)
@given(
    content_type=st.sampled_from(CONTENT_TYPES) | header_values.map(lambda b: b.decode("utf-8", "replace")),
    accept=st.sampled_from(ACCEPTS) | header_values.map(lambda b: b.decode("utf-8", "replace")),
    right_type=st.booleans(),
    modern=st.booleans(),
)
def test_content_type_and_accept(
    target: Target,
    http: httpx.Client,
    session: str,
    content_type: str | None,
    accept: str | None,
    right_type: bool,
    modern: bool,
) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "rec__echo", "arguments": {"text": "x"}},
    }
    headers: dict[str, str | bytes] = {}
    if modern:
        body["params"]["_meta"] = META
        headers.update({"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "rec__echo"})
    else:
        headers.update({"mcp-protocol-version": HANDSHAKE, "mcp-session-id": session})
    if right_type:
        content_type = "application/json"
    if content_type is not None:
        headers["content-type"] = content_type.encode("utf-8")
    if accept is not None:
        headers["accept"] = accept.encode("utf-8")
    media = (content_type or "").split(";")[0].strip().lower()
    wrong_type = media != "application/json"
    ex = send(target, http, json.dumps(body).encode(), headers)
    check(target, ex, malformed=wrong_type)
    if wrong_type:
        assert ex.response.status_code == 415, f"a body that is not application/json is not 415{ex}"
    still_serves(target, http, session)


@fuzz(40)
@given(
    session_id=header_values, version=st.sampled_from([HANDSHAKE, "2025-06-18", "2024-11-05"]) | header_values
)
def test_unknown_sessions_and_protocol_versions(
    target: Target, http: httpx.Client, session: str, session_id: bytes, version: bytes | str
) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "rec__echo", "arguments": {"text": "x"}},
    }
    headers: dict[str, str | bytes] = {
        "accept": ACCEPT,
        "content-type": "application/json",
        "mcp-protocol-version": version,
        "mcp-session-id": session_id,
    }
    ex = send(target, http, json.dumps(body).encode(), headers)
    known = version if isinstance(version, str) else None
    check(target, ex, malformed=known is not None and session_id.decode("utf-8", "replace") != session)
    still_serves(target, http, session)


@fuzz(30)
@given(data=st.data())
def test_unauthenticated_requests_never_reach_anything(
    target: Target, http: httpx.Client, data: st.DataObject
) -> None:
    env = data.draw(envelopes(modern=data.draw(st.booleans())), "envelope")
    authorization = data.draw(
        st.sampled_from(
            [None, "", "Bearer", "Basic dXNlcjpwYXNz", "bearer x", "Bearer arb_nope", "Bearer a.b.c"]
        )
        | header_values.map(lambda v: (b"Bearer " + v).strip()),
        "authorization",
    )
    headers: dict[str, str | bytes] = {
        "accept": ACCEPT,
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
    }
    if isinstance(env.body.get("method"), str):
        # Spelled as a client would: the SDK's encoding makes any method a legal header value.
        headers["mcp-method"] = encode_header_value(env.body["method"]).encode("ascii")
    if authorization is not None:
        headers["authorization"] = authorization
    ex = send(target, http, encode(env.body), headers, authenticated=False)
    check(target, ex, malformed=True, authenticated=False)
    assert ex.response.status_code in (400, 401), f"a request without a valid credential was not refused{ex}"
    events = target.settle(ex.trace)
    assert [e["kind"] for e in events] == ["auth"], f"a refused credential was not audited once{ex}"


def _call(name: str, arguments: Any) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments, "_meta": META}
    return {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params}


@fuzz(40)
@given(
    region=st.sampled_from(["eu", "", None]) | odd_text,
    header=st.sampled_from(["same", "missing"]) | header_values,
    extra=st.dictionaries(st.sampled_from(["Region", "Q", "Other"]), header_values, max_size=2),
)
def test_a_hidden_tool_answers_like_a_missing_one_whatever_the_param_headers(
    target: Target, http: httpx.Client, region: str | None, header: str | bytes, extra: dict[str, bytes]
) -> None:
    answers: list[tuple[int, str]] = []
    for name in ("rec__hidden_lookup", "rec__no_such_tool"):
        headers: dict[str, str | bytes] = {
            "accept": ACCEPT,
            "content-type": "application/json",
            "mcp-protocol-version": MODERN,
            "mcp-method": "tools/call",
            "mcp-name": name,
            **{f"mcp-param-{k}": v for k, v in extra.items()},
        }
        if header == "same" and isinstance(region, str):
            headers["mcp-param-region"] = encode_header_value(region)
        elif isinstance(header, bytes):
            headers["mcp-param-region"] = header
        ex = send(target, http, encode(_call(name, {} if region is None else {"region": region})), headers)
        check(target, ex, malformed=True)
        answers.append((ex.response.status_code, ex.response.text.replace(name, "<name>")))
    assert answers[0] == answers[1], f"a hidden tool answers differently from a missing one: {answers}"


@pytest.mark.parametrize("modern", [False, True])
def test_a_declared_body_over_the_limit_is_refused_at_once(
    target: Target, session: str, modern: bool
) -> None:
    trace, parent = new_trace()
    version = MODERN if modern else HANDSHAKE
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{target.server.port}\r\n"
        f"authorization: Bearer {target.key}\r\ncontent-type: application/json\r\naccept: {ACCEPT}\r\n"
        f"mcp-protocol-version: {version}\r\nmcp-method: tools/call\r\nmcp-name: rec__echo\r\n"
        + ("" if modern else f"mcp-session-id: {session}\r\n")
        + f"traceparent: {parent}\r\ncontent-length: {50 * 1024 * 1024}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", target.server.port), timeout=5) as sock:
        sock.sendall(head.encode() + b'{"jsonrpc": "2.0", ')  # and then nothing: the rest never comes
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            answer = b""
    assert answer.startswith(b"HTTP/1.1 413"), (
        f"a 50 MiB Content-Length was not refused at once: {answer[:300]!r}"
    )
    assert target.settle(trace), "the refused oversized request left no audit record"
