"""Property-based tests of every /admin/v1 operation, taken from the API's own OpenAPI document: hostile
path ids, query parameters and bodies are answered without a 5xx, on a keep-alive connection that
survives every answer, and every change or refusal is audited.

(schemathesis would generate from the same document; these strategies add the values that broke things:
ids past int64, unicode, percent-encodings, repeated and unknown parameters.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN
from tests.fuzz.conftest import Target, fuzz, new_trace
from tests.fuzz.strategies import HUGE, encode, json_values, odd_text

PREFIX = "/admin/v1"
# POSTs that compute an answer and change nothing, so they are no admin change to audit.
READ_ONLY_POSTS = frozenset(
    f"{PREFIX}/{p}" for p in ("limits/explain", "policies/explain", "policies/dry-run")
)

T = TypeVar("T")


class Draw(Protocol):
    """``DataObject.draw``, which pyright does not accept as hypothesis' own ``DrawFn``."""

    def __call__(self, strategy: st.SearchStrategy[T], label: Any = None) -> T: ...


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # the template, e.g. /admin/v1/upstreams/{upstream_id}
    query: tuple[str, ...]
    body: str | None  # media type of the request body, if it takes one
    fields: tuple[str, ...]  # the body schema's top-level properties


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _resolve(doc, doc["components"]["schemas"][ref.rsplit("/", 1)[-1]])
    return schema


def _fields(doc: dict[str, Any], schema: dict[str, Any]) -> tuple[str, ...]:
    schema = _resolve(doc, schema)
    names: list[str] = list(schema.get("properties", {}))
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        names.extend(_fields(doc, alt))
    return tuple(dict.fromkeys(names))


def operations(doc: dict[str, Any]) -> list[Operation]:
    ops: list[Operation] = []
    for path, items in doc["paths"].items():
        for method, op in items.items():
            params = op.get("parameters", [])
            content: dict[str, Any] = op.get("requestBody", {}).get("content", {})
            media = next(iter(content), None)
            schema = content[media].get("schema", {}) if media else {}
            ops.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    query=tuple(p["name"] for p in params if p["in"] == "query"),
                    body=media,
                    fields=_fields(doc, schema) if media == "application/json" else (),
                )
            )
    return ops


@pytest.fixture(scope="module")
def admin_ops(target: Target) -> list[Operation]:
    with target.server.admin() as admin:
        resp = admin.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    ops = operations(resp.json())
    assert len(ops) >= 30 and all(o.path.startswith(PREFIX) for o in ops)
    return ops


@pytest.fixture(scope="module")
def admin_http(target: Target) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    # One connection, so that "the connection survived" means something.
    with httpx.Client(
        base_url=target.server.base_url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=1)
    ) as http:
        yield http


ids = st.one_of(
    st.integers(min_value=-3, max_value=5).map(str),
    st.sampled_from(
        [str(HUGE), str(-HUGE), str(2**63), str(2**63 - 1), str(-(2**63) - 1), "1e3", "0x10", "1.5"]
    ),
    st.sampled_from(
        ["", " ", "%00", "%2F", "..", "%2e%2e", "null", "NaN", "-0", "\u0661\u0662", "\uff11", "a" * 3000]
    ),
    st.integers().map(str),
    odd_text,
)
query_values = st.one_of(
    ids,
    st.sampled_from(
        [
            "0",
            "1001",
            "-1",
            "asc",
            "desc",
            "json",
            "jsonl",
            "csv",
            "bundle",
            "2026-05-01",
            "2026-05-01T12:00:00+02:00",
            "2026-13-45",
            "9999-12-31T23:59:59Z",
            "0000-01-01",
            "99999999999999999999",
            "tool",
            "principal",
            "hour",
            "month",
            "eyJ9",
            "AAAA",
            "0" * 32,
        ]
    ),
)
# Values an upstream registration may not point at anything real with (no outbound traffic from fuzzing).
urls = st.sampled_from(
    [
        "http://127.0.0.1:9/mcp",
        "ftp://x",
        "http://169.254.169.254/",
        "file:///etc/passwd",
        "",
        "http://[::1",
        "x" * 3000,
    ]
)


def _path(op: Operation, draw: Draw) -> str:
    def fill(match: re.Match[str]) -> str:
        return quote(draw(ids, match.group(1)), safe="")

    return re.sub(r"\{([^}]+)\}", fill, op.path)


def _body(op: Operation, draw: Draw) -> tuple[bytes | None, str | None]:
    if op.body is None:
        return (None, None) if draw(st.booleans()) else (encode(draw(json_values)), "application/json")
    if op.body != "application/json":
        text = draw(
            st.one_of(
                odd_text, st.just("p, *, *, x, call, allow\n"), st.just("g, a\n"), st.just("p" + ",x" * 50)
            )
        )
        return text.encode("utf-8", "surrogatepass"), op.body
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "any", "broken"]))
    if kind == "broken":
        return draw(
            st.sampled_from([b"", b"{", b"[]", b"null", b'{"a":NaN}', b"\xff\xfe"])
        ), "application/json"
    if kind == "any":
        return encode(draw(json_values)), "application/json"
    body: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(op.fields), unique=True)) if op.fields else []:
        if name in ("url", "token_url"):
            body[name] = draw(urls)
        elif name == "rules":
            body[name] = draw(
                st.lists(
                    st.dictionaries(
                        st.sampled_from(
                            ["type", "subject", "object", "action", "effect", "condition", "tenant"]
                        ),
                        json_values,
                        max_size=4,
                    ),
                    max_size=3,
                )
            )
        else:
            body[name] = draw(json_values)
    return encode(body), "application/json"


def _query(op: Operation, draw: Draw) -> list[tuple[str, str]]:
    names = draw(st.lists(st.sampled_from(op.query), unique=True)) if op.query else []
    query = [(name, draw(query_values)) for name in names]
    if draw(st.integers(0, 9)) == 0:  # an unknown or repeated parameter
        query.append(
            (
                draw(
                    st.sampled_from([*op.query, "bogus", "limit", "access_token"])
                    if op.query
                    else st.just("bogus")
                ),
                "1",
            )
        )
    return query


def _local_port(resp: httpx.Response) -> int | None:
    stream: Any = resp.extensions.get("network_stream")
    try:
        return stream.get_extra_info("client_addr")[1] if stream is not None else None
    except (OSError, TypeError):
        return None


@fuzz(250)
@given(data=st.data())
def test_every_admin_operation_with_hostile_input(
    target: Target, admin_ops: list[Operation], admin_http: httpx.Client, data: st.DataObject
) -> None:
    op = data.draw(st.sampled_from(admin_ops), "operation")
    path = _path(op, data.draw)
    query = _query(op, data.draw)
    body, media = _body(op, data.draw)
    trace, parent = new_trace()
    headers = {"traceparent": parent, **({"content-type": media} if media else {})}
    resp = admin_http.request(op.method, path, params=tuple(query), content=body, headers=headers)
    shown = (
        f"\n{op.method} {resp.request.url}\n{headers}\n{(body or b'')[:600]!r}\n"
        f"--> {resp.status_code} {dict(resp.headers)} {resp.text[:300]!r}"
    )
    assert resp.status_code < 500, f"5xx from the admin API{shown}"
    port = _local_port(resp)
    assert port is not None and resp.headers.get("connection", "").lower() != "close", (
        f"the answer closed the keep-alive connection{shown}"
    )
    after = admin_http.get("/admin/v1/upstreams")
    assert after.status_code == 200, f"the next request on the connection failed: {after.status_code}{shown}"
    assert _local_port(after) == port, f"the next request needed a new connection{shown}"
    if op.method != "GET" and op.path not in READ_ONLY_POSTS and 200 <= resp.status_code < 300:
        events = target.settle(trace)
        assert [e["kind"] for e in events] == ["admin"], (
            f"an admin change was not audited exactly once{shown}"
        )


@fuzz(40)
@given(data=st.data())
def test_admin_refusals_are_audited(target: Target, admin_ops: list[Operation], data: st.DataObject) -> None:
    """Without a valid credential every operation answers 401 (never a 5xx), and each refusal is audited."""
    op = data.draw(st.sampled_from(admin_ops), "operation")
    path = _path(op, data.draw)
    body, media = _body(op, data.draw)
    authorization = data.draw(
        st.sampled_from(
            [None, "Bearer", "Bearer wrong-token", "Basic YTpi", "Bearer arb_nope", "Bearer a.b.c"]
        ),
        "auth",
    )
    trace, parent = new_trace()
    headers = {"traceparent": parent, **({"content-type": media} if media else {})}
    if authorization:
        headers["authorization"] = authorization
    with httpx.Client(base_url=target.server.base_url, timeout=30) as http:
        resp = http.request(op.method, path, content=body, headers=headers)
    shown = f"\n{op.method} {resp.request.url} {headers}\n--> {resp.status_code} {resp.text[:300]!r}"
    assert resp.status_code < 500, f"5xx from the admin API{shown}"
    if resp.status_code in (401, 403):
        events = target.settle(trace)
        assert [e["kind"] for e in events] == ["auth"], f"a refused credential was not audited once{shown}"
    else:
        # Only a request FastAPI refuses before authentication (an unroutable path) may skip the check.
        assert resp.status_code in (404, 405), f"an unauthenticated request was not refused{shown}"
