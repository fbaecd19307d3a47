"""How a target that is not there is answered, shared by every step that may hide one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from mcp_types import INVALID_PARAMS

from arbiter.errors import UnknownTarget

# What the SDK's own MCP server answers for an unknown target, so a hidden target looks unknown too.
RESOURCE_NOT_FOUND = -32002


def not_found(method: str, exposed: str, *, hidden: bool = False) -> UnknownTarget:
    """Exactly what is answered for a target that does not exist (and so for one the caller may not see:
    ``hidden``, which changes only what is recorded, never the answer)."""
    if method == "resources/read":
        return UnknownTarget(f"Resource not found: {exposed}", RESOURCE_NOT_FOUND, hidden=hidden)
    kind = "tool" if method == "tools/call" else "prompt"
    return UnknownTarget(f"Unknown {kind}: {exposed}", INVALID_PARAMS, hidden=hidden)


def completed_method(params: Mapping[str, Any]) -> str:
    """The method whose target a ``completion/complete`` names (``ref/prompt``: prompts/get, otherwise
    resources/read): it is found, authorized and hidden exactly as that method's target is."""
    ref: Any = params.get("ref")
    kind: Any = cast(dict[str, Any], ref).get("type") if isinstance(ref, dict) else None
    return "prompts/get" if kind == "ref/prompt" else "resources/read"
