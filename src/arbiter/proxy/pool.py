"""The upstream pool: the one owner of upstream connections.

One ``UpstreamClient`` per enabled upstream, built and closed in the app lifespan. Every request goes
through ``request``, which routes it to the upstream's shared connection or, for a token-exchange
upstream, to the caller's own. The pool holds each upstream's health (what its client last learnt);
the registry and the readiness probe read it here, and the catalog is told when it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskGroup
from pydantic import SecretStr

from arbiter.auth.outbound import CallerTokenRequired, Outbound, OutboundAuth
from arbiter.auth.secrets import SecretBox
from arbiter.errors import UpstreamUnavailable
from arbiter.net.egress import Egress
from arbiter.proxy.callers import CallerSessions
from arbiter.proxy.relay import UpstreamRequest
from arbiter.proxy.upstream import UpstreamClient, UpstreamSpec


class UpstreamPool:
    def __init__(
        self,
        *,
        max_connections: int,
        reconnect_backoff_s: float,
        idle_connection_s: float = 4.0,
        on_health: Callable[[str, bool], None] | None = None,
        outbound: Outbound | None = None,
        caller_sessions_max: int = 256,
        caller_session_idle_s: float = 300.0,
        egress: Egress | None = None,
    ) -> None:
        self._on_health = on_health
        self._clients: dict[str, UpstreamClient] = {}
        self._max_connections = max_connections
        self._idle_connection_s = idle_connection_s
        self._backoff = reconnect_backoff_s
        self._outbound = outbound or Outbound(SecretBox(None))
        self._callers_max = caller_sessions_max
        self._caller_idle = caller_session_idle_s
        self.egress = egress  # checks every new upstream connection's address (upstream.allowed_networks)
        self._tg: TaskGroup | None = None
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> UpstreamPool:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(self._sweep_callers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in list(self._clients.values()):
            await client.aclose()
        self._clients.clear()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._stack.aclose()

    def get(self, name: str) -> UpstreamClient:
        client = self._clients.get(name)
        if client is None:
            raise UpstreamUnavailable.of(name)
        return client

    def current(self, name: str) -> UpstreamClient | None:
        return self._clients.get(name)

    def names(self) -> list[str]:
        return sorted(self._clients)

    def healthy(self, name: str) -> bool:
        """Whether the upstream's current client last connected (a failed connect or a broken
        connection makes it down until the next connect)."""
        client = self._clients.get(name)
        return client is not None and client.healthy

    def down(self) -> list[str]:
        return sorted(name for name, client in self._clients.items() if not client.healthy)

    async def request(
        self,
        name: str,
        request: UpstreamRequest,
        *,
        caller: SecretStr | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Send ``request`` to upstream ``name``: on its shared connection, or on the caller's own for a
        token-exchange upstream (``caller`` is the caller's access token, read for those alone)."""
        client = self.get(name)
        if client.callers is None:
            return await client.request(request, on_send=on_send)
        if caller is None:
            raise CallerTokenRequired(
                f"upstream {name!r} acts on behalf of the caller and needs an OAuth access token to "
                "exchange; API keys cannot be exchanged",
                upstream=name,
            )
        return await client.callers.request(caller, request, None, on_send)

    async def put(self, spec: UpstreamSpec) -> UpstreamClient:
        """Add or replace an upstream's client; a changed spec retires the old client and its connection."""
        assert self._tg is not None, "the pool is used inside its context"
        old = self._clients.get(spec.name)
        if old is not None and old.spec == spec:
            return old
        client = self._client(spec, self._outbound.shared(spec.name, spec.credential), self._callers(spec))
        client.on_health = self._report
        self._clients[spec.name] = client
        if old is not None:
            await old.aclose()
        return client

    async def remove(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            await client.aclose()

    def _client(
        self,
        spec: UpstreamSpec,
        auth: OutboundAuth | None,
        callers: CallerSessions[UpstreamClient] | None = None,
    ) -> UpstreamClient:
        assert self._tg is not None, "the pool is used inside its context"
        return UpstreamClient(
            spec,
            self._tg,
            max_connections=self._max_connections,
            idle_connection_s=self._idle_connection_s,
            reconnect_backoff_s=self._backoff,
            auth=auth,
            callers=callers,
            egress=self.egress,
        )

    def _callers(self, spec: UpstreamSpec) -> CallerSessions[UpstreamClient] | None:
        if not spec.credential.per_caller:
            return None

        def make(token: SecretStr) -> UpstreamClient:
            # Per-caller sessions report no health: one caller's refused token says nothing of the upstream.
            return self._client(spec, self._outbound.for_caller(spec.name, spec.credential, token))

        return CallerSessions(make, max_sessions=self._callers_max, idle_s=self._caller_idle)

    async def _sweep_callers(self) -> None:
        while True:
            await anyio.sleep(max(1.0, min(30.0, self._caller_idle / 2)))
            for client in list(self._clients.values()):
                if client.callers is not None:
                    await client.callers.sweep()

    def _report(self, client: UpstreamClient, healthy: bool) -> None:
        # A retired client (replaced or removed meanwhile) may still finish a request or a connect
        # attempt; what it learns says nothing about the upstream's current definition.
        if self._on_health is not None and self._clients.get(client.spec.name) is client:
            self._on_health(client.spec.name, healthy)
