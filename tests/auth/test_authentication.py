"""Authentication end to end: Arbiter on a loopback port, real JWTs signed with keys the tests made and
published by a JWKS server on loopback, real API keys, a recording upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.server import MCPServer
from starlette.types import Receive, Scope, Send

from tests.auth.jwks import ISSUER, MINTED, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key
from tests.conftest import INITIALIZE, ArbiterFactory, ArbiterServer, Recorder, serve_in_thread

MODERN = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/list",
}
LIST_BODY = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    },
}
SECRETS: list[str] = []  # every API key the tests handle; none may reach a log line


class RecordingUpstream:
    """A real MCP server that records the Authorization header of every HTTP request it receives."""

    def __init__(self) -> None:
        server = MCPServer("recorder")

        @server.tool()
        def whoami() -> str:
            return "an upstream tool result"

        self.app = server.streamable_http_app(stateless_http=True, json_response=True)
        self.seen: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            value = headers.get(b"authorization")
            self.seen.append(value.decode() if value is not None else None)
        await self.app(scope, receive, send)


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    text = caplog.text
    for secret in filter(None, [*MINTED, *SECRETS]):
        assert secret not in text, "a credential reached the logs"
        signature = secret.rsplit(".", 1)[-1]
        assert not signature or signature not in text  # not even a JWT's signature


@pytest.fixture
def idp() -> Iterator[tuple[JwksServer, SigningKey]]:
    key = rsa_key("k1")
    jwks = JwksServer(keys=[key])
    with jwks.running():
        yield jwks, key


@pytest.fixture
def upstream() -> Iterator[tuple[RecordingUpstream, str]]:
    rec = RecordingUpstream()
    with serve_in_thread(rec) as port:
        yield rec, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture
def secured(
    arbiter_factory: ArbiterFactory,
    idp: tuple[JwksServer, SigningKey],
    upstream: tuple[RecordingUpstream, str],
) -> tuple[ArbiterServer, Recorder]:
    jwks, _ = idp
    recorder = Recorder()
    server = arbiter_factory(
        interceptors=[recorder],
        auth={
            "resource_url": RESOURCE,
            "required_scopes": ["mcp"],
            "jwks_refresh_cooldown_s": 0,
            "issuers": [{"issuer": ISSUER, "jwks_uri": jwks.url, "roles_claim": "realm_access.roles"}],
        },
        upstream={"maintain_interval_s": 0.2},
    )
    SECRETS.append(server.agent_key)
    server.register("rec", upstream[1])
    return server, recorder


def _post(
    server: ArbiterServer, token: str | None, *, origin: str | None = None, query: str = ""
) -> httpx.Response:
    headers = dict(MODERN)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if origin is not None:
        headers["origin"] = origin
    with httpx.Client(timeout=10) as http:
        return http.post(server.mcp_url + query, content=json.dumps(LIST_BODY), headers=headers)


def good(**overrides: Any) -> dict[str, Any]:
    return claims(scope="mcp tools", **overrides)


def test_valid_jwt_and_api_key_both_work_and_become_principals(
    secured: tuple[ArbiterServer, Recorder], idp: tuple[JwksServer, SigningKey]
) -> None:
    server, recorder = secured
    _, key = idp
    token = mint(good(tenant="acme", realm_access={"roles": ["support-agent"]}, client_id="agent-app"), key)
    assert _post(server, token).status_code == 200
    assert _post(server, server.agent_key).status_code == 200
    jwt_principal, key_principal = [c.principal for c in recorder.calls]
    assert jwt_principal is not None and key_principal is not None
    assert (jwt_principal.subject, jwt_principal.issuer, jwt_principal.tenant) == ("user-1", ISSUER, "acme")
    assert jwt_principal.roles == {"support-agent"} and jwt_principal.client_id == "agent-app"
    assert jwt_principal.auth_method == "jwt" and "mcp" in jwt_principal.scopes
    assert (key_principal.subject, key_principal.auth_method, key_principal.roles) == (
        "test-agent",
        "api_key",
        {"agent"},
    )


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("no token", 401, None),
        ("expired", 401, "invalid_token"),
        ("nbf in the future", 401, "invalid_token"),
        ("bad signature", 401, "invalid_token"),
        ("wrong issuer", 401, "invalid_token"),
        ("wrong audience", 401, "invalid_token"),
        ("missing aud", 401, "invalid_token"),
        ("missing exp", 401, "invalid_token"),
        ("alg none", 401, "invalid_token"),
        ("HS256 with the RSA public key", 401, "invalid_token"),
        ("own jwk header", 401, "invalid_token"),
        ("garbage", 401, "invalid_token"),
        ("lacking the required scope", 403, "insufficient_scope"),
        ("token in the query string", 400, "invalid_request"),
        ("bad Origin", 403, None),
    ],
)
def test_bad_credentials_are_refused_before_anything_runs(
    secured: tuple[ArbiterServer, Recorder],
    idp: tuple[JwksServer, SigningKey],
    upstream: tuple[RecordingUpstream, str],
    case: str,
    status: int,
    error: str | None,
) -> None:
    server, recorder = secured
    _, key = idp
    attacker = rsa_key("k1")  # same kid as the published key, different private key
    pem = key.jwk.as_pem(private=False)
    tokens: dict[str, str | None] = {
        "no token": None,
        "expired": mint(good(exp=1_000_000_000), key),
        "nbf in the future": mint(good(nbf=4_000_000_000), key),
        "bad signature": mint(good(), attacker),
        "wrong issuer": mint(good(iss="https://evil.test/"), key),
        "wrong audience": mint(good(aud="https://someone-else.test/mcp"), key),
        "missing aud": mint(good(aud=None), key),
        "missing exp": mint(good(exp=None), key),
        "alg none": mint(good(), None, alg="none", header={"kid": "k1"}),
        "HS256 with the RSA public key": mint(
            good(), None, alg="HS256", header={"kid": "k1"}, hmac_secret=pem
        ),
        "own jwk header": mint(good(), attacker, header={"jwk": attacker.public_jwk()}),
        "garbage": "not-a-credential",
        "lacking the required scope": mint(claims(scope="tools"), key),
        "token in the query string": server.agent_key,
        "bad Origin": server.agent_key,
    }
    calls_before = len(upstream[0].seen)
    resp = _post(
        server,
        tokens[case],
        origin="http://evil.example" if case == "bad Origin" else None,
        query=f"?access_token={server.agent_key}" if case == "token in the query string" else "",
    )
    assert resp.status_code == status, resp.text
    if status != 403 or error is not None:
        challenge = resp.headers["www-authenticate"]
        assert (
            'resource_metadata="https://arbiter.test/.well-known/oauth-protected-resource/mcp"' in challenge
        )
        assert 'scope="mcp"' in challenge
        if error is not None:
            assert f'error="{error}"' in challenge
    assert [c.principal for c in recorder.calls] == [] and len(upstream[0].seen) == calls_before


def test_revoked_and_expired_api_keys_are_refused_on_every_replica(
    secured: tuple[ArbiterServer, Recorder], arbiter_factory: ArbiterFactory
) -> None:
    server, _ = secured
    other = arbiter_factory(
        database_url=server.settings.database_url,
        upstream={"maintain_interval_s": 0.2},
        auth=server.settings.auth,
    )
    with server.admin() as admin:
        created = admin.post("/api-keys", json={"owner": "ci-bot", "roles": ["agent"]}).json()
        short = admin.post("/api-keys", json={"owner": "temp", "roles": ["agent"], "expires_in_s": 1}).json()
    SECRETS.extend([created["key"], short["key"]])
    assert "key" not in admin_get(server, f"/api-keys/{created['id']}")  # shown once, never again
    _wait(lambda: _post(other, created["key"]).status_code == 200)
    with server.admin() as admin:
        assert admin.delete(f"/api-keys/{created['id']}").status_code == 204
    assert _post(server, created["key"]).status_code == 401  # at once where it was revoked
    _wait(lambda: _post(other, created["key"]).status_code == 401)  # and on the other replica soon after
    _wait(lambda: _post(server, short["key"]).status_code == 401)  # expiry needs no admin action
    listed = {k["id"]: k for k in admin_get(server, "/api-keys")}
    assert listed[created["id"]]["revoked_at"] is not None


def admin_get(server: ArbiterServer, path: str) -> Any:
    with server.admin() as admin:
        return admin.get(path).json()


def _wait(check: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


async def test_unknown_kid_floods_cost_one_jwks_fetch(
    arbiter_factory: ArbiterFactory, idp: tuple[JwksServer, SigningKey]
) -> None:
    jwks, key = idp
    server = arbiter_factory(
        auth={
            "resource_url": RESOURCE,
            "jwks_refresh_cooldown_s": 60,
            "issuers": [{"issuer": ISSUER, "jwks_uri": jwks.url}],
        }
    )
    SECRETS.append(server.agent_key)
    token = mint(good(), rsa_key("unknown-kid"))
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as http:
        sem = asyncio.Semaphore(50)

        async def one() -> int:
            async with sem:
                headers = {**MODERN, "authorization": f"Bearer {token}"}
                resp = await http.post(server.mcp_url, content=json.dumps(LIST_BODY), headers=headers)
                return resp.status_code

        statuses = await asyncio.gather(*(one() for _ in range(1000)))
    assert set(statuses) == {401}
    assert jwks.fetches == 1
    assert _post(server, mint(good(), key)).status_code == 200  # the published key works, from cache
    assert jwks.fetches == 1


def test_key_rotation_and_jwks_outage(
    secured: tuple[ArbiterServer, Recorder], idp: tuple[JwksServer, SigningKey]
) -> None:
    server, _ = secured
    jwks, key = idp
    assert _post(server, mint(good(), key)).status_code == 200
    rotated = rsa_key("k2")
    jwks.publish(rotated)  # the IdP rotates; Arbiter is not restarted
    assert _post(server, mint(good(), rotated)).status_code == 200
    jwks.status = 500  # the IdP's JWKS endpoint goes down: cached keys keep working
    assert _post(server, mint(good(), key)).status_code == 200
    assert _post(server, mint(good(), rotated)).status_code == 200
    assert _post(server, mint(good(), rsa_key("k3"))).status_code == 401


def test_the_upstream_never_sees_the_callers_credential(
    secured: tuple[ArbiterServer, Recorder],
    idp: tuple[JwksServer, SigningKey],
    upstream: tuple[RecordingUpstream, str],
) -> None:
    server, _ = secured
    _, key = idp
    token = mint(good(), key)
    for credential in (token, server.agent_key):
        body = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "rec__whoami", "arguments": {}, "_meta": LIST_BODY["params"]["_meta"]},
        }
        headers = {
            **MODERN,
            "mcp-method": "tools/call",
            "mcp-name": "rec__whoami",
            "authorization": f"Bearer {credential}",
        }
        with httpx.Client(timeout=10) as http:
            resp = http.post(server.mcp_url, content=json.dumps(body), headers=headers)
        assert resp.json()["result"]["content"][0]["text"] == "an upstream tool result"
    seen = upstream[0].seen
    assert seen, "the upstream was called"
    assert all(value is None for value in seen), (
        seen
    )  # no credential configured: none sent, least of all ours


def test_handshake_sessions_belong_to_the_principal_that_opened_them(
    secured: tuple[ArbiterServer, Recorder],
) -> None:
    server, _ = secured
    with server.admin() as admin:
        other_key = admin.post("/api-keys", json={"owner": "other-agent", "roles": ["agent"]}).json()["key"]
    SECRETS.append(other_key)
    base = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    with httpx.Client(timeout=10) as http:
        session = _open_session(http, server).headers["mcp-session-id"]
        hdrs = {**base, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        mine = http.post(
            server.mcp_url, json=listing, headers={**hdrs, "authorization": f"Bearer {server.agent_key}"}
        )
        theirs = http.post(
            server.mcp_url, json=listing, headers={**hdrs, "authorization": f"Bearer {other_key}"}
        )
    assert mine.status_code == 200
    assert theirs.status_code == 404  # exactly as if the session did not exist


def test_protected_resource_metadata(secured: tuple[ArbiterServer, Recorder]) -> None:
    server, _ = secured
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            body = http.get(path).json()
            assert body["resource"] == RESOURCE
            assert body["authorization_servers"] == [ISSUER]
            assert body["scopes_supported"] == ["mcp"]
            assert body["bearer_methods_supported"] == ["header"]


def _open_session(http: httpx.Client, server: ArbiterServer) -> httpx.Response:
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "authorization": f"Bearer {server.agent_key}",
    }
    return http.post(server.mcp_url, json=INITIALIZE, headers=headers)


def test_sessions_expire_when_idle_and_are_capped(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(mcp={"max_sessions": 2, "session_idle_timeout_s": 1.0})
    SECRETS.append(server.agent_key)
    with httpx.Client(timeout=10) as http:
        first, second = _open_session(http, server), _open_session(http, server)
        assert first.status_code == second.status_code == 200
        assert _open_session(http, server).status_code == 503  # the cap holds
        session = first.headers["mcp-session-id"]
        assert _ping(http, server, session) == 200
        time.sleep(2.5)  # idle past the 1 s timeout (any request would reset the idle clock, so no polling)
        assert _ping(http, server, session) == 404
        assert _open_session(http, server).status_code == 200  # and its place is free again


def _ping(http: httpx.Client, server: ArbiterServer, session: str) -> int:
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "authorization": f"Bearer {server.agent_key}",
        "mcp-session-id": session,
        "mcp-protocol-version": "2025-11-25",
    }
    return http.post(
        server.mcp_url, json={"jsonrpc": "2.0", "id": 9, "method": "ping"}, headers=headers
    ).status_code


@pytest.mark.parametrize(
    "iss",
    [[], {}, [ISSUER], {"iss": ISSUER}, 1, True, 1.5, [[[]]]],
    ids=["empty-list", "empty-object", "list", "object", "int", "bool", "float", "nested"],
)
def test_a_token_whose_issuer_is_not_a_string_is_refused_and_audited(
    secured: tuple[ArbiterServer, Recorder], idp: tuple[JwksServer, SigningKey], iss: object
) -> None:
    from tests.audit.helpers import of_kind, wait_for

    server, recorder = secured
    _, key = idp
    tokens = [
        "e30.eyJpc3MiOltdfQ.x",  # {} . {"iss": []} . junk, exactly as probed
        mint(good(iss=iss), key),  # validly signed, the claim of the wrong type
        mint(good(iss=iss), None, alg="none"),
    ]
    for token in tokens:
        mcp = _post(server, token)
        with server.admin(token) as admin:
            listing = admin.get("/upstreams")
        for resp in (mcp, listing):
            assert resp.status_code == 401, resp.text
            assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert recorder.calls == []
    refused = of_kind(wait_for(server, lambda r: len(of_kind(r, "auth")) >= 2 * len(tokens)), "auth")
    assert {r["reason"] for r in refused} == {"invalid_token"}
    assert {r["method"] for r in refused} == {"tools/list", "GET /admin/v1/upstreams"}
