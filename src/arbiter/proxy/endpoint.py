"""The ``/mcp`` ASGI endpoint: Host/Origin check, authentication, bounded body, JSON-RPC shape and header
checks, then the SDK transport.

Authentication happens here, before any body is read: a request without a valid credential costs no
parsing. The principal rides in the ASGI scope to the MCP handlers; ``scope["user"]`` binds
handshake-era sessions to it (the SDK answers 404 to anyone else presenting that session id).

The SDK validates 2026-07-28 requests' ``Mcp-*`` headers against the body itself; for handshake-era
requests it does not, so this layer applies the same rule to any ``Mcp-Method``/``Mcp-Name`` a client
sends. Routing reads only the body; a header that disagrees with it is rejected before anything runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, cast

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import MCP_METHOD_HEADER, MCP_NAME_HEADER, NAME_BEARING_METHODS, decode_header_value
from mcp_types import HEADER_MISMATCH, INVALID_REQUEST, PARSE_ERROR
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import SecretStr
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from arbiter.audit.events import auth_event
from arbiter.audit.writer import AuditWriter
from arbiter.auth.authenticator import Authenticator, CredentialInQuery
from arbiter.auth.outbound import CALLER_TOKEN_KEY
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError, AuditUnavailable, InsufficientScope, Unauthorized

_PROTOCOL_HEADER = "mcp-protocol-version"
PRINCIPAL_KEY = "arbiter.principal"


class McpEndpoint:
    def __init__(
        self,
        manager: StreamableHTTPSessionManager,
        *,
        max_body_bytes: int,
        authenticator: Authenticator,
        security: TransportSecuritySettings,
        audit: AuditWriter,
    ) -> None:
        self._manager = manager
        self._audit = audit
        self._max_body = max_body_bytes
        self._auth = authenticator
        self._security = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._manager.handle_request(scope, receive, send)
            return
        # DNS-rebinding protection first: a browser page must not even learn whether a credential works.
        request = Request(scope)
        refused = await self._security.validate_request(request)
        if refused is not None:
            await refused(scope, receive, send)
            return
        headers = request.headers  # parsed once, for every check below
        authorization = headers.get("authorization")
        try:
            principal = await self._auth.authenticate(authorization, scope.get("query_string", b""))
        except (Unauthorized, InsufficientScope, CredentialInQuery) as exc:
            self._audit.offer(auth_event(exc, scope, headers.get(MCP_METHOD_HEADER) or scope["method"]))
            await _refuse(send, exc, self._auth.challenge(exc))
            return
        if self._audit.refusing:
            # Fail closed: nothing runs while its record could not be stored.
            await _audit_unavailable(send)
            return
        scope[PRINCIPAL_KEY] = principal
        scope["user"] = _session_owner(principal)
        if principal.auth_method == "jwt":
            # For token-exchange upstreams only (auth/outbound.py): the caller's JWT, masked (SecretStr),
            # is the RFC 8693 subject token. Nothing else reads it, and it is never logged or forwarded.
            scope[CALLER_TOKEN_KEY] = SecretStr((authorization or "").partition(" ")[2].strip())
        if scope["method"] != "POST" or headers.get(_PROTOCOL_HEADER) in MODERN_PROTOCOL_VERSIONS:
            # The SDK checks 2026-07-28 requests itself (body size, JSON, batches, the Mcp-* header ladder).
            await self._manager.handle_request(scope, receive, send)
            return
        body = await _read_body(receive, self._max_body)
        if body is None:
            await _error(send, 413, INVALID_REQUEST, f"Request body exceeds {self._max_body} bytes")
            return
        problem = _check(body, headers)
        if problem is not None:
            await _error(send, *problem)
            return
        await self._manager.handle_request(scope, replay_body(body, receive), send)


def _check(body: bytes, headers: Mapping[str, str]) -> tuple[int, int, str] | None:
    try:
        decoded: Any = json.loads(body)
    except (ValueError, RecursionError):
        return 400, PARSE_ERROR, "Parse error: the body is not valid JSON"
    if isinstance(decoded, list):
        return 400, INVALID_REQUEST, "Invalid request: JSON-RPC batches are not supported"
    if not isinstance(decoded, dict):
        return 400, INVALID_REQUEST, "Invalid request: the body must be a JSON-RPC object"
    message = cast(dict[str, Any], decoded)
    method: Any = message.get("method")
    header_method = headers.get(MCP_METHOD_HEADER)
    if header_method is not None and header_method != method:
        return 400, HEADER_MISMATCH, "Mcp-Method header does not match the request body's method"
    header_name = headers.get(MCP_NAME_HEADER)
    if header_name is not None:
        key = NAME_BEARING_METHODS.get(method) if isinstance(method, str) else None
        params: Any = message.get("params")
        body_name: Any = (
            cast(dict[str, Any], params).get(key) if key is not None and isinstance(params, dict) else None
        )
        if body_name is None or decode_header_value(header_name) != body_name:
            return 400, HEADER_MISMATCH, "Mcp-Name header does not match the request body"
    return None


@functools.lru_cache(maxsize=4096)  # per principal, not per request: pydantic models cost on the hot path
def _session_owner(principal: Principal) -> AuthenticatedUser:
    # The SDK binds a session to (client id, issuer, subject) of the user that opened it. No token is
    # kept: the credential itself never leaves this function.
    token = AccessToken(
        token="",
        client_id=principal.client_id or "",
        scopes=sorted(principal.scopes),
        subject=principal.subject,
        claims={"iss": principal.issuer},
    )
    return AuthenticatedUser(token)


async def _refuse(send: Send, exc: ArbiterError, challenge: str) -> None:
    payload = json.dumps({"error": exc.code, "error_description": exc.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out an already-read body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads see the client's disconnect, as the transport expects

    return replay


async def _audit_unavailable(send: Send) -> None:
    exc = AuditUnavailable("the audit log cannot store records right now; try again shortly")
    error = exc.to_mcp_error().error
    body = {"code": error.code, "message": error.message, "data": error.data}
    await _error(send, exc.http_status, error.code, error.message, body=body, retry_after="1")


async def _error(
    send: Send,
    status: int,
    code: int,
    message: str,
    *,
    body: dict[str, Any] | None = None,
    retry_after: str | None = None,
) -> None:
    error = body if body is not None else {"code": code, "message": message}
    payload = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
