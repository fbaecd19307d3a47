"""The direct path for 2026-07-28 requests: checked as the SDK checks them, answered without its transport.

A 2026-07-28 request is one self-contained POST, so there is no session to keep and the SDK's server
transport (request models, a per-request runner and connection, result models) was most of what Arbiter
spent on the agent's side of a call. This path keeps every check that transport makes, with the SDK's
own helpers and in the same order, so that the same request gets the same status, code and message:

1. ``Accept`` must admit JSON (406);
2. the body must be JSON (-32700) holding one JSON-RPC request (-32600);
3. no routing header may appear twice, and the header/``_meta`` ladder must hold (versions, ``Mcp-Method``,
   ``Mcp-Name``: -32020 and friends, ``classify_inbound_request``);
4. ``Mcp-Param-*`` headers must match the arguments of a tool the caller can see;
5. the params must be valid for the method at that version (-32602).

Only the methods the pipeline answers take this path, and only when Arbiter answers in JSON
(``mcp.json_response``, the default; in event-stream mode the SDK's keep-alive pings hold long calls
open). Anything else (``server/discover``, ``subscriptions/listen``, notifications, unknown methods, bodies
with integers beyond 64 bits) is handed to the SDK, which answers it as before. The answer is JSON,
encoded once with ``orjson``, stamped with Arbiter's ``serverInfo`` as the SDK stamps it.

Results are passed on as the upstream sent them (only ids, exposed names and the upstream's identity
stamp change): unlike the SDK's server, this path does not re-validate or trim an upstream's result.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson
from mcp.server.streamable_http import check_accept_headers
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from mcp_types import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST
from mcp_types import methods as _methods
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Receive, Send

from arbiter.auth.principal import Principal
from arbiter.proxy.catalog import Catalog
from arbiter.proxy.exchange import Exchange
from arbiter.proxy.pipeline import COMPLETE, LIST_METHODS, TARGET_KEYS, CallContext, Pipeline
from arbiter.proxy.relay import encode
from arbiter.proxy.server import answer, visible_input_schema
from arbiter.proxy.streamed import StreamedAnswer

log = logging.getLogger(__name__)

# What the pipeline answers; everything else goes to the SDK.
DIRECT_METHODS = frozenset(TARGET_KEYS) | LIST_METHODS | {COMPLETE}
_INVALID_BODY = "Body must be a single JSON-RPC request or notification object"
_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
# orjson reads integers beyond 64 bits as floats; such bodies take the SDK's path, which keeps them exact.
_BIG_INTEGER = re.compile(rb"\d{20}")


class ModernFront:
    """Answers 2026-07-28 POSTs for the pipeline's methods: ``takes`` says which, ``__call__`` answers."""

    def __init__(
        self,
        pipeline: Pipeline,
        catalog: Catalog,
        tool_visible: Callable[[Principal, str], bool],
        *,
        json_response: bool,
        server_info: Callable[[], dict[str, Any]],
        error_results: bool = True,
    ) -> None:
        self._pipeline = pipeline
        self._error_results = error_results  # mcp.tool_errors == "result" (see server.answer)
        self._catalog = catalog
        self._tool_visible = tool_visible
        self._json_response = json_response
        self._server_info = server_info  # Arbiter's serverInfo stamp, a fresh dict per call

    def takes(self, body: bytes) -> dict[str, Any] | None:
        """The decoded request if this path answers it: a JSON object naming one of its methods, with an
        id. Anything else (malformed bodies included) is left to the SDK, which answers it as before."""
        if not self._json_response:
            return None
        message = decode(body)
        if message is None or not is_direct(message):
            return None
        return message

    async def __call__(
        self, request: Request, receive: Receive, send: Send, message: dict[str, Any], exchange: Exchange
    ) -> None:
        has_json, has_sse = check_accept_headers(request)
        if not has_json or (not self._json_response and not has_sse):
            await send({"type": "http.response.start", "status": 406, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        rid: Any = message.get("id")
        if not valid_envelope(message):
            await _reply(send, None, error={"code": INVALID_REQUEST, "message": _INVALID_BODY})
            return
        duplicated = find_duplicated_routing_header(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]
        )
        if duplicated is not None:
            rejection = InboundLadderRejection(
                code=HEADER_MISMATCH, message=f"{duplicated} header appears more than once"
            )
            await _reject(send, rid, rejection)
            return
        headers = request.headers
        verdict = classify_inbound_request(message, headers=dict(headers))
        if isinstance(verdict, InboundLadderRejection):
            await _reject(send, rid, verdict)
            return
        method: str = message["method"]
        params: Any = message.get("params")
        if method == "tools/call":
            rejection = self._param_headers(exchange.principal, params, request)
            if rejection is not None:
                await _reject(send, rid, rejection)
                return
        try:
            _methods.validate_client_request(method, verdict.protocol_version, params)
        except ValidationError:
            error = {"code": INVALID_PARAMS, "message": "Invalid request parameters", "data": ""}
            await _reply(send, rid, error=error)
            return
        call = CallContext(
            method=method,
            params=cast(dict[str, Any], params) if isinstance(params, dict) else {},
            request_id=rid,
            protocol_version=verdict.protocol_version,
            http_request=Request(request.scope, receive),
            principal=exchange.principal,
            client_info=client_info(verdict.client_info),
            client_capabilities=_capabilities(verdict.client_capabilities),
            exchange=exchange,
        )
        # What the upstream streams for the call turns the answer into an event stream (streamed.py).
        streamed = StreamedAnswer(call, send) if has_sse and method in TARGET_KEYS else None
        call.downstream = streamed
        try:
            result = await answer(self._pipeline, call, error_results=self._error_results)
        except MCPError as exc:
            error = exc.error.model_dump(mode="json", exclude_none=True)
            if streamed is not None and await streamed.finish({"jsonrpc": "2.0", "id": rid, "error": error}):
                return
            await _reply(send, rid, error=error)
            return
        meta: Any = result.get("_meta")
        if meta is None or (isinstance(meta, dict) and cast(dict[str, Any], meta).get(_SERVER_INFO) is None):
            result["_meta"] = {**(cast(dict[str, Any], meta) or {}), _SERVER_INFO: self._server_info()}
        if streamed is not None and await streamed.finish({"jsonrpc": "2.0", "id": rid, "result": result}):
            return
        await _reply(send, rid, result=result)

    def _param_headers(
        self, principal: Principal, params: Any, request: Request
    ) -> InboundLadderRejection | None:
        """The SDK's ``Mcp-Param-*`` check, against the schema of a tool the caller can see."""
        if not isinstance(params, dict):
            return None
        params = cast(dict[str, Any], params)
        name: Any = params.get("name")
        arguments: Any = params.get("arguments")
        if not isinstance(name, str) or (arguments is not None and not isinstance(arguments, dict)):
            return None
        arguments = cast(dict[str, Any], arguments or {})
        if not arguments and not any(h.startswith("mcp-param-") for h in request.headers):
            return None
        try:
            schema = visible_input_schema(self._catalog, self._tool_visible, principal, name)
        except Exception:
            # As the SDK does: the header check must never break a working call path.
            log.exception("Mcp-Param header validation skipped: the schema lookup failed")
            return None
        if schema is None:
            return None
        return validate_mcp_param_headers(schema, arguments, request.headers)


def decode(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or None: not JSON, not an object, or holding integers beyond 64 bits
    (which orjson would read as floats; such bodies take the SDK's path, which keeps them exact)."""
    if _BIG_INTEGER.search(body) is not None:
        return None
    try:
        decoded: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return cast(dict[str, Any], decoded) if isinstance(decoded, dict) else None


def is_direct(message: dict[str, Any]) -> bool:
    """Whether ``message`` is a request (it has an id) for one of the methods the pipeline answers."""
    method: Any = message.get("method")
    return "id" in message and isinstance(method, str) and method in DIRECT_METHODS


def valid_envelope(message: dict[str, Any]) -> bool:
    """What the SDK's ``JSONRPCRequest`` model accepts: version 2.0, a string or integer id, a string
    method and params that are an object or null (the ladder then refuses a missing ``_meta``); other
    members are ignored."""
    rid = message.get("id")
    params = message.get("params")
    return (
        message.get("jsonrpc") == "2.0"
        and (isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)))
        and isinstance(message.get("method"), str)
        and (params is None or isinstance(params, dict))
    )


def _capabilities(raw: Any) -> dict[str, Any] | None:
    # What the client declared it can do (the envelope's clientCapabilities); the ladder requires it.
    return cast(dict[str, Any], raw) if isinstance(raw, dict) else None


def client_info(raw: Any) -> dict[str, Any] | None:
    # What the client says it is: recorded, never trusted.
    if not isinstance(raw, dict):
        return None
    info = cast(dict[str, Any], raw)
    return {"name": info.get("name"), "version": info.get("version"), "title": info.get("title")}


async def _reject(send: Send, rid: Any, rejection: InboundLadderRejection) -> None:
    error: dict[str, Any] = {"code": rejection.code, "message": rejection.message}
    if rejection.data is not None:
        error["data"] = rejection.data
    await _reply(send, rid, error=error)


async def _reply(
    send: Send, rid: Any, *, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None
) -> None:
    """One JSON-RPC response, with the HTTP status the SDK gives its error code."""
    if error is not None:
        status = ERROR_CODE_HTTP_STATUS.get(error["code"], 200)
        message = {"jsonrpc": "2.0", "id": rid, "error": error}
    else:
        status = 200
        message = {"jsonrpc": "2.0", "id": rid, "result": result}
    await send_json(send, message, status)


async def send_json(
    send: Send, message: dict[str, Any], status: int = 200, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """``message`` as one JSON response (encoded once, with orjson), with ``headers`` added."""
    payload = encode(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
