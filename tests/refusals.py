"""Reading a ``tools/call`` refusal in either form: an ``isError`` tool result (``mcp.tool_errors: result``,
the default) or a JSON-RPC error (``jsonrpc``). See src/arbiter/proxy/tool_errors.py."""

from __future__ import annotations

from typing import Any, cast

import mcp_types as types

ERROR_META = "arbiter/error"


def tool_refusal(result: types.CallToolResult) -> dict[str, Any]:
    """The reason and details of a call refused as a tool result; fails unless it is one."""
    assert result.is_error, result
    details = result.structured_content
    assert details is not None and isinstance(details.get("reason"), str), result
    assert result.meta is not None and result.meta.get(ERROR_META) == details, result
    text = result.content[0]
    assert isinstance(text, types.TextContent) and text.text, result
    return details


def refusal_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """A raw JSON-RPC response's refusal details (``reason`` included), in either form, or None."""
    error: Any = body.get("error")
    if isinstance(error, dict):
        data: Any = cast(dict[str, Any], error).get("data")
        return cast(dict[str, Any], data) if isinstance(data, dict) else None
    result: Any = body.get("result")
    if isinstance(result, dict) and cast(dict[str, Any], result).get("isError"):
        details: Any = cast(dict[str, Any], result).get("structuredContent")
        if isinstance(details, dict) and "reason" in details:
            meta: Any = cast(dict[str, Any], result).get("_meta") or {}
            assert meta.get(ERROR_META) == details, body
            return cast(dict[str, Any], details)
    return None
