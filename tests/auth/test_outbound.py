"""Arbiter's own credentials towards upstreams, proven by a recording upstream on a loopback port.

The upstream is a real MCP server behind an ASGI wrapper that records the headers of every HTTP request
it gets (and can refuse revoked tokens with 401). The OAuth token endpoint is a small Starlette app that
checks Arbiter's client credentials, mints tokens with ``expires_in`` and counts what it is asked for.
Every secret and token a test uses is collected; none may appear in the log output (DEBUG everywhere).
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet
from mcp.server import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from arbiter.auth.outbound import GRANT_TOKEN_EXCHANGE
from arbiter.proxy.body import replay_body
from tests.auth.jwks import ISSUER, MINTED, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread
from tests.refusals import tool_refusal

SECRETS: list[str] = []  # every secret or token the tests hand out or configure; none may be logged
CLIENT_ID = "arbiter-gateway"
CLIENT_SECRET = "cs-" + uuid.uuid4().hex
_LOUD = ("arbiter", "mcp", "httpx", "httpx2", "httpcore", "httpcore2", "authlib", "uvicorn")
SECRETS.append(CLIENT_SECRET)


def secret(prefix: str) -> str:
    value = f"{prefix}-{uuid.uuid4().hex}"
    SECRETS.append(value)
    return value


# --- the recording upstream ---------------------------------------------------------------------


@dataclass
class Seen:
    method: str | None  # the JSON-RPC method of a POST, None for GET/DELETE
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


class Recorder:
    """Records each HTTP request's headers; answers 401 to a revoked bearer token, like a resource server."""

    def __init__(self, app: ASGIApp, *, handshake_only: bool = False) -> None:
        self.app = app
        self.seen: list[Seen] = []
        self.revoked: set[str] = set()
        self.handshake_only = handshake_only  # answer like an mcp 1.x server: sessions, no 2026-07-28

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        method: Any = None
        if body:
            decoded: Any = json.loads(body)
            method = decoded.get("method") if isinstance(decoded, dict) else None
        self.seen.append(Seen(method if isinstance(method, str) else None, headers))
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if bearer in self.revoked:
            challenge = (b"www-authenticate", b'Bearer error="invalid_token"')
            await _respond(send, 401, b'{"error":"invalid_token"}', challenge)
            return
        if self.handshake_only and headers.get("mcp-protocol-version") == "2026-07-28":
            error = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"unsupported"}}'
            await _respond(send, 400, error)
            return
        await self.app(scope, replay_body(body, receive), send)

    def calls(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "tools/call"]

    def values(self) -> list[str]:
        return [v for s in self.seen for v in s.headers.values()]


async def _respond(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    start = [(b"content-type", b"application/json"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def recording_upstream(*, handshake_only: bool = False) -> Iterator[tuple[Recorder, str]]:
    server = MCPServer("recorder")

    @server.tool()
    def whoami() -> str:
        return "someone"

    recorder = Recorder(server.streamable_http_app(json_response=True), handshake_only=handshake_only)
    with serve_in_thread(recorder) as port:
        yield recorder, f"http://127.0.0.1:{port}/mcp"


@contextmanager
def recording_sse_upstream() -> Iterator[tuple[Recorder, str]]:
    server = MCPServer("recorder")

    @server.tool()
    def whoami() -> str:
        return "someone"

    recorder = Recorder(server.sse_app())
    with serve_in_thread(recorder) as port:
        yield recorder, f"http://127.0.0.1:{port}/sse"


@pytest.fixture
def upstream() -> Iterator[tuple[Recorder, str]]:
    with recording_upstream() as up:
        yield up


@pytest.fixture(params=["2026-07-28", "handshake"])
def any_era_upstream(request: pytest.FixtureRequest) -> Iterator[tuple[Recorder, str]]:
    """Per-caller sessions matter most for handshake-era upstreams, which bind a session to its opener."""
    with recording_upstream(handshake_only=request.param == "handshake") as up:
        yield up


# --- the token endpoint ----------------------------------------------------------------------------


@dataclass
class TokenServer:
    """An OAuth token endpoint: client credentials and RFC 8693 token exchange for one client."""

    expires_in: int = 3600
    refuse_subjects: set[str] = field(default_factory=set[str])
    grants: Counter[str] = field(default_factory=Counter[str])
    requests: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _client(self, request: Request, form: dict[str, str]) -> tuple[str, str]:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(value).decode().partition(":")
            return unquote(user), unquote(password)
        return form.get("client_id", ""), form.get("client_secret", "")

    async def token(self, request: Request) -> JSONResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.requests.append(form)
        if self._client(request, form) != (CLIENT_ID, CLIENT_SECRET):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = form.get("grant_type", "")
        self.grants[grant] += 1
        n = sum(self.grants.values())
        if grant == "client_credentials":
            token = f"cc-{uuid.uuid4().hex[:12]}-{n}"
        elif grant == GRANT_TOKEN_EXCHANGE:
            payload = form["subject_token"].split(".")[1]
            sub = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
            if sub in self.refuse_subjects:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            token = f"exchanged-for-{sub}-{uuid.uuid4().hex[:8]}-{n}"
        else:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        SECRETS.append(token)
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})


@pytest.fixture
def tokens() -> Iterator[TokenServer]:
    server = TokenServer()
    with serve_in_thread(Starlette(routes=[Route("/token", server.token, methods=["POST"])])) as port:
        server.port = port
        yield server


# --- the identity provider for JWT callers and the log check -----------------------------------------


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return rsa_key("outbound-1")


@pytest.fixture(scope="module")
def idp(idp_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(keys=[idp_key]).running() as server:
        yield server


def jwt_for(sub: str, key: SigningKey) -> str:
    return mint(claims(sub=sub, jti=uuid.uuid4().hex), key)


@pytest.fixture(autouse=True)
def nothing_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    # Set-up, the test, and the teardown so far (Arbiter servers stop before this fixture finishes).
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    assert records, "no log output was captured, so this check proves nothing"
    formatter = logging.Formatter()
    text = "\n".join(formatter.format(r) for r in records)
    leaked = [s for s in (*SECRETS, *MINTED) if s in text]
    assert not leaked, f"{len(leaked)} secret(s) appeared in the log output"


@pytest.fixture
def start(arbiter_factory: ArbiterFactory, caplog: pytest.LogCaptureFixture, idp: JwksServer) -> Any:
    """Start Arbiter (JWT callers accepted too), then turn every relevant logger up to DEBUG."""

    def run(**overrides: Any) -> ArbiterServer:
        auth = {"resource_url": RESOURCE, "issuers": [{"issuer": ISSUER, "jwks_uri": idp.url}]}
        server = arbiter_factory(**{"auth": auth, **overrides})
        SECRETS.append(server.agent_key)
        for name in _LOUD:  # create_app quiets the SDK and HTTP loggers; this test wants all of it
            caplog.set_level(logging.DEBUG, logger=name)
        return server

    return run


async def call(server: ArbiterServer, name: str, *, token: str | None = None, mode: str = "auto") -> Any:
    async with server.client(mode, token=token) as client:
        return await client.call_tool(f"{name}__whoami", {})


async def listed(server: ArbiterServer, tool: str) -> None:
    with anyio.fail_after(10):
        while True:
            async with server.client() as client:
                if tool in {t.name for t in (await client.list_tools()).tools}:
                    return
            await anyio.sleep(0.05)


def db_credential(sqlite_url: str, name: str) -> str:
    with sqlite3.connect(sqlite_url.split("///", 1)[1]) as conn:
        row = conn.execute("SELECT credential FROM upstreams WHERE name = ?", (name,)).fetchone()
    return str(row[0])


# --- none ------------------------------------------------------------------------------------------


async def test_no_credential_means_no_authorization_upstream_whoever_calls(
    start: Any, upstream: tuple[Recorder, str], idp_key: SigningKey
) -> None:
    recorder, url = upstream
    server = start()
    out = server.register("open", url)
    assert out["credential"] == {k: None for k in out["credential"]} | {"kind": "none"}
    jwt = jwt_for("alice", idp_key)
    for mode in ("legacy", "2026-07-28"):
        assert (await call(server, "open", mode=mode)).is_error is False  # with the agent's API key
        assert (await call(server, "open", token=jwt, mode=mode)).is_error is False  # with a JWT
    assert len(recorder.calls()) == 4
    assert all(s.authorization is None for s in recorder.seen)
    for caller_credential in (server.agent_key, jwt):
        assert not any(caller_credential in v for v in recorder.values())


# --- header ----------------------------------------------------------------------------------------


async def test_header_from_the_environment_for_a_configured_upstream(
    start: Any, upstream: tuple[Recorder, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, url = upstream
    value = "Bearer " + secret("env-header")
    monkeypatch.setenv("OUTBOUND_TEST_CRM_TOKEN", value)
    server = start(
        upstreams=[
            {
                "name": "crm",
                "url": url,
                "credential": {"kind": "header", "value_env": "OUTBOUND_TEST_CRM_TOKEN"},
            }
        ]
    )
    await listed(server, "crm__whoami")  # configured upstreams are discovered in the background
    assert (await call(server, "crm")).is_error is False
    assert recorder.seen and all(s.authorization == value for s in recorder.seen)
    assert server.agent_key not in "".join(recorder.values())
    with server.admin() as admin:
        [shown] = admin.get("/upstreams").json()
    assert shown["credential"]["kind"] == "header"
    assert shown["credential"]["value_env"] == "OUTBOUND_TEST_CRM_TOKEN"
    assert shown["credential"]["secret_source"] == "env"
    assert value.split()[1] not in json.dumps(shown)


async def test_inline_header_secret_is_stored_encrypted_and_never_shown(
    start: Any, upstream: tuple[Recorder, str], sqlite_url: str
) -> None:
    recorder, url = upstream
    key = Fernet.generate_key().decode()
    SECRETS.append(key)
    server = start(secret_key=key)
    api_key = secret("inline-api-key")
    responses: list[httpx.Response] = []
    with server.admin() as admin:
        credential = {"kind": "header", "header": "X-Api-Key", "value": api_key}
        responses.append(admin.post("/upstreams", json={"name": "crm", "url": url, "credential": credential}))
        assert responses[-1].status_code == 201, responses[-1].text
        upstream_id = responses[-1].json()["id"]
        assert (await call(server, "crm")).is_error is False
        assert recorder.seen and all(s.headers.get("x-api-key") == api_key for s in recorder.seen)
        assert all(s.authorization is None for s in recorder.seen)  # and nothing of the caller's

        # At rest: a Fernet token under Arbiter's key, not the secret.
        stored = db_credential(sqlite_url, "crm")
        assert api_key not in stored
        assert Fernet(key).decrypt(json.loads(stored)["value_sealed"].encode()).decode() == api_key

        # Patching other fields keeps the secret; so does restating the credential without it.
        responses.append(admin.patch(f"/upstreams/{upstream_id}", json={"call_timeout_s": 12}))
        assert responses[-1].status_code == 200, responses[-1].text
        header_only = {"kind": "header", "header": "X-Other-Key"}
        responses.append(admin.patch(f"/upstreams/{upstream_id}", json={"credential": header_only}))
        assert responses[-1].status_code == 200, responses[-1].text
        recorder.seen.clear()
        assert (await call(server, "crm")).is_error is False
        assert recorder.seen and all(s.headers.get("x-other-key") == api_key for s in recorder.seen)

        # Moving the upstream elsewhere does not take the stored secret along.
        responses.append(admin.patch(f"/upstreams/{upstream_id}", json={"url": url + "/"}))
        assert responses[-1].status_code == 422
        assert "credential again" in responses[-1].json()["error"]["message"]

        responses += [admin.get(f"/upstreams/{upstream_id}"), admin.get("/upstreams")]
        responses.append(admin.get("/openapi.json"))
    for resp in responses:
        assert api_key not in resp.text
        assert "value_sealed" not in resp.text
    shown = responses[-3].json()["credential"]
    assert (shown["kind"], shown["header"], shown["secret_source"]) == ("header", "X-Other-Key", "stored")


async def test_an_upstream_refusing_arbiters_header_is_reported_as_such(
    start: Any, upstream: tuple[Recorder, str]
) -> None:
    recorder, url = upstream
    key = Fernet.generate_key().decode()
    SECRETS.append(key)
    server = start(secret_key=key)
    wrong = secret("revoked-token")
    recorder.revoked.add(wrong)
    with server.admin() as admin:
        body = {"name": "crm", "url": url, "credential": {"kind": "header", "value": f"Bearer {wrong}"}}
        resp = admin.post("/upstreams", json=body)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_auth_failed"
    assert "refused Arbiter's credential (HTTP 401)" in resp.json()["error"]["message"]
    assert wrong not in resp.text
    # The era probe and the handshake each tried once, with the one static secret there is.
    assert {s.method for s in recorder.seen} == {"server/discover", "initialize"}
    assert all(s.authorization == f"Bearer {wrong}" for s in recorder.seen)


async def test_inline_secret_without_a_key_is_refused_with_what_to_do(
    start: Any, upstream: tuple[Recorder, str]
) -> None:
    _, url = upstream
    server = start()
    value = secret("no-key")
    with server.admin() as admin:
        body = {"name": "crm", "url": url, "credential": {"kind": "header", "value": value}}
        resp = admin.post("/upstreams", json=body)
        assert resp.status_code == 422
        message = resp.json()["error"]["message"]
        assert "ARBITER_SECRET_KEY" in message and "value_env" in message
        # Malformed credentials are refused without echoing what was sent.
        typo = admin.post(
            "/upstreams", json={"name": "crm", "url": url, "credential": {"kind": "headr", "value": value}}
        )
        extra = admin.post(
            "/upstreams",
            json={"name": "crm", "url": url, "credential": {"kind": "header", "value": value, "oops": value}},
        )
        # An admin may not point an upstream at Arbiter's own secrets.
        own = admin.post(
            "/upstreams",
            json={
                "name": "crm",
                "url": url,
                "credential": {"kind": "header", "value_env": "ARBITER_ADMIN_TOKEN"},
            },
        )
        both = admin.post(
            "/upstreams",
            json={
                "name": "crm",
                "url": url,
                "credential": {"kind": "header", "value": value, "value_env": "X"},
            },
        )
        assert admin.get("/upstreams").json() == []
    for refused in (resp, typo, extra, own, both):
        assert refused.status_code == 422, refused.text
        assert value not in refused.text
    assert "ARBITER_*" in own.json()["error"]["message"]


# --- client credentials ----------------------------------------------------------------------------


def cc_credential(tokens: TokenServer, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "client_credentials",
        "token_url": tokens.url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "audience": "https://crm.internal",
        "scope": "crm.read",
        **extra,
    }


async def test_client_credentials_token_is_fetched_once_and_reused(
    start: Any, upstream: tuple[Recorder, str], tokens: TokenServer, sqlite_url: str
) -> None:
    recorder, url = upstream
    key = Fernet.generate_key().decode()
    SECRETS.append(key)
    server = start(secret_key=key)
    created = server.register("crm", url, credential=cc_credential(tokens))
    assert CLIENT_SECRET not in json.dumps(created) and CLIENT_SECRET not in db_credential(sqlite_url, "crm")
    assert created["credential"]["client_id"] == CLIENT_ID
    assert created["credential"]["secret_source"] == "stored"
    assert tokens.grants == Counter({"client_credentials": 1})  # discovery at registration
    first = tokens.requests[0]
    assert (first["audience"], first["scope"]) == ("https://crm.internal", "crm.read")

    async with server.client() as client:
        for _ in range(5):
            assert (await client.call_tool("crm__whoami", {})).is_error is False
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(client.call_tool, "crm__whoami", {})
    assert tokens.grants["client_credentials"] == 1
    issued = {s.authorization for s in recorder.seen}
    assert len(issued) == 1 and (next(iter(issued)) or "").startswith("Bearer cc-")
    assert len(recorder.calls()) == 25
    assert server.agent_key not in "".join(recorder.values())


async def test_client_credentials_token_is_renewed_on_expiry_and_after_a_401(
    start: Any, upstream: tuple[Recorder, str], tokens: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, url = upstream
    monkeypatch.setenv("OUTBOUND_TEST_CLIENT_SECRET", CLIENT_SECRET)
    tokens.expires_in = 2  # renewed a little early: 1.8 s after it was fetched
    skew = [0.0]
    server = start(monotonic=lambda: time.monotonic() + skew[0])
    credential = cc_credential(tokens, client_secret=None, client_secret_env="OUTBOUND_TEST_CLIENT_SECRET")
    server.register("crm", url, credential=credential)
    async with server.client() as client:
        skew[0] = 2.1  # the token's lifetime passes on Arbiter's clock, not the test's
        before = tokens.grants["client_credentials"]
        tokens.expires_in = 3600  # from now on; the token Arbiter holds has expired
        async with anyio.create_task_group() as tg:  # many callers find it expired; one fetch serves all
            for _ in range(10):
                tg.start_soon(client.call_tool, "crm__whoami", {})
        assert tokens.grants["client_credentials"] == before + 1
        renewed = recorder.calls()[-1].authorization
        assert renewed is not None and all(s.authorization == renewed for s in recorder.calls()[-10:])

        # The upstream revokes the token: one 401, a new token, the same request again, success.
        recorder.revoked.add(renewed.removeprefix("Bearer "))
        recorder.seen.clear()
        result = await client.call_tool("crm__whoami", {})
        assert result.is_error is False
        assert tokens.grants["client_credentials"] == before + 2
        [refused, retried] = recorder.calls()
        assert refused.authorization == renewed
        assert retried.authorization not in (None, renewed)
        assert (await client.call_tool("crm__whoami", {})).is_error is False
        assert tokens.grants["client_credentials"] == before + 2


async def test_client_credentials_over_the_legacy_sse_transport(
    start: Any, tokens: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOUND_TEST_CLIENT_SECRET", CLIENT_SECRET)
    server = start()
    credential = cc_credential(tokens, client_secret=None, client_secret_env="OUTBOUND_TEST_CLIENT_SECRET")
    with recording_sse_upstream() as (recorder, url):
        server.register("old", url, transport="sse", credential=credential)
        assert (await call(server, "old")).is_error is False
    # The event stream (GET) and every message (POST) carried Arbiter's token, and only that.
    assert {s.method is None for s in recorder.seen} == {True, False}
    assert {s.authorization for s in recorder.seen} == {recorder.calls()[0].authorization}
    assert (recorder.calls()[0].authorization or "").startswith("Bearer cc-")
    assert tokens.grants["client_credentials"] == 1


async def test_a_token_endpoint_that_refuses_arbiter_fails_registration_cleanly(
    start: Any, upstream: tuple[Recorder, str], tokens: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, url = upstream
    wrong = secret("wrong-client-secret")
    monkeypatch.setenv("OUTBOUND_TEST_WRONG_SECRET", wrong)
    server = start()
    credential = cc_credential(tokens, client_secret=None, client_secret_env="OUTBOUND_TEST_WRONG_SECRET")
    with server.admin() as admin:
        resp = admin.post("/upstreams", json={"name": "crm", "url": url, "credential": credential})
        missing = admin.post(
            "/upstreams",
            json={
                "name": "crm",
                "url": url,
                "credential": cc_credential(
                    tokens, client_secret=None, client_secret_env="OUTBOUND_TEST_UNSET"
                ),
            },
        )
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_auth_failed"
    assert "invalid_client" in resp.json()["error"]["message"]
    assert wrong not in resp.text
    assert missing.status_code == 502
    assert "OUTBOUND_TEST_UNSET is not set" in missing.json()["error"]["message"]
    assert recorder.seen == []  # nothing went to the upstream without Arbiter's credential


# --- token exchange --------------------------------------------------------------------------------


async def test_token_exchange_gives_each_caller_their_own_upstream_token(
    start: Any,
    any_era_upstream: tuple[Recorder, str],
    tokens: TokenServer,
    idp_key: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, url = any_era_upstream
    monkeypatch.setenv("OUTBOUND_TEST_CLIENT_SECRET", CLIENT_SECRET)
    server = start()
    credential = {
        "kind": "token_exchange",
        "token_url": tokens.url,
        "client_id": CLIENT_ID,
        "client_secret_env": "OUTBOUND_TEST_CLIENT_SECRET",
        "audience": "https://crm.internal",
    }
    created = server.register("crm", url, credential=credential)
    assert created["credential"]["kind"] == "token_exchange"
    assert created["credential"]["client_secret_env"] == "OUTBOUND_TEST_CLIENT_SECRET"
    # Discovery has no caller: Arbiter lists the upstream with its own client-credentials token.
    assert tokens.grants == Counter({"client_credentials": 1})

    alice, bob = jwt_for("alice", idp_key), jwt_for("bob", idp_key)
    recorder.seen.clear()
    for mode in ("legacy", "2026-07-28"):
        assert (await call(server, "crm", token=alice, mode=mode)).is_error is False
    assert (await call(server, "crm", token=bob)).is_error is False
    assert tokens.grants[GRANT_TOKEN_EXCHANGE] == 2  # alice's exchanged token served both her calls
    exchanges = [r for r in tokens.requests if r.get("grant_type") == GRANT_TOKEN_EXCHANGE]
    assert [r["subject_token"] for r in exchanges] == [alice, bob]
    assert all(r["audience"] == "https://crm.internal" for r in exchanges)
    assert all(r["subject_token_type"] == "urn:ietf:params:oauth:token-type:access_token" for r in exchanges)

    seen = [s.authorization or "" for s in recorder.calls()]
    assert [s.removeprefix("Bearer ").rsplit("-", 2)[0] for s in seen] == [
        "exchanged-for-alice",
        "exchanged-for-alice",
        "exchanged-for-bob",
    ]
    assert seen[0] == seen[1] != seen[2]
    # Each caller's session carries only their token, from the handshake on; neither raw JWT went upstream.
    alice_token, bob_token = seen[0], seen[2]
    for s in recorder.seen:
        assert s.authorization in (alice_token, bob_token)
    if recorder.handshake_only:  # one upstream session per caller, each opened with that caller's token
        sessions = {s.authorization: s.headers.get("mcp-session-id") for s in recorder.calls()}
        assert None not in sessions.values() and len(set(sessions.values())) == 2
        for s in recorder.seen:
            assert s.headers.get("mcp-session-id") in (None, sessions[s.authorization])
    values = "".join(recorder.values())
    assert alice not in values and bob not in values

    # An API key cannot be exchanged: the call is refused, and nothing reaches the upstream.
    recorder.seen.clear()
    async with server.client() as client:
        refused = await client.session.call_tool("crm__whoami", {})
    refusal = tool_refusal(refused)
    assert refusal["reason"] == "caller_token_required" and refusal["upstream"] == "crm"
    assert recorder.calls() == []

    # The authorization server may refuse a caller: that caller gets a clear refusal, others carry on.
    tokens.refuse_subjects.add("mallory")
    async with server.client(token=jwt_for("mallory", idp_key)) as client:
        refused = await client.session.call_tool("crm__whoami", {})
    refusal = tool_refusal(refused)
    assert refusal["reason"] == "token_exchange_refused" and refusal["upstream"] == "crm"
    assert (await call(server, "crm", token=bob)).is_error is False


async def test_caller_sessions_are_bounded(
    start: Any,
    upstream: tuple[Recorder, str],
    tokens: TokenServer,
    idp_key: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, url = upstream
    monkeypatch.setenv("OUTBOUND_TEST_CLIENT_SECRET", CLIENT_SECRET)
    server = start(upstream={"caller_sessions_max": 2, "caller_session_idle_s": 0.5})
    credential = {
        "kind": "token_exchange",
        "token_url": tokens.url,
        "client_id": CLIENT_ID,
        "client_secret_env": "OUTBOUND_TEST_CLIENT_SECRET",
    }
    server.register("crm", url, credential=credential)
    shared = server.app.state.runtime.pool.get("crm")
    callers = shared.callers
    assert callers is not None
    ann, ben, cat = (jwt_for(name, idp_key) for name in ("ann", "ben", "cat"))
    await call(server, "crm", token=ann)
    [ann_session] = callers.clients()
    assert ann_session.connected
    await call(server, "crm", token=ben)
    await call(server, "crm", token=cat)
    assert len(callers) == 2
    assert not ann_session.connected  # the least recently used session was closed, not just dropped
    # ann is served again, on a new session with a new exchange.
    await call(server, "crm", token=ann)
    assert tokens.grants[GRANT_TOKEN_EXCHANGE] == 4
    assert len(callers) == 2
    seen = [s.authorization for s in recorder.calls()]
    assert seen[-1] != seen[0]  # ann's first and second exchanged tokens
    # Unused sessions are closed after the idle timeout.
    sessions = callers.clients()
    with anyio.fail_after(10):  # the pool's sweep runs on its own timer, in Arbiter's thread
        while True:
            if len(callers) == 0 and not any(s.connected for s in sessions):
                break
            await anyio.sleep(0.05)
    assert len(callers) == 0 and not any(s.connected for s in sessions)
