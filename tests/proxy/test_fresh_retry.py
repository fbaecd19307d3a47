"""The SDK session's transport (``fresh_retry.py``) against a real server behind the stale-connection front:
a request that met a pooled connection the server had closed is sent once more on a fresh one, a
``tools/call`` never."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from arbiter.proxy.fresh_retry import FreshRetry
from tests.conftest import serve_in_thread
from tests.proxy.stale import StaleAfterIdle, until_all_idle


def _rpc(method: str, rid: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": {}}


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one_but_never_for_a_tool_call() -> None:
    seen: list[str] = []

    async def answer(request: Request) -> JSONResponse:
        message = await request.json()
        seen.append(message["method"])
        return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": {}})

    app = Starlette(routes=[Route("/mcp", answer, methods=["POST"])])
    with serve_in_thread(app) as port, StaleAfterIdle(port, idle_s=0.2) as stale:
        url = f"http://127.0.0.1:{stale.port}/mcp"
        transport = FreshRetry(
            httpx2.AsyncHTTPTransport(limits=httpx2.Limits(keepalive_expiry=600)),
            httpx2.AsyncHTTPTransport(limits=httpx2.Limits(max_keepalive_connections=0)),
        )
        async with httpx2.AsyncClient(transport=transport) as http:
            assert (await http.post(url, json=_rpc("tools/list", 1))).status_code == 200
            await until_all_idle(stale)
            # It may have run: never sent twice. The dropped connection reaches the client as an early
            # end (RemoteProtocolError) or, on a busy machine, as a reset (ReadError): either is no answer.
            with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
                await http.post(url, json=_rpc("tools/call", 2))
            assert (stale.dropped, transport.resent) == (1, 0)

            assert (await http.post(url, json=_rpc("tools/list", 3))).status_code == 200  # a new connection
            await until_all_idle(stale)
            answered = await http.post(url, json=_rpc("resources/subscribe", 4))
            assert answered.status_code == 200
            assert answered.json()["id"] == 4
            assert (stale.dropped, transport.resent) == (2, 1)
    assert seen == ["tools/list", "tools/list", "resources/subscribe"]  # each once; the tool call never
