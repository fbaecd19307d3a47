"""The audit filters' names and help texts, apart from the query code so the CLI can build its options
without importing SQLAlchemy (``arbiter --help`` stays fast). ``audit.query`` re-exports them."""

from __future__ import annotations

# The filters an auditor can give, each with its help text: the admin API's query parameters and
# `arbiter audit export`'s options, in this order. Their values go to ``Filters.parse``.
FILTERS: dict[str, str] = {
    "since": "From this time, inclusive: ISO 8601 (no zone: UTC) or epoch ms",
    "until": "Before this time, exclusive: ISO 8601 or epoch ms",
    "subject": "The caller's subject, exactly",
    "tenant": "The caller's tenant",
    "tool": "The exposed tool name (<upstream>__<tool>) or resource URI",
    "upstream": "The upstream's name",
    "decision": "allow, deny or error",
    "reason": "e.g. policy_denied, rate_limited, upstream_unavailable",
    "trace_id": "W3C trace id (32 hex characters)",
    "kind": "mcp, auth, admin, audit or integrity",
    "method": "MCP method (tools/call) or admin action",
}
