"""The admin API for upstreams: the happy path and every error case the issue names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Route

from tests.conftest import (
    ADMIN_TOKEN,
    ArbiterFactory,
    ArbiterServer,
    UpstreamProc,
    free_port,
    serve_in_thread,
)


def test_admin_api_needs_a_credential_and_the_right_role(
    arbiter_factory: ArbiterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = arbiter_factory()
    with server.admin(token=None) as anon:
        resp = anon.get("/upstreams")
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "missing_credentials"
        assert resp.headers["www-authenticate"].startswith("Bearer resource_metadata=")
    with server.admin(token="not-the-admin-token") as wrong:
        resp = wrong.get("/upstreams")
        assert resp.status_code == 401
        assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    with server.admin(token=server.agent_key) as agent:  # a valid key without an admin role
        assert agent.get("/upstreams").status_code == 403
    with server.admin() as admin:
        auditor = admin.post("/api-keys", json={"owner": "audit", "roles": ["auditor"]}).json()["key"]
        sec = admin.post("/api-keys", json={"owner": "secops", "roles": ["security-admin"]}).json()["key"]
    with server.admin(token=auditor) as auditor_client:  # auditors see the audit API only
        assert auditor_client.get("/upstreams").status_code == 403
        assert auditor_client.get("/openapi.json").status_code == 200
    with server.admin() as admin:  # ... unless the policy grants them more
        rule = {"subject": "role:auditor", "object": "admin/upstreams", "action": "admin:read"}
        assert admin.post("/policies", json=rule).status_code == 201
    with server.admin(token=auditor) as reader:
        assert reader.get("/upstreams").status_code == 200
        assert reader.get("/catalog").status_code == 200
        assert (
            reader.post("/upstreams", json={"name": "x", "url": "http://127.0.0.1:1/mcp"}).status_code == 403
        )
        assert reader.get("/api-keys").status_code == 403
    with server.admin(token=sec) as secops:
        assert secops.get("/api-keys").status_code == 200
    # Every use of the break-glass token is logged (never the token itself).
    assert "break-glass admin token used" in caplog.text
    assert "test-admin-token" not in caplog.text


def test_break_glass_is_off_unless_configured(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    off = arbiter_factory(admin_token=None, database_url=server.settings.database_url)
    with off.admin() as client:  # the same token, but this Arbiter has no break-glass configured
        assert client.get("/upstreams").status_code == 401
    with off.admin(token=server.agent_key) as client:
        assert client.get("/upstreams").status_code == 403


def test_crud_and_catalog(arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc) -> None:
    server = arbiter_factory()
    created = server.register("crm", crm_upstream.url, call_timeout_s=12)
    assert created["catalog"] == {"tools": 4, "resources": 1, "resource_templates": 0, "prompts": 1}
    assert created["status"] == "connected" and created["source"] == "api"
    with server.admin() as admin:
        uid = created["id"]
        assert admin.get(f"/upstreams/{uid}").json()["call_timeout_s"] == 12
        assert [u["name"] for u in admin.get("/upstreams").json()] == ["crm"]

        catalog = admin.get(f"/upstreams/{uid}/catalog").json()
        tool = next(e for e in catalog if e["name"] == "get_customer")
        assert tool["exposed_name"] == "crm__get_customer"
        assert len(tool["sha256"]) == 64 and tool["definition"]["name"] == "get_customer"
        resource = next(e for e in catalog if e["kind"] == "resource")
        assert resource["exposed_name"] == "arbiter://crm/crm://customers"
        assert {e["kind"] for e in admin.get("/catalog", params={"kind": "prompt"}).json()} == {"prompt"}

        updated = admin.patch(f"/upstreams/{uid}", json={"enabled": False})
        assert updated.status_code == 200 and updated.json()["status"] == "disabled"
        assert server.app.state.runtime.catalog.views.tools == []
        assert admin.patch(f"/upstreams/{uid}", json={"enabled": True}).json()["status"] == "connected"
        assert len(server.app.state.runtime.catalog.views.tools) == 4

        assert admin.delete(f"/upstreams/{uid}").status_code == 204
        assert admin.get(f"/upstreams/{uid}").status_code == 404
        assert server.app.state.runtime.catalog.views.tools == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Bad_Name", "url": "http://127.0.0.1:1/mcp"}, "name"),
        ({"name": "a" * 33, "url": "http://127.0.0.1:1/mcp"}, "name"),
        ({"name": "ok", "url": "ftp://127.0.0.1/mcp"}, "url"),
        ({"name": "ok", "url": "file:///etc/passwd"}, "url"),
        ({"name": "ok", "transport": "stdio", "url": "http://127.0.0.1:1/mcp"}, "transport"),
        ({"name": "ok", "transport": "carrier-pigeon", "url": "http://127.0.0.1:1/mcp"}, "transport"),
        ({"name": "ok", "url": "http://127.0.0.1:1/mcp", "call_timeout_s": 0}, "call_timeout_s"),
        ({"name": "ok", "url": "http://127.0.0.1:1/mcp", "command": ["sh"]}, "command"),
        ({"url": "http://127.0.0.1:1/mcp"}, "name"),
    ],
)
def test_validation_errors_are_422_with_the_field(
    arbiter_factory: ArbiterFactory, body: dict[str, object], field: str
) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        resp = admin.post("/upstreams", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_input"
    assert field in [problem["loc"][-1] for problem in error["problems"]]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]:8080/mcp",
        "http://169.254.10.10/mcp",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[::ffff:169.254.169.254]/mcp",
        "http://user:secret@127.0.0.1:1/mcp",
    ],
)
def test_link_local_metadata_and_credential_urls_refused(arbiter_factory: ArbiterFactory, url: str) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        resp = admin.post("/upstreams", json={"name": "evil", "url": url})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "url"
    assert "secret" not in resp.text


def test_operator_can_allow_link_local(arbiter_factory: ArbiterFactory, loopback_only: list[str]) -> None:
    server = arbiter_factory(upstream={"allow_link_local": True, "reconnect_backoff_s": 0})
    with server.admin() as admin:
        resp = admin.post(
            "/upstreams", json={"name": "ll", "url": "http://169.254.10.10:9/mcp", "connect_timeout_s": 0.5}
        )
    # Allowed past the URL check and the connect-time check; the connection itself is stopped by the
    # test (no packet leaves this machine), which the upstream reports as unreachable.
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    assert "169.254.10.10" in loopback_only


def test_duplicate_name_is_409_and_unknown_ids_404(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    server.register("crm", crm_upstream.url)
    with server.admin() as admin:
        dup = admin.post("/upstreams", json={"name": "crm", "url": crm_upstream.url})
        assert dup.status_code == 409
        assert dup.json()["error"]["field"] == "name"
        for method, path in [
            ("GET", "/upstreams/999"),
            ("PATCH", "/upstreams/999"),
            ("DELETE", "/upstreams/999"),
            ("POST", "/upstreams/999/refresh"),
            ("GET", "/upstreams/999/catalog"),
        ]:
            resp = admin.request(method, path, json={} if method == "PATCH" else None)
            assert resp.status_code == 404, (method, path, resp.text)


def test_unreachable_upstream_is_refused_and_not_stored(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        resp = admin.post(
            "/upstreams",
            json={"name": "dead", "url": f"http://127.0.0.1:{free_port()}/mcp", "connect_timeout_s": 2},
        )
        assert resp.status_code == 502
        assert resp.json()["error"] == {
            "code": "upstream_unavailable",
            "message": "upstream 'dead' is unavailable",
            "upstream": "dead",
        }
        assert admin.get("/upstreams").json() == []


@pytest.fixture
def redirector(crm_upstream: UpstreamProc) -> Iterator[str]:
    """An 'upstream' that redirects every request to another origin (the real CRM)."""

    async def bounce(request: object) -> RedirectResponse:
        return RedirectResponse(crm_upstream.url, status_code=307)

    app = Starlette(routes=[Route("/mcp", bounce, methods=["GET", "POST", "DELETE"])])
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}/mcp"


def test_redirect_to_another_origin_is_not_followed(arbiter_factory: ArbiterFactory, redirector: str) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        resp = admin.post("/upstreams", json={"name": "bouncy", "url": redirector, "connect_timeout_s": 5})
    assert resp.status_code == 502, resp.text
    assert admin_names(server) == []


def admin_names(server: ArbiterServer) -> list[str]:
    with server.admin() as admin:
        return [u["name"] for u in admin.get("/upstreams").json()]


def test_openapi_is_served_under_admin_prefix_to_admins_only(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    with server.admin(token=None) as anon:
        assert anon.get("/openapi.json").status_code == 401
    with server.admin() as admin:
        spec = admin.get("/openapi.json").json()
    assert {"/admin/v1/upstreams", "/admin/v1/api-keys"} <= set(spec["paths"])
    assert ADMIN_TOKEN not in str(spec)
