"""The /mcp in-flight limit: beyond ``mcp.max_in_flight`` requests being answered, a request is refused at
once (503, Retry-After, a JSON-RPC error body), never queued and never reset; below it, all is as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ArbiterFactory, ArbiterServer
from tests.proxy.held import Held, held_upstream, hold_call


@pytest.fixture
def held() -> Iterator[Held]:
    with held_upstream() as held:
        yield held


def _arbiter(arbiter_factory: ArbiterFactory, held: Held, max_in_flight: int) -> ArbiterServer:
    server = arbiter_factory(mcp={"max_in_flight": max_in_flight})
    server.register("held", held.url, call_timeout_s=90)
    return server


async def test_a_request_beyond_the_limit_is_refused_at_once(
    arbiter_factory: ArbiterFactory, held: Held
) -> None:
    server = _arbiter(arbiter_factory, held, max_in_flight=3)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=10)) as http:

        async def one(n: int) -> httpx.Response:
            body, headers = hold_call(n, server.agent_key)
            return await http.post(server.mcp_url, json=body, headers=headers)

        calls = [asyncio.create_task(one(n)) for n in range(3)]
        await asyncio.to_thread(held.wait_started, 3)
        refused = await one(3)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -31020,
                "message": refused.json()["error"]["message"],
                "data": {"reason": "overloaded"},
            },
        }
        assert held.started == 3  # refused before it reached anything
        # Probes and the admin API are not /mcp requests: they still answer.
        assert (await http.get(f"{server.base_url}/healthz")).status_code == 200
        held.release.set()
        for n, resp in enumerate(await asyncio.gather(*calls)):
            assert resp.status_code == 200 and resp.json()["result"]["content"][0]["text"] == f"done {n}"
        again = await one(4)  # the slots are free again
        assert again.status_code == 200, again.text


async def test_a_flood_is_answered_never_reset(arbiter_factory: ArbiterFactory, held: Held) -> None:
    server = _arbiter(arbiter_factory, held, max_in_flight=4)
    flood = 200
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=flood)) as http:

        async def one(n: int) -> httpx.Response:
            body, headers = hold_call(n, server.agent_key)
            return await http.post(server.mcp_url, json=body, headers=headers)

        calls = [asyncio.create_task(one(n)) for n in range(flood)]
        await asyncio.to_thread(held.wait_started, 4)
        # Everything beyond the four held calls is answered while they are still held.
        deadline = time.monotonic() + 60
        while sum(c.done() for c in calls) < flood - 4:
            assert time.monotonic() < deadline, f"only {sum(c.done() for c in calls)} answered"
            await asyncio.sleep(0.05)
        held.release.set()
        responses = await asyncio.gather(*calls)  # an httpx.ReadError (a reset) would fail here
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 4 and statuses.count(503) == flood - 4
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
