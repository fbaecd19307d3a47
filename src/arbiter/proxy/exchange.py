"""What ``/mcp`` learns about one authenticated HTTP request, handed to the steps after it.

The SDK transport sits between the endpoint and the MCP handlers, and the ASGI scope is the only thing
that crosses it: the endpoint puts one ``Exchange`` there (``EXCHANGE_KEY``), the handlers take it out
with ``exchange_of`` and give it to the pipeline, and the endpoint reads it back once the answer is
sent (did the pipeline record this request, or must the endpoint record a refusal?). Every fact is a
typed field, written by the step that learns it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from arbiter.auth.principal import Principal

EXCHANGE_KEY = "arbiter.exchange"
# The caller of the request being handled, for SDK callbacks that get no scope (set around the SDK call).
CALLER: ContextVar[Principal | None] = ContextVar("arbiter_caller", default=None)


@dataclass(slots=True)
class Exchange:
    """One authenticated ``/mcp`` HTTP request."""

    principal: Principal
    # A JWT caller's own token, masked: only ever the RFC 8693 subject token of a token-exchange
    # upstream (auth/outbound.py). Never logged, recorded or forwarded.
    caller_token: SecretStr | None = field(default=None, repr=False)
    body: bytes | None = None  # what a refusal's record names (a reference, not a copy)
    refusal_reason: str | None = None  # the endpoint's own reason for a refusal it answered
    client_gone: bool = False  # the client went away while its body was being read
    audited: bool = False  # the pipeline's audit step owns this request's record
    # When traces are on: when authentication started and ended (epoch ns), for its span.
    auth_ns: tuple[int, int] | None = None


def exchange_of(scope: Mapping[str, Any]) -> Exchange | None:
    """The exchange ``/mcp`` put in ``scope``, if it authenticated the request."""
    found = scope.get(EXCHANGE_KEY)
    return found if isinstance(found, Exchange) else None
