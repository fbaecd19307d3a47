"""The admin API's contract: its OpenAPI document describes every operation fully (typed answers, the
bearer scheme, the shared error body), every error answers that body, every timestamp is RFC 3339 UTC
with ``Z``, and the interactive reference is served without a CDN while the document needs a token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc

PREFIX = "/admin/v1"
ERROR_REF = "#/components/schemas/ErrorBody"
WRITES = {"post", "put", "patch", "delete"}
# RFC 3339, UTC, milliseconds, Z: the one timestamp format of the admin API (admin/types.py).
UTC_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:")


@pytest.fixture
def server(arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc) -> ArbiterServer:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    return server


@pytest.fixture
def doc(server: ArbiterServer) -> dict[str, Any]:
    with server.admin() as admin:
        resp = admin.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    spec: dict[str, Any] = resp.json()
    return spec


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, items in doc["paths"].items():
        for method, op in items.items():
            yield path, method, op


def _typed(schema: dict[str, Any]) -> bool:
    """A named model, or a list of one: not an anonymous ``{"type": "object"}``."""
    if "$ref" in schema:
        return True
    if schema.get("type") == "array":
        return "$ref" in schema.get("items", {})
    return False


def _problems_of(path: str, method: str, op: dict[str, Any]) -> list[str]:
    where = f"{method.upper()} {path}"
    problems: list[str] = []
    if op.get("security") != [{"bearer": []}]:
        problems.append(f"{where}: no bearer security requirement")
    responses: dict[str, Any] = op.get("responses", {})
    ok = {code: r for code, r in responses.items() if code.startswith("2")}
    if not ok:
        problems.append(f"{where}: no 2xx response")
    for code, resp in ok.items():
        content: dict[str, Any] = resp.get("content", {})
        if code == "204":
            if content:
                problems.append(f"{where}: 204 with a body")
            continue
        if not content:
            problems.append(f"{where}: {code} without a documented body")
        for media, body in content.items():
            schema = body.get("schema", {})
            if media == "application/json" and not _typed(schema):
                problems.append(f"{where}: {code} {media} is not a named model: {schema}")
            elif not schema:
                problems.append(f"{where}: {code} {media} has no schema")
    expected = {"401", "403", "422"}
    if "{" in path:
        expected.add("404")
    if method in WRITES:
        expected.add("409")
    for code in sorted(expected):
        schema = responses.get(code, {}).get("content", {}).get("application/json", {}).get("schema")
        if schema != {"$ref": ERROR_REF}:
            problems.append(f"{where}: {code} does not answer the shared error body")
    request = op.get("requestBody", {}).get("content", {}).get("application/json")
    if request is not None:
        schema = request.get("schema", {})
        alternatives = schema.get("anyOf", [schema])
        if not all("$ref" in alt for alt in alternatives):
            problems.append(f"{where}: untyped JSON request body {schema}")
    for param in op.get("parameters", []):
        if not param.get("schema"):
            problems.append(f"{where}: parameter {param['name']} has no schema")
    return problems


def test_every_operation_is_described_completely(doc: dict[str, Any]) -> None:
    ops = list(_operations(doc))
    assert len(ops) >= 30
    problems = [p for path, method, op in ops for p in _problems_of(path, method, op)]
    assert all(path.startswith(PREFIX) for path, _, _ in ops)
    assert not problems, "\n".join(problems)


def test_the_document_names_its_schemas_cleanly(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes == {"bearer": {**schemes["bearer"], "type": "http", "scheme": "bearer"}}
    names = list(doc["components"]["schemas"])
    # No Body_xxx, no module__mangled__Names (two models of one name), no -Input/-Output splits.
    unclean = [n for n in names if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", n) or n.startswith("Body")]
    assert not unclean, unclean
    # FastAPI's validation error body is never sent by this API, so it is not documented either.
    assert "HTTPValidationError" not in names
    error = doc["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]


def test_every_admin_error_answers_the_shared_body(server: ArbiterServer) -> None:
    with server.admin() as admin:
        invalid = admin.post("/upstreams", json={"name": "Bad_Name", "url": "ftp://x", "secret": "s3cr3t"})
        unknown = admin.get("/no-such-area")
        trailing = admin.get("/upstreams/")
        not_allowed = admin.delete("/catalog")
    with server.admin(token=None) as anonymous:
        unknown_anonymous = anonymous.get("/no-such-area")
        not_allowed_anonymous = anonymous.delete("/catalog")

    assert invalid.status_code == 422, invalid.text
    error = invalid.json()["error"]
    assert set(invalid.json()) == {"error"}
    assert error["code"] == "invalid_input"
    assert "\n" not in error["message"] and "name" in error["message"] and "url" in error["message"]
    assert {tuple(p) for p in (x["loc"] for x in error["problems"])} >= {("body", "name"), ("body", "url")}
    assert all(set(p) == {"loc", "msg", "type"} for p in error["problems"])
    assert "s3cr3t" not in invalid.text and "Bad_Name" not in invalid.text  # input never echoed

    for resp in (unknown, trailing):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found" and set(resp.json()) == {"error"}
    assert not_allowed.status_code == 405, not_allowed.text
    assert not_allowed.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in not_allowed.headers["allow"]

    # Nothing is judged, not even whether the path exists, before the caller is authenticated.
    for resp in (unknown_anonymous, not_allowed_anonymous):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "missing_credentials"
        assert resp.headers["www-authenticate"].lower().startswith("bearer")


def _timestamps(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():  # pyright: ignore[reportUnknownVariableType]
            yield from _timestamps(item)
    elif isinstance(value, list):
        for item in value:  # pyright: ignore[reportUnknownVariableType]
            yield from _timestamps(item)
    elif isinstance(value, str) and LOOKS_LIKE_TIME.match(value):
        yield value


def test_every_timestamp_is_rfc3339_utc_with_z(server: ArbiterServer) -> None:
    with server.admin() as admin:
        key = admin.post("/api-keys", json={"owner": "svc", "expires_in_s": 3600})
        assert key.status_code == 201, key.text
        admin.post("/limits", json={"limit": 10, "period": "minute"}).raise_for_status()
        admin.post("/budgets", json={"limit": 5, "period": "day"}).raise_for_status()
        admin.post("/tool-costs", json={"tool": "kb/*", "cost": 1}).raise_for_status()
        upstream_id = admin.get("/upstreams").json()[0]["id"]
        admin.put(f"/upstreams/{upstream_id}/tools/search/settings", json={"idempotent": True})
        samples = {
            "upstreams": admin.get("/upstreams"),
            "api-keys": admin.get("/api-keys"),
            "api-key": admin.get(f"/api-keys/{key.json()['id']}"),
            "policies": admin.get("/policies"),
            "catalog": admin.get("/catalog"),
            "definitions": admin.get("/definitions"),
            "limits": admin.get("/limits"),
            "budgets": admin.get("/budgets"),
            "tool-costs": admin.get("/tool-costs"),
            "usage": admin.get("/usage"),
            "audit events": admin.get("/audit/events", params={"kind": "admin"}),
            "audit verify": admin.get("/audit/verify"),
        }
    found: dict[str, list[str]] = {}
    for name, resp in samples.items():
        assert resp.status_code == 200, f"{name}: {resp.text}"
        found[name] = list(_timestamps(resp.json()))
        wrong = [t for t in found[name] if not UTC_Z.fullmatch(t)]
        assert not wrong, f"{name}: {wrong}"
    assert found["api-key"] and len(found["api-key"]) >= 2  # created_at, expires_at
    for name in ("upstreams", "catalog", "definitions", "limits", "budgets", "tool-costs", "usage"):
        assert found[name], f"{name} returned no timestamp to check"
    # Admin changes carry their rows, timestamps included, into the audit log: the same format there.
    assert len(found["audit events"]) > len(samples["audit events"].json()["events"])


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_the_reference_page_loads_local_assets_and_the_spec_needs_a_token(server: ArbiterServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        page = http.get(f"{PREFIX}/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", page.text), "the page must not load anything from elsewhere"
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'"):
            assert directive in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        parser = _Assets()
        parser.feed(page.text)
        assert any(u.endswith("swagger-ui-bundle.js") for u in parser.urls), parser.urls
        page_url = httpx.URL(f"{server.base_url}{PREFIX}/docs")
        for url in parser.urls:
            asset = http.get(page_url.join(url))
            assert asset.status_code == 200, f"{url}: {asset.status_code}"
            assert asset.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
        # The script asks for the token and sends it for the document; without one it is refused.
        script = http.get(page_url.join("docs/arbiter-docs.js")).text
        assert "openapi.json" in script and "Authorization" in script
        # Only the page's own files are served, never another file of the package.
        assert http.get(f"{PREFIX}/docs/VERSION").status_code == 404
        assert http.get(f"{PREFIX}/docs/..%2Fopenapi.py").status_code == 401  # no such route
        anonymous = http.get(f"{PREFIX}/openapi.json")
        wrong = http.get(f"{PREFIX}/openapi.json", headers={"authorization": "Bearer arb_wrong"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_credentials"
    assert wrong.status_code == 401 and set(wrong.json()) == {"error"}
    assert "paths" not in anonymous.text
