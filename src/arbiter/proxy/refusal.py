"""Audit records for authenticated ``/mcp`` requests that were refused before the pipeline ran.

The pipeline's audit step records every request that reaches it. What is refused earlier (by this
endpoint's own checks or by the SDK's transport: a malformed body, a wrong media type, a header that
disagrees with the body, an unknown session, a method the server does not have) must leave a record
too, or probing would go unseen. ``ResponseWatch`` observes the answer of a request the pipeline did not
record, and ``refusal_event`` turns an error answer into a record. Requests that did reach the
pipeline pay one attribute read here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from mcp_types import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR
from starlette.types import Message, Send

from arbiter.audit.record import Event, actor_of
from arbiter.auth.principal import Principal
from arbiter.http_scope import client_ip, trace_id
from arbiter.proxy.exchange import Exchange

_CAPTURE_MAX = 64 * 1024
_REASONS_BY_CODE = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    HEADER_MISMATCH: "header_mismatch",
}
_REASONS_BY_STATUS = {
    404: "session_not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ResponseWatch:
    """Wraps ``send`` to see the status and (for requests the pipeline did not record) the body."""

    __slots__ = ("_scope", "_send", "body", "capturing", "content_type", "exchange", "status")

    def __init__(self, scope: Mapping[str, Any], send: Send) -> None:
        self._scope = scope
        self._send = send
        self.status = 0
        self.content_type = b""
        self.capturing = False
        self.body = bytearray()
        self.exchange: Exchange | None = None  # set by /mcp once the request is authenticated

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            # The pipeline records its own requests (and has finished before a JSON answer starts). A
            # successful GET is an event stream that no request of this one is refused on.
            exchange = self.exchange
            self.capturing = (exchange is None or not exchange.audited) and (
                self.status >= 400 or self._scope.get("method") == "POST"
            )
            if self.capturing:
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        self.content_type = value
        elif kind == "http.response.body" and self.capturing and len(self.body) < _CAPTURE_MAX:
            self.body += message.get("body", b"")[: _CAPTURE_MAX - len(self.body)]
        await self._send(message)

    def error(self) -> tuple[int | None, str] | None:
        """The error this answer carries, if any: (JSON-RPC code or None, message)."""
        found = _jsonrpc_error(bytes(self.body), self.content_type)
        if found is not None:
            return found
        if self.status >= 400:
            text = bytes(self.body[:200]).decode("utf-8", "replace").strip()
            return None, text or f"HTTP {self.status}"
        return None


def refusal_event(
    principal: Principal | None,
    scope: Mapping[str, Any],
    status: int,
    code: int | None,
    message: str,
    body: bytes | None,
    reason: str | None = None,
) -> Event:
    """A record of an authenticated request refused before the pipeline, with what it asked for."""
    method, request_id, protocol = _describe(body, scope)
    return Event(
        kind="mcp",
        decision="deny",
        reason=reason or _reason(status, code),
        actor=actor_of(principal, client_ip(scope)),
        method=method,
        outcome={"status": "refused", "http_status": status, "error_code": code, "message": message[:200]},
        trace_id=trace_id(scope),
        request_id=request_id,
        protocol_version=protocol,
    )


def _reason(status: int, code: int | None) -> str:
    if code is not None and code in _REASONS_BY_CODE:
        return _REASONS_BY_CODE[code]
    return _REASONS_BY_STATUS.get(status, "invalid_request")


def _describe(body: bytes | None, scope: Mapping[str, Any]) -> tuple[str, str | int | None, str | None]:
    """The method, id and protocol version a refused request claimed (untrusted, for the record only)."""
    protocol: str | None = None
    fallback = f"{scope.get('method', 'POST')} {scope.get('path', '/mcp')}"
    for name, value in scope.get("headers", ()):
        if name == b"mcp-protocol-version":
            protocol = value.decode("latin-1")[:32]
        elif name == b"mcp-method":  # what an unread body claims to be
            fallback = value.decode("latin-1")[:200]
    try:
        decoded: object = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return fallback, None, protocol
    if not isinstance(decoded, dict):
        return fallback, None, protocol
    message = cast(dict[str, object], decoded)
    method = message.get("method")
    rid = message.get("id")
    request_id: str | int | None = None
    if isinstance(rid, str):
        request_id = rid[:200]
    elif isinstance(rid, int) and _is_plain_int(rid):
        request_id = rid
    return (method[:200] if isinstance(method, str) else fallback), request_id, protocol


def _is_plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _jsonrpc_error(body: bytes, content_type: bytes) -> tuple[int | None, str] | None:
    if content_type.startswith(b"text/event-stream"):
        for line in body.splitlines():
            if line.startswith(b"data:"):
                found = _error_of(line[5:])
                if found is not None:
                    return found
        return None
    return _error_of(body) if content_type.startswith(b"application/json") else None


def _error_of(payload: bytes) -> tuple[int | None, str] | None:
    try:
        decoded: object = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    error = cast(dict[str, object], decoded).get("error")
    if not isinstance(error, dict):
        return None
    fields = cast(dict[str, object], error)
    code, message = fields.get("code"), fields.get("message")
    return (code if _is_plain_int(code) else None), (message if isinstance(message, str) else "")  # pyright: ignore[reportReturnType]
