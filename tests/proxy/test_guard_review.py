"""Review fixes to the upstream guards (issue 13), against real upstream servers on loopback.

A tool nobody marked idempotent runs once even when a reused connection is reset after the upstream ran
it; a cancelled half-open probe lets the next call probe; one deadline covers connecting; a refused
credential opens no circuit; a retry of a request that never left waits out the reconnect backoff; tool
settings go with their upstream and are for security admins; refusals after a fallback name the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import httpx
import pytest

from arbiter.auth.outbound import CredentialSpec
from arbiter.demo.crm import build_server
from arbiter.errors import UpstreamTimeout, UpstreamUnavailable
from arbiter.proxy.bulkhead import Bulkhead
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.relay import UpstreamRequest
from arbiter.proxy.retries import ToolSetting
from arbiter.proxy.upstream import UpstreamSpec
from arbiter.settings import UpstreamPolicy
from tests.conftest import ArbiterFactory, UpstreamProc, free_port, serve_in_thread
from tests.proxy.test_breakers import Gate, gate  # noqa: F401 - the fixture, for the probe test
from tests.proxy.test_deadlines import ResetAfterRead, counting_server
from tests.proxy.test_guards import Clock
from tests.refusals import tool_refusal

CUSTOMER = UpstreamRequest("tools/call", {"name": "get_customer", "arguments": {"customer_id": "C-1001"}})


class KeepAliveReset(ResetAfterRead):
    """Like ``ResetAfterRead``, but connections are kept alive, and only a ``charge`` call that is not its
    connection's first request (it came on a reused connection) is run by the upstream, then reset."""

    def __enter__(self) -> KeepAliveReset:
        self._writers: set[asyncio.StreamWriter] = set()
        super().__enter__()
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
                length = next((int(v) for k, v in headers if k.strip().lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                skip = ("host", "content-length", "connection", "transfer-encoding")
                forward = {k.strip(): v.strip() for k, v in headers if k.strip().lower() not in skip}
                resp = await self._http.request(method, path, content=body, headers=forward)
                if served and self.resets > 0 and b'"tools/call"' in body and b'"charge"' in body:
                    self.resets -= 1
                    self.reset_done += 1
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST on a reused connection: the upstream ran it
                    return
                out = [f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}"]
                drop = ("content-length", "connection", "transfer-encoding", "content-encoding")
                out += [f"{k}: {v}" for k, v in resp.headers.items() if k.lower() not in drop]
                out += [f"content-length: {len(resp.content)}", "", ""]
                writer.write("\r\n".join(out).encode("latin-1") + resp.content)
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError, httpx.HTTPError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(OSError):
                writer.close()

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._writers):  # kept-alive connections: their tasks end on the close
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()


@pytest.fixture
def reused_reset() -> Iterator[tuple[KeepAliveReset, list[int]]]:
    with counting_server() as (port, runs), KeepAliveReset(port) as front:
        yield front, runs


async def test_a_reset_reused_connection_resends_only_what_may_run_twice(
    arbiter_factory: ArbiterFactory, reused_reset: tuple[KeepAliveReset, list[int]]
) -> None:
    front, runs = reused_reset
    server = arbiter_factory()
    created = server.register("count", f"http://127.0.0.1:{front.port}/mcp")
    async with server.client("2026-07-28") as client:
        assert (await client.call_tool("count__charge", {"amount": 1})).is_error is False
        front.resets = 1
        failed = await client.session.call_tool("count__charge", {"amount": 5})
        assert front.reset_done == 1, "the second call did not come on a reused connection"
        assert tool_refusal(failed)["reason"] == "upstream_unavailable"
        assert runs == [1, 5]  # ran once, not sent again: it may have run

        with server.admin() as admin:
            url = f"/upstreams/{created['id']}/tools/charge/settings"
            assert admin.put(url, json={"idempotent": True}).status_code == 200
        assert (await client.call_tool("count__charge", {"amount": 6})).is_error is False
        front.resets = 1
        result = await client.call_tool("count__charge", {"amount": 7})
        assert result.is_error is False, result
        assert front.reset_done == 2
        assert runs == [1, 5, 6, 7, 7]  # marked idempotent: sent again on a fresh connection


async def test_a_cancelled_half_open_probe_lets_the_next_call_probe(gate: Gate) -> None:  # noqa: F811
    clock = Clock()
    policy = UpstreamPolicy(max_concurrency=1, breaker_threshold=1, breaker_open_s=10)
    work = UpstreamRequest("tools/call", {"name": "work", "arguments": {"n": 1}})
    async with UpstreamPool(max_connections=4, reconnect_backoff_s=0, policy=policy, clock=clock) as pool:
        await pool.put(
            UpstreamSpec(name="gate", transport="streamable_http", url=gate.url, call_timeout_s=60)
        )
        breaker = pool._guards["gate"].breaker  # pyright: ignore[reportPrivateUsage]
        bulkhead = pool._guards["gate"].bulkhead  # pyright: ignore[reportPrivateUsage]
        assert breaker is not None
        gate.open.clear()
        try:
            async with anyio.create_task_group() as tg:
                holder, prober = anyio.CancelScope(), anyio.CancelScope()

                async def call(scope: anyio.CancelScope) -> None:
                    with scope:
                        await pool.request("gate", work)

                tg.start_soon(call, holder)  # holds the only slot: the upstream hangs
                await _until(lambda: gate.in_flight == 1)
                breaker.failure()  # the circuit opens (threshold 1) ...
                clock.now += 11  # ... and is half-open after breaker_open_s
                assert pool.circuit("gate") == "half_open"
                tg.start_soon(call, prober)  # the probe, waiting for the slot
                await _until(lambda: bulkhead.waiting == 1)
                prober.cancel()  # its agent went away while it waited
                await _until(lambda: bulkhead.waiting == 0)
                holder.cancel()
            gate.open.set()
            # The next call is the probe: it reaches the recovered upstream and closes the circuit.
            result = await pool.request("gate", work)
            assert result["isError"] is False
            assert pool.circuit("gate") == "closed"
        finally:
            gate.open.set()


async def test_one_deadline_covers_connecting() -> None:
    # A blackhole: accepts connections, never answers; the connect timeout is far beyond the deadline.
    held: list[Any] = []

    async def hold(conn: Any) -> None:
        held.append(conn)
        await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        async with UpstreamPool(max_connections=4, reconnect_backoff_s=0) as pool:
            url = f"http://127.0.0.1:{port}/mcp"
            spec = UpstreamSpec(name="crm", transport="streamable_http", url=url, connect_timeout_s=60)
            pool.set_tool_settings({"crm": {"get_customer": ToolSetting(timeout_s=0.5)}})
            await pool.put(spec)
            with pytest.raises(UpstreamTimeout) as caught:
                await pool.request("crm", CUSTOMER)
            assert caught.value.details == {"upstream": "crm", "deadline_s": 0.5}
            assert held, "the request never reached the blackhole"
        tg.cancel_scope.cancel()


async def test_a_refused_credential_opens_no_circuit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token endpoint refusing Arbiter's client credentials: every call fails with upstream_auth_failed.
    async def token_endpoint(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"error": "invalid_client"}'})

    with serve_in_thread(token_endpoint) as token_port, serve_in_thread(_crm_app()) as crm_port:
        monkeypatch.setenv("ARBITER_TEST_CLIENT_SECRET", "s3cret")
        credential = CredentialSpec.from_json(
            {
                "kind": "client_credentials",
                "token_url": f"http://127.0.0.1:{token_port}/token",
                "client_id": "arbiter",
                "client_secret_env": "ARBITER_TEST_CLIENT_SECRET",
            }
        )
        policy = UpstreamPolicy(breaker_threshold=2)
        async with UpstreamPool(max_connections=4, reconnect_backoff_s=0, policy=policy) as pool:
            url = f"http://127.0.0.1:{crm_port}/mcp"
            await pool.put(
                UpstreamSpec(name="crm", transport="streamable_http", url=url, credential=credential)
            )
            for _ in range(4):
                with pytest.raises(UpstreamUnavailable) as caught:
                    await pool.request("crm", CUSTOMER)
                assert caught.value.code == "upstream_auth_failed"
            assert pool.circuit("crm") == "closed"


async def test_a_retry_waits_out_the_reconnect_backoff_for_an_upstream_coming_up() -> None:
    port = free_port()  # nothing listens yet: the first connect is refused
    up: list[int] = []
    with ExitStack() as servers:
        async with UpstreamPool(max_connections=4, reconnect_backoff_s=1.0) as pool:
            url = f"http://127.0.0.1:{port}/mcp"
            await pool.put(UpstreamSpec(name="crm", transport="streamable_http", url=url, call_timeout_s=30))
            result: dict[str, Any] = {}

            async def call() -> None:
                result.update(await pool.request("crm", CUSTOMER))  # not idempotent; it never left

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await _until(lambda: not pool.healthy("crm"))  # the first connect was refused
                up.append(servers.enter_context(serve_in_thread(_crm_app(), port)))  # it comes up
            assert result["isError"] is False  # retried once the backoff allowed a new connect
            assert pool.get("crm").connects == 1
            assert pool.healthy("crm")


async def test_refusals_after_a_fallback_name_the_primary() -> None:
    # Nothing listens on either: the primary's call goes to its fallback, which fails too.
    primary = f"http://127.0.0.1:{free_port()}/mcp"
    secondary = f"http://127.0.0.1:{free_port()}/mcp"
    fell_back: list[str] = []
    async with UpstreamPool(max_connections=4, reconnect_backoff_s=60) as pool:
        await pool.put(UpstreamSpec(name="crm-hidden", transport="streamable_http", url=secondary))
        await pool.put(
            UpstreamSpec(name="crm", transport="streamable_http", url=primary, fallback="crm-hidden")
        )
        for _ in range(2):  # a failed connect, then the fallback's backoff (NotConnected)
            with pytest.raises(UpstreamUnavailable) as caught:
                await pool.request("crm", CUSTOMER, on_fallback=fell_back.append)
            assert caught.value.details["upstream"] == "crm"
            assert "crm-hidden" not in caught.value.message and "crm-hidden" not in str(caught.value)
        assert fell_back == ["crm-hidden", "crm-hidden"]


def test_a_full_bulkhead_tells_no_counts() -> None:
    bulkhead = Bulkhead("crm", limit=7, max_waiting=0, wait_s=1)
    for _ in range(7):
        assert bulkhead.try_acquire()
    with pytest.raises(UpstreamUnavailable) as caught:
        anyio.run(bulkhead.acquire, float("inf"))
    assert not any(ch.isdigit() for ch in caught.value.message), caught.value.message
    assert caught.value.details == {"upstream": "crm", "retry_after_s": 1, "bulkhead": "full"}


async def test_tool_settings_go_with_their_upstream_and_its_server(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    pool: UpstreamPool = server.app.state.runtime.pool
    created = server.register("crm", crm_upstream.url)
    url = f"/upstreams/{created['id']}/tools/get_customer/settings"
    marked = {"idempotent": True, "timeout_s": 5}
    with server.admin() as admin:
        assert admin.put(url, json=marked).status_code == 200
        assert pool.tool_setting("crm", CUSTOMER) == ToolSetting(True, 5)
        # Another server at a new URL: what was said of the old one's tools does not hold.
        with serve_in_thread(_crm_app()) as other:
            moved = admin.patch(f"/upstreams/{created['id']}", json={"url": f"http://127.0.0.1:{other}/mcp"})
            assert moved.status_code == 200, moved.text
            assert admin.get(url).json()["idempotent"] is False
            assert pool.tool_setting("crm", CUSTOMER) is None
            assert (
                admin.patch(f"/upstreams/{created['id']}", json={"url": crm_upstream.url}).status_code == 200
            )
        # Unchanged URL: the marks stay.
        assert admin.put(url, json=marked).status_code == 200
        assert admin.patch(f"/upstreams/{created['id']}", json={"call_timeout_s": 20}).status_code == 200
        assert admin.get(url).json()["idempotent"] is True
        # Deleted: a new upstream of the same name does not inherit them.
        assert admin.delete(f"/upstreams/{created['id']}").status_code == 204
        assert pool.tool_setting("crm", CUSTOMER) is None
    again = server.register("crm", crm_upstream.url)
    with server.admin() as admin:
        assert (
            admin.get(f"/upstreams/{again['id']}/tools/get_customer/settings").json()["idempotent"] is False
        )
    assert pool.tool_setting("crm", CUSTOMER) is None


def test_a_configured_upstream_pointed_at_another_server_loses_its_marks(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    def configured(url: str) -> tuple[Any, str]:
        server = arbiter_factory(upstreams=[{"name": "crm", "url": url}])
        with server.admin() as admin:
            (row,) = admin.get("/upstreams").json()
        return server, f"/upstreams/{row['id']}/tools/get_customer/settings"

    first, url = configured(crm_upstream.url)
    with first.admin() as admin:
        assert admin.put(url, json={"idempotent": True}).status_code == 200
    first.stop()
    same, url = configured(crm_upstream.url)  # restarted, same server: the mark holds
    with same.admin() as admin:
        assert admin.get(url).json()["idempotent"] is True
    same.stop()
    with serve_in_thread(_crm_app()) as other:
        moved, url = configured(f"http://127.0.0.1:{other}/mcp")
        with moved.admin() as admin:
            assert admin.get(url).json()["idempotent"] is False
        moved.stop()


def test_only_a_security_admin_marks_a_tool_idempotent(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(policy=None)
    created = server.register("crm", crm_upstream.url)
    with server.admin() as admin:
        grant = {"subject": "role:ops", "object": "admin/upstreams", "action": "admin:write"}
        assert admin.post("/policies", json=grant).status_code == 201
        made = admin.post("/api-keys", json={"owner": "olga", "roles": ["ops"], "tenant": "acme"})
        assert made.status_code == 201, made.text
        boss = admin.post("/api-keys", json={"owner": "sam", "roles": ["security-admin"], "tenant": "acme"})
        assert boss.status_code == 201, boss.text
    url = f"/upstreams/{created['id']}/tools/get_customer/settings"
    with server.admin(made.json()["key"]) as ops:
        # The policy lets ops change upstreams, not say that a tool may run twice.
        assert ops.patch(f"/upstreams/{created['id']}", json={"call_timeout_s": 20}).status_code == 200
        assert ops.put(url, json={"idempotent": True}).status_code == 403
    with server.admin() as admin:
        assert admin.get(url).json()["idempotent"] is False
    with server.admin(boss.json()["key"]) as security:
        assert security.put(url, json={"idempotent": True}).status_code == 200


async def _until(check: Callable[[], bool], within_s: float = 30) -> None:
    """Poll a condition another task or thread turns true (its own timing decides when)."""
    with anyio.fail_after(within_s):
        while not check():  # noqa: ASYNC110 - the condition is another thread's
            await anyio.sleep(0.01)


def _crm_app() -> Any:
    return build_server().streamable_http_app(stateless_http=True, json_response=True)
