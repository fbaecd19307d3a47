"""Which HTTP client should the relay use? CPU per request of the same JSON-RPC POST through each.

    .venv/bin/python bench/http_clients.py [--requests 6000] [--concurrency 32]

Starts a bare ASGI server under uvicorn (the cheapest possible upstream) in its own process, then, in
this process, sends the same ``tools/call`` POST through httpx2 (what the SDK uses) and aiohttp, on the
asyncio and the uvloop event loop, ``--concurrency`` in flight over one pooled client. Reports this
process's CPU time per request (the client's whole cost: encoding, pooling, parsing, its event loop)
and requests/s. The relay (src/arbiter/proxy/relay.py) uses the cheaper one.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import uvloop

ANSWER = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": "arbiter-1",
        "result": {"content": [{"type": "text", "text": "hello"}], "isError": False},
    }
)
REQUEST = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": "arbiter-1",
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"x": 1}},
    }
)
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/call",
    "mcp-name": "echo",
}
SERVER = f"""
import uvicorn
BODY = {ANSWER!r}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    await send({{"type": "http.response.start", "status": 200, "headers": headers}})
    await send({{"type": "http.response.body", "body": BODY}})
uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), log_level="warning", access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _drive(send: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> None:
    left = iter(range(requests))

    async def worker() -> None:
        for _ in left:
            await send()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _measure(kind: str, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    if kind == "httpx2":
        import httpx2

        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx2.AsyncClient(limits=limits) as client:

            async def send() -> None:
                response = await client.send(
                    client.build_request("POST", url, content=REQUEST, headers=HEADERS), stream=True
                )
                try:
                    orjson.loads(await response.aread())
                finally:
                    await response.aclose()

            return await _timed(send, requests, concurrency)
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def send() -> None:
            async with session.post(url, data=REQUEST, headers=HEADERS) as response:
                orjson.loads(await response.read())

        return await _timed(send, requests, concurrency)


async def _timed(send: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> tuple[float, float]:
    await _drive(send, min(requests, 500), concurrency)  # warm the pool
    cpu, wall = time.process_time(), time.perf_counter()
    await _drive(send, requests, concurrency)
    return (time.process_time() - cpu) * 1000 / requests, requests / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU per request of the relay's candidate HTTP clients")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=Path(__file__).parent)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/mcp"
        print(f"{'client':8} {'loop':8} {'CPU ms/request':>15} {'requests/s':>11}")
        for kind in ("httpx2", "aiohttp"):
            for loop in ("asyncio", "uvloop"):
                runner = uvloop.run if loop == "uvloop" else asyncio.run
                cpu, rate = runner(_measure(kind, url, args.requests, args.concurrency))
                print(f"{kind:8} {loop:8} {cpu:15.3f} {rate:11.0f}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
