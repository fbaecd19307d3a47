"""The ``/mcp`` ASGI endpoint: Host/Origin check, authentication, media type and a body bounded in size and
time, JSON-RPC shape and header checks, then the direct 2026-07-28 path (``front.py``) or the SDK transport.

Authentication happens here, before any body is read: a request without a valid credential costs no
parsing. What this layer learns (the principal, a JWT caller's token, the body, why it refused) rides in
one ``Exchange`` in the ASGI scope to the MCP handlers and back; ``scope["user"]`` binds handshake-era
sessions to the principal (the SDK answers 404 to anyone else presenting that session id), and
``CALLER`` carries it to SDK callbacks that see no scope (the Mcp-Param header check).

The SDK validates 2026-07-28 requests' ``Mcp-*`` headers against the body itself; for handshake-era
requests it does not, so this layer applies the same rule to any ``Mcp-Method``/``Mcp-Name`` a client
sends. Routing reads only the body; a header that disagrees with it is rejected before anything runs.
An authenticated request refused here or by the SDK, before the pipeline, is audited all the same.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any, cast

import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import MCP_METHOD_HEADER, MCP_NAME_HEADER, NAME_BEARING_METHODS, decode_header_value
from mcp_types import HEADER_MISMATCH, INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import SecretStr
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from arbiter.audit.events import auth_event
from arbiter.audit.writer import AuditWriter
from arbiter.auth.authenticator import Authenticator, CredentialInQuery
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError, AuditUnavailable, InsufficientScope, Unauthorized
from arbiter.proxy.body import ClientGone, Refusal, check_headers, read_body, replay_body
from arbiter.proxy.exchange import CALLER, EXCHANGE_KEY, Exchange
from arbiter.proxy.front import ModernFront, decode
from arbiter.proxy.handshake_front import HandshakeFront
from arbiter.proxy.refusal import ResponseWatch, refusal_event

log = logging.getLogger(__name__)

_PROTOCOL_HEADER = "mcp-protocol-version"


class McpEndpoint:
    def __init__(
        self,
        manager: StreamableHTTPSessionManager,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        authenticator: Authenticator,
        time_authentication: bool = False,
        security: TransportSecuritySettings,
        audit: AuditWriter,
        front: ModernFront | None = None,
        handshake: HandshakeFront | None = None,
    ) -> None:
        self._manager = manager
        self._front = front  # answers 2026-07-28 requests for the pipeline's methods without the SDK
        self._handshake = handshake  # the same for handshake-era requests on established sessions
        self._audit = audit
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_s
        self._auth = authenticator
        self._time_auth = time_authentication  # traces on: authentication gets a span (its times)
        self._security = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._manager.handle_request(scope, receive, send)
            return
        watch = ResponseWatch(scope, send)
        try:
            await self._serve(scope, receive, watch)
        except Exception:
            # The top-level handler of /mcp: log, answer if nothing was sent yet, keep the connection.
            log.exception("internal error while serving %s /mcp", scope["method"])
            if not watch.status:
                await _error(watch, 500, INTERNAL_ERROR, "Internal error")
        exchange = watch.exchange
        if exchange is not None and not exchange.audited:
            self._record_refusal(exchange, scope, watch)

    async def _serve(self, scope: Scope, receive: Receive, watch: ResponseWatch) -> None:
        # DNS-rebinding protection first: a browser page must not even learn whether a credential works.
        request = Request(scope)
        refused = await self._security.validate_request(request)
        if refused is not None:
            await refused(scope, receive, watch)
            return
        headers = request.headers  # parsed once, for every check below
        authorization = headers.get("authorization")
        auth_started = time.time_ns() if self._time_auth else 0
        try:
            principal = await self._auth.authenticate(authorization, scope.get("query_string", b""))
        except (Unauthorized, InsufficientScope, CredentialInQuery) as exc:
            self._audit.offer(auth_event(exc, scope, headers.get(MCP_METHOD_HEADER) or scope["method"]))
            await _refuse(watch, exc, self._auth.challenge(exc))
            return
        if self._audit.refusing:
            # Fail closed: nothing runs while its record could not be stored.
            await _audit_unavailable(watch)
            return
        exchange = Exchange(principal)
        if self._time_auth:
            exchange.auth_ns = (auth_started, time.time_ns())
        if principal.auth_method == "jwt":
            # For token-exchange upstreams only (auth/outbound.py): the caller's JWT, masked (SecretStr),
            # is the RFC 8693 subject token. Nothing else reads it, and it is never logged or forwarded.
            exchange.caller_token = SecretStr((authorization or "").partition(" ")[2].strip())
        scope[EXCHANGE_KEY] = watch.exchange = exchange
        scope["user"] = _session_owner(principal)
        token = CALLER.set(principal)
        try:
            if scope["method"] != "POST":
                await self._manager.handle_request(scope, receive, watch)
                return
            problem = await self._post(request, receive, watch, exchange)
            if problem is not None:
                await _error(watch, problem.status, problem.code, problem.message, close=problem.close)
                exchange.refusal_reason = problem.reason
        finally:
            CALLER.reset(token)

    async def _post(
        self, request: Request, receive: Receive, send: Send, exchange: Exchange
    ) -> Refusal | None:
        """Answer a well-formed POST (directly, or through the SDK), or say why it is refused."""
        scope, headers = request.scope, request.headers
        problem = check_headers(headers, self._max_body)
        if problem is not None:
            return problem
        try:
            body = await read_body(receive, self._max_body, self._body_timeout)
        except ClientGone:
            exchange.client_gone = True
            return None
        if isinstance(body, Refusal):
            return body
        exchange.body = body  # what a refusal's record names (a reference, not a copy)
        if _SURROGATE_ESCAPE.search(body) is not None and _lone_surrogate(body):
            return Refusal(
                400, PARSE_ERROR, "Parse error: the body holds an unpaired UTF-16 surrogate", "parse_error"
            )
        if headers.get(_PROTOCOL_HEADER) in MODERN_PROTOCOL_VERSIONS:
            message = self._front.takes(body) if self._front is not None else None
            if message is not None and self._front is not None:
                await self._front(request, receive, send, message, exchange)
                return None
            if _non_finite(body):  # the SDK's parser would read it (and forward NaN as null)
                return _NON_FINITE_REFUSAL
        else:
            # The SDK checks 2026-07-28 bodies itself (JSON, batches, ids, the Mcp-* header ladder).
            message = decode(body)  # parsed once, for the checks and the direct path
            problem = _check(body, headers) if message is None else _check_message(message, headers)
            if problem is not None:
                return problem
            if (
                message is not None
                and self._handshake is not None
                and await self._handshake.serve(request, receive, send, message, exchange)
            ):
                return None
        await self._manager.handle_request(scope, replay_body(body, receive), send)
        return None

    def _record_refusal(self, exchange: Exchange, scope: Scope, watch: ResponseWatch) -> None:
        principal = exchange.principal
        if exchange.client_gone:
            event = refusal_event(principal, scope, 0, None, "the client disconnected", None, "cancelled")
            self._audit.offer(event)
            return
        found = watch.error()
        if found is None:
            return  # protocol bookkeeping that succeeded (initialize, ping, notifications): nothing decided
        code, message = found
        self._audit.offer(
            refusal_event(
                principal, scope, watch.status, code, message, exchange.body, exchange.refusal_reason
            )
        )


# A JSON escape of a UTF-16 surrogate; only a body holding one is decoded to look for an unpaired one.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(body: bytes) -> bool:
    """Whether the JSON ``body`` holds an unpaired surrogate escape, which no UTF-8 text (and so no audit
    record) can represent. orjson refuses those, and only those, with a message naming them."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return "surrogate" in str(exc)
    return False


# JSON (RFC 8259) has no NaN or infinities, but Python's json and the SDK's parser read the constants
# NaN, Infinity and -Infinity, and read a number too large for a double as an infinity. Such a value
# compares false with everything (so a policy condition on it would not match) and is forwarded as
# null: a body holding one is refused as unparseable. orjson refuses every one of them, so only a body
# orjson cannot decode is looked at, and only if it holds something that could be one.
# An exponent of three digits, or (an exponent of at most 99 needs) 210 digits in a row, anchored so that
# a long run of digits is scanned once, not from every offset.
_NON_FINITE_HINT = re.compile(rb"NaN|Infinity|[eE]\+?\d{3}|(?<![0-9])\d{210}")
_NON_FINITE_REFUSAL = Refusal(
    400,
    PARSE_ERROR,
    "Parse error: the body holds NaN, an infinity or a number too large for a double, which JSON has not",
    "parse_error",
)


class _NonFinite(ValueError):
    """A non-finite number met while decoding a body (raised by the decoder's hooks)."""


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _strict_loads(body: bytes) -> Any:
    """``body`` decoded as Python's json does, but raising ``_NonFinite`` for a non-finite number."""
    return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)


def _non_finite(body: bytes) -> bool:
    """Whether the JSON ``body`` holds a non-finite number (other invalid JSON is not this check's)."""
    if _NON_FINITE_HINT.search(body) is None:
        return False
    try:
        orjson.loads(body)
        return False  # orjson decodes no non-finite number
    except orjson.JSONDecodeError:
        pass
    try:
        _strict_loads(body)
    except _NonFinite:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def _check(body: bytes, headers: Mapping[str, str]) -> Refusal | None:
    try:
        decoded: Any = _strict_loads(body)
    except _NonFinite:
        return _NON_FINITE_REFUSAL
    except (ValueError, RecursionError):
        return Refusal(400, PARSE_ERROR, "Parse error: the body is not valid JSON", "parse_error")
    if isinstance(decoded, list):
        return Refusal(
            400, INVALID_REQUEST, "Invalid request: JSON-RPC batches are not supported", "invalid_request"
        )
    if not isinstance(decoded, dict):
        return Refusal(
            400, INVALID_REQUEST, "Invalid request: the body must be a JSON-RPC object", "invalid_request"
        )
    return _check_message(cast(dict[str, Any], decoded), headers)


def _check_message(message: dict[str, Any], headers: Mapping[str, str]) -> Refusal | None:
    """What is wrong with the JSON-RPC object ``message`` (a handshake-era body), or None."""
    method: Any = message.get("method")
    invalid = _envelope_problem(message)
    if invalid is not None:
        return Refusal(400, INVALID_REQUEST, f"Invalid request: {invalid}", "invalid_request")
    header_method = headers.get(MCP_METHOD_HEADER)
    if header_method is not None and header_method != method:
        return Refusal(
            400,
            HEADER_MISMATCH,
            "Mcp-Method header does not match the request body's method",
            "header_mismatch",
        )
    header_name = headers.get(MCP_NAME_HEADER)
    if header_name is not None:
        key = NAME_BEARING_METHODS.get(method) if isinstance(method, str) else None
        params: Any = message.get("params")
        body_name: Any = (
            cast(dict[str, Any], params).get(key) if key is not None and isinstance(params, dict) else None
        )
        if body_name is None or decode_header_value(header_name) != body_name:
            return Refusal(
                400, HEADER_MISMATCH, "Mcp-Name header does not match the request body", "header_mismatch"
            )
    return None


def _envelope_problem(message: Mapping[str, Any]) -> str | None:
    """What makes a JSON-RPC object no valid MCP message, in the SDK's blind spots (it would otherwise
    take a request with a bad id for a notification, and one with a result for a response)."""
    if message.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if "method" not in message:
        # A response to a request of ours (elicitation, sampling): an id, and a result or an error.
        outcome = [k for k in ("result", "error") if k in message]
        if "params" in message or len(outcome) != 1 or not isinstance(message[outcome[0]], dict):
            return "neither a request, a notification nor a response"
        return None if _valid_id(message.get("id")) else "id must be a string or an integer"
    if "result" in message or "error" in message:
        return "a request carries no result or error"
    if "id" in message and not _valid_id(message["id"]):
        return "id must be a string or an integer"  # JSON-RPC allows null and fractions; MCP does not
    return None


def _valid_id(rid: object) -> bool:
    return isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))


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
    close: bool = False,
) -> None:
    error = body if body is not None else {"code": code, "message": message}
    payload = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
