"""A NUL character in an admin id, query parameter or stored field is a 422 on PostgreSQL, never a 500.

PostgreSQL's text types cannot hold U+0000: asyncpg refused it, and ``GET /admin/v1/api-keys/x%00`` or an
approval note holding ``\\u0000`` answered 500. admin/nul.py refuses it once, for every route.
"""

from __future__ import annotations

import asyncio

import httpx
from cryptography.fernet import Fernet

from arbiter.store import schema
from tests.conftest import ArbiterFactory
from tests.policies.conftest import new_key
from tests.proxy.test_approval import MODERN, Payments, payments
from tests.proxy.test_approver_flow import _api, _refund, _start
from tests.refusals import tool_refusal

__all__ = ["payments"]  # fixture


def _assert_nul_refused(resp: httpx.Response, where: str) -> None:
    assert resp.status_code == 422, (where, resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["code"] == "invalid_input" and "NUL" in error["message"], resp.text
    assert error["problems"][0]["loc"][0] == where and "\x00" not in resp.text


async def test_nul_in_ids_queries_and_stored_fields_is_422_on_postgresql(
    arbiter_factory: ArbiterFactory, payments: Payments, postgres_url: str
) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    server = _start(
        arbiter_factory, payments, database_url=postgres_url, secret_key=Fernet.generate_key().decode()
    )
    lead = new_key(server, "lena", ["billing-lead"])
    apr = tool_refusal(await _refund(server, MODERN))["approval_id"]
    with _api(server, lead) as api, server.admin() as admin:
        _assert_nul_refused(admin.get("/api-keys/x%00"), "path")
        _assert_nul_refused(admin.delete("/api-keys/x%00y"), "path")
        _assert_nul_refused(api.get("/approvals/apr_%00x"), "path")
        _assert_nul_refused(api.post("/approvals/apr_%00x/approve"), "path")
        _assert_nul_refused(admin.get("/audit/events", params={"subject": "a\x00b"}), "query")
        created = admin.post("/api-keys", json={"owner": "nul", "description": "a\x00b"})
        _assert_nul_refused(created, "body")
        _assert_nul_refused(api.post(f"/approvals/{apr}/approve", json={"note": "a\x00b"}), "body")
        assert api.get(f"/approvals/{apr}").json()["status"] == "pending"
        # Text that merely names the escape is fine, and so is the same request without a NUL.
        named = admin.post("/api-keys", json={"owner": "nul", "description": "escape: \\u0000"})
        assert named.status_code == 201, named.text
        assert api.post(f"/approvals/{apr}/approve", json={"note": "ok"}).status_code == 200
        assert api.get(f"/approvals/{apr}").json()["status"] == "approved"
    # A caller without a valid credential still learns nothing but 401.
    with _api(server, "arb_not_a_key") as anonymous:
        assert anonymous.get("/api-keys/x%00").status_code == 401


def test_bodies_the_routes_read_themselves_still_reach_them(arbiter_factory: ArbiterFactory) -> None:
    """A CSV import sent with curl's default form content type, a malformed multipart body, and the six
    characters \\u0000 in a CSV (text, not a NUL) are the routes' to answer, as before the NUL check."""
    server = arbiter_factory(policy=None)
    csv = "p, *, *, *, call, allow\n# \\u0000 is text here\n"
    with server.admin() as admin:
        imported = admin.post(
            "/policies/import", content=csv, headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert imported.status_code in (200, 201), imported.text
        assert [r["csv"] for r in admin.get("/policies").json()["rules"]] == ["p, *, *, *, call, allow"]
        broken = admin.post(
            "/api-keys", content=b"--x\r\nnope", headers={"content-type": "multipart/form-data; boundary=x"}
        )
        assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_input", broken.text
