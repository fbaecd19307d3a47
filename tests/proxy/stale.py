"""A stale-connection front: a TCP relay that plays a server closing idle keep-alive connections.

Shared by the tests of requests (tests/proxy/test_idle_connections.py) and of the change-notification
watcher (tests/proxy/test_watch_connections.py) meeting pooled connections the upstream had closed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import anyio

from tests.conftest import free_port, wait_listening


class StaleAfterIdle:
    """A TCP relay in front of a real upstream that plays a server closing idle connections at the worst
    moment: a request arriving on a connection that has carried one before and has been idle for
    ``idle_s`` or more is dropped unanswered, and the connection closed. A new connection's requests,
    and every other byte, pass through unchanged."""

    def __init__(self, target_port: int, idle_s: float) -> None:
        self.port = free_port()
        self._target = target_port
        self._idle_s = idle_s
        self.dropped = 0  # requests closed unanswered (each one never reached the upstream)
        self._last: dict[int, float] = {}  # per open client connection: when a byte last passed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def all_idle(self) -> bool:
        """Whether every open connection has been idle long enough for its next request to be dropped
        (a new connection's first request is never dropped, so a busy machine cannot fail the test)."""
        now = time.monotonic()
        return bool(self._last) and all(now - t >= self._idle_s for t in list(self._last.values()))

    def idle(self) -> int:
        """How many open connections have been idle long enough for their next request to be dropped."""
        now = time.monotonic()
        return sum(now - t >= self._idle_s for t in list(self._last.values()))

    def __enter__(self) -> StaleAfterIdle:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        wait_listening(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = id(writer)
        self._last[key] = time.monotonic()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            self._last.pop(key, None)
            return

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                self._last[key] = time.monotonic()
                writer.write(data)
                await writer.drain()
            writer.close()

        back = asyncio.ensure_future(downstream())
        carried = False
        try:
            while data := await reader.read(65536):
                if carried and time.monotonic() - self._last[key] >= self._idle_s:
                    self.dropped += 1  # the request dies here, unanswered, as in a server's idle close
                    break
                carried = True
                self._last[key] = time.monotonic()
                up_writer.write(data)
                await up_writer.drain()
        finally:
            self._last.pop(key, None)
            back.cancel()
            up_writer.close()
            writer.close()


async def until_all_idle(stale: StaleAfterIdle) -> None:
    """The agent thinks: wait until every pooled connection has gone stale (a condition, polled)."""
    with anyio.fail_after(30):
        while True:
            if stale.all_idle():
                return
            await anyio.sleep(0.02)
