"""How a request ended, as the audit record and the metrics both state it: one mapping for both.

``verdict`` turns a request's result or error into its decision (allow, deny, error) and its reason
(``allowed``, the Arbiter error's code, ``upstream_error``, ``cancelled``, ``internal_error``).
"""

from __future__ import annotations

import asyncio

from mcp.shared.exceptions import MCPError

from arbiter.audit.record import Decision
from arbiter.errors import ArbiterError, RequestRejected, UnknownTarget


def verdict(error: BaseException | None) -> tuple[Decision, str]:
    """(decision, reason) of a request that ended with ``error``; None: it was answered."""
    if error is None:
        return "allow", "allowed"
    if isinstance(error, UnknownTarget):  # a hidden target is recorded as the denial it is
        return "deny", error.audit_reason
    if isinstance(error, ArbiterError):
        return ("deny" if refused(error) else "allow"), error.code
    if isinstance(error, MCPError):  # the upstream's own JSON-RPC error
        return "allow", "upstream_error"
    if isinstance(error, asyncio.CancelledError):
        return "allow", "cancelled"
    return "error", "internal_error"


def refused(error: ArbiterError) -> bool:
    """Whether Arbiter refused the request (policy, limits, an unknown target), rather than failed it."""
    return isinstance(error, RequestRejected | UnknownTarget)
