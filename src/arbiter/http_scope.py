"""Facts about an HTTP request read straight from its ASGI scope, for audit records of every kind.

A low layer: it imports nothing of Arbiter, so the proxy, the admin API and the audit package may all
use it without depending on one another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def client_ip(scope: Mapping[str, Any] | None) -> str | None:
    """The peer address of the HTTP connection (what uvicorn puts in the scope)."""
    client: Any = scope.get("client") if scope is not None else None
    return str(client[0]) if client else None


def trace_id(scope: Mapping[str, Any] | None) -> str | None:
    """The W3C trace id the caller sent (``traceparent``), if well formed."""
    if scope is None:
        return None
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != b"0" * 32:
                try:
                    int(parts[1], 16)
                except ValueError:
                    return None
                return parts[1].decode("ascii")
            return None
    return None
