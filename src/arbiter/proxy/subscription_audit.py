"""Audit records of ``resources/subscribe``, ``resources/unsubscribe`` and ``subscriptions/listen``.

Those requests do not run through the pipeline (proxy/listeners.py answers them), so they are recorded
here: who asked, for which exposed resources and notifications, and what was decided. Like the pipeline,
a request takes its record's queue slot before anything is done (``begin``), so nothing is subscribed
unaudited; the record then says what happened (``end``), and the endpoint writes no second one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mcp.shared.exceptions import MCPError
from starlette.requests import Request

from arbiter.audit.record import Event, actor_of
from arbiter.audit.writer import AuditWriter
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError
from arbiter.http_scope import client_ip, trace_id
from arbiter.proxy.exchange import exchange_of

_MAX_URI = 512  # characters of one URI kept in a record
_MAX_URIS = 100  # URIs named in one record (the count is kept too)


class SubscriptionAudit:
    """Records subscription requests through ``writer``; with no writer, records nothing."""

    def __init__(self, writer: AuditWriter | None) -> None:
        self._writer = writer

    def begin(self, request: object) -> None:
        """Take the record's queue slot and own the request's record; ``AuditUnavailable`` when there is
        no slot (the request is refused, and the endpoint records that refusal)."""
        if self._writer is None:
            return
        self._writer.reserve()
        exchange = exchange_of(request.scope) if isinstance(request, Request) else None
        if exchange is not None:
            exchange.audited = True

    def end(
        self,
        request: object,
        principal: Principal | None,
        method: str,
        *,
        resources: Iterable[str] = (),
        kinds: Iterable[str] = (),
        upstream: str | None = None,
        target: str | None = None,
        error: ArbiterError | MCPError | None = None,
    ) -> None:
        """Write the record ``begin`` took a slot for."""
        if self._writer is None:
            return
        scope = request.scope if isinstance(request, Request) else None
        uris = [_safe_uri(uri) for uri in resources]
        outcome: dict[str, Any] = {
            "status": "ok" if error is None else "refused",
            "resource_count": len(uris),
        }
        if uris:
            outcome["resources"] = uris[:_MAX_URIS]
        if kinds:
            outcome["notifications"] = sorted(kinds)
        reason = "subscribed" if method != "resources/unsubscribe" else "unsubscribed"
        if isinstance(error, ArbiterError):
            reason = error.code
            outcome.update(http_status=error.http_status, message=error.message[:200])
        elif error is not None:
            reason = "invalid_request"
            outcome.update(error_code=error.error.code, message=error.error.message[:200])
        self._writer.submit(
            Event(
                kind="mcp",
                decision="allow" if error is None else "deny",
                reason=reason,
                actor=actor_of(principal, client_ip(scope)),
                method=method,
                tool=uris[0] if len(uris) == 1 else None,
                upstream=upstream,
                target=_safe_uri(target) if target is not None else None,
                outcome=outcome,
                trace_id=trace_id(scope),
            )
        )


def _safe_uri(uri: str) -> str:
    """``uri`` without a userinfo part (``user:password@``), at most ``_MAX_URI`` characters."""
    try:
        parts = urlsplit(uri)
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port is not None else host
            uri = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not a URL this parser understands: kept as the agent sent it, truncated
        pass
    return uri[:_MAX_URI]
