"""The upstream pool: the one owner of upstream connections.

One ``UpstreamClient`` per enabled upstream, built and closed in the app lifespan. Every request goes
through ``request``, which routes it to the upstream's shared connection or, for a token-exchange
upstream, to the caller's own. The pool holds each upstream's health (``health``: what its current
client last learnt); the catalog, the registry and the readiness probe read it there.

Each upstream also has a guard (docs/resilience.md): one deadline per call (the upstream's
``call_timeout_s`` or the tool's own), covering the wait for a slot, a token fetch, connecting, retries
and a fallback; a circuit breaker; a bulkhead; a retry budget; and the fallback upstream a call goes to
when this one cannot take it. Health (did the last connect work?) and the circuit (how did the last
calls end?) are separate: a new connection after a failure closes the circuit, since it proves the
upstream is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup
from mcp.shared.exceptions import MCPError
from pydantic import SecretStr

from arbiter.auth.outbound import CallerTokenRequired, Outbound, OutboundAuth, UpstreamAuthFailed
from arbiter.auth.secrets import SecretBox
from arbiter.errors import ArbiterError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from arbiter.net.egress import Egress
from arbiter.proxy.breaker import Breaker, State
from arbiter.proxy.bulkhead import Bulkhead
from arbiter.proxy.callers import CallerSessions
from arbiter.proxy.health import Health
from arbiter.proxy.relay import UpstreamRequest
from arbiter.proxy.retries import READS, RetryBudget, ToolSetting, backoff
from arbiter.proxy.upstream import (
    ConnectFailed,
    NotConnected,
    SessionGone,
    StaleConnection,
    UpstreamClient,
    UpstreamSpec,
)
from arbiter.settings import UpstreamPolicy

# Failures after which the request cannot have reached the upstream: safe to send again, or elsewhere.
_NEVER_SENT = (ConnectFailed, SessionGone)
# Failures that say nothing about the upstream's reachability (it was not tried, it answered, or a pooled
# connection it had closed while idle met the request), nor credential refusals: one caller's refused
# token must not open a circuit every caller shares.
_NEUTRAL = (NotConnected, SessionGone, StaleConnection, UpstreamAuthFailed)


@dataclass(slots=True)
class _Guard:
    breaker: Breaker | None  # None: upstream.breaker_threshold is 0
    bulkhead: Bulkhead
    budget: RetryBudget
    fallback: str | None


class UpstreamPool:
    def __init__(
        self,
        *,
        max_connections: int,
        reconnect_backoff_s: float,
        idle_connection_s: float = 4.0,
        outbound: Outbound | None = None,
        caller_sessions_max: int = 256,
        caller_session_idle_s: float = 300.0,
        egress: Egress | None = None,
        policy: UpstreamPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        ask_agents: bool = False,
    ) -> None:
        # Relay upstreams' requests (elicitation, sampling, roots) to agents: declared on their sessions.
        self._ask_agents = ask_agents
        self.health = Health()  # written here only, from the current clients' reports (see _report)
        self._clients: dict[str, UpstreamClient] = {}
        self._guards: dict[str, _Guard] = {}
        self._policy = policy or UpstreamPolicy()
        self._clock = clock  # the breakers' and retry budgets' (deadlines use time.monotonic, as anyio)
        # upstream -> its own tool name -> what a security admin set (tool_settings); empty: nothing set.
        self._tool_settings: dict[str, dict[str, ToolSetting]] = {}
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
        """Whether the upstream is served and its current client last connected (a failed connect or a
        broken connection makes it down until the next connect)."""
        return name in self._clients and self.health.up(name)

    def down(self) -> list[str]:
        return self.health.down()

    def circuit_states(self) -> dict[str, str]:
        """Each upstream's circuit: ``closed``, ``open`` or ``half_open`` (for metrics and the admin API)."""
        return {
            name: guard.breaker.state if guard.breaker is not None else "closed"
            for name, guard in sorted(self._guards.items())
        }

    def circuit(self, name: str) -> State | None:
        guard = self._guards.get(name)
        if guard is None:
            return None
        return guard.breaker.state if guard.breaker is not None else "closed"

    def set_tool_settings(self, settings: Mapping[str, Mapping[str, ToolSetting]]) -> None:
        """Replace every tool's settings (the registry loads them from ``tool_settings``)."""
        self._tool_settings = {up: dict(tools) for up, tools in settings.items() if tools}

    def tool_setting(self, name: str, request: UpstreamRequest) -> ToolSetting | None:
        tools = self._tool_settings.get(name) if self._tool_settings else None
        if tools is None or request.method != "tools/call":
            return None
        return tools.get(request.params.get("name"))  # pyright: ignore[reportArgumentType]

    async def request(
        self,
        name: str,
        request: UpstreamRequest,
        *,
        caller: SecretStr | None = None,
        on_send: Callable[[], None] | None = None,
        on_fallback: Callable[[str], None] | None = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        """Send ``request`` to upstream ``name``: on its shared connection, or on the caller's own for a
        token-exchange upstream (``caller`` is the caller's access token, read for those alone).

        Under one deadline, through the upstream's circuit breaker and bulkhead, retried when safe; sent
        to its fallback (``on_fallback`` is told its name) when the circuit is open or the call failed
        before it reached the upstream. A passed deadline raises ``UpstreamTimeout``.

        ``via``: the request continues a multi-round-trip exchange that upstream (``name`` or its
        fallback) began, and carries its state and the user's answers: it goes there and nowhere else,
        never to a fallback; when that upstream cannot take it, the call fails."""
        client = self._clients.get(name)
        if client is None:
            raise UpstreamUnavailable.of(name)
        guard = self._guards[name]
        if via is not None:
            return await self._pinned(name, via, guard, request, caller, on_send)
        setting = self.tool_setting(name, request)
        timeout, deadline, request = _plan(client, setting, request)
        try:
            return await self._guarded(
                name, client, guard, setting, request, caller, on_send, deadline, timeout
            )
        except UpstreamUnavailable as exc:
            fallback = guard.fallback
            if fallback is None or not _before_upstream(exc):
                raise
            other = self._clients.get(fallback)
            if other is None:
                raise
            if on_fallback is not None:
                on_fallback(fallback)
            theirs = self.tool_setting(fallback, request)
            if request.may_resend and request.method not in READS and not (theirs and theirs.idempotent):
                request = replace(request, may_resend=False)  # marked idempotent on the primary only
            try:
                return await self._guarded(
                    fallback,
                    other,
                    self._guards[fallback],
                    theirs,
                    request,
                    caller,
                    on_send,
                    deadline,
                    timeout,
                )
            except ArbiterError as failed:
                _rename(failed, fallback, name)  # the caller knows the tool's own upstream, not the fallback
                raise

    async def _pinned(
        self,
        name: str,
        via: str,
        guard: _Guard,
        request: UpstreamRequest,
        caller: SecretStr | None,
        on_send: Callable[[], None] | None,
    ) -> dict[str, Any]:
        """Send a continued exchange to the upstream that began it (``request``'s ``via``), only."""
        client = self._clients.get(via) if via in (name, guard.fallback) else None
        if client is None:  # removed, or no longer this tool's fallback: its state can go nowhere else
            raise UpstreamUnavailable(f"upstream {name!r} is unavailable: {_PINNED}", upstream=name)
        setting = self.tool_setting(via, request)
        timeout, deadline, request = _plan(client, setting, request)
        try:
            return await self._guarded(
                via, client, self._guards[via], setting, request, caller, on_send, deadline, timeout
            )
        except ArbiterError as failed:
            _rename(failed, via, name)  # the caller knows the tool's own upstream, not the fallback
            timed_out = isinstance(failed, UpstreamTimeout)
            if guard.fallback is not None and isinstance(failed, UpstreamUnavailable) and not timed_out:
                # Say why it did not go to the fallback.
                failed.message = f"{failed.message}; {_PINNED}"
                failed.args = (failed.message,)
            raise

    async def _guarded(
        self,
        name: str,
        client: UpstreamClient,
        guard: _Guard,
        setting: ToolSetting | None,
        request: UpstreamRequest,
        caller: SecretStr | None,
        on_send: Callable[[], None] | None,
        deadline: float,
        timeout_s: float,
    ) -> dict[str, Any]:
        breaker = guard.breaker
        probe = breaker.admit() if breaker is not None else False
        bulkhead = guard.bulkhead
        if not bulkhead.try_acquire():
            try:
                await bulkhead.acquire(deadline)
            except BaseException as exc:  # refused, or cancelled while waiting: the probe is not made
                if probe and breaker is not None:
                    breaker.release()
                if isinstance(exc, UpstreamUnavailable) and time.monotonic() >= deadline:
                    raise UpstreamTimeout.after(name, timeout_s) from None
                raise
        guard.budget.earn()
        attempt = 0
        try:
            while True:
                attempt += 1
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise UpstreamTimeout.after(name, timeout_s)
                    result = await self._send(name, client, request, caller, on_send, remaining)
                except (UpstreamUnavailable, MCPError, UpstreamProtocolError) as exc:
                    if breaker is not None:
                        _judge(breaker, exc, probe)
                        probe = False
                    if isinstance(exc, UpstreamTimeout):
                        raise UpstreamTimeout.after(name, timeout_s) from exc
                    delay = backoff(attempt - 1)
                    if isinstance(exc, ConnectFailed):  # wait out the reconnect backoff, if it fits
                        delay = max(delay, _backoff_left(client, caller))
                    if time.monotonic() + delay >= deadline or not self._retry(
                        exc, attempt, request, setting, guard
                    ):
                        raise
                    await anyio.sleep(delay)
                    if breaker is not None:
                        probe = breaker.admit()  # the circuit may have opened meanwhile
                    continue
                if breaker is not None and (probe or breaker.failures):
                    breaker.success()
                    probe = False
                return result
        finally:
            if probe and breaker is not None:
                breaker.release()  # cancelled, or an error that is no upstream outcome
            bulkhead.release()

    def _retry(
        self,
        exc: Exception,
        attempt: int,
        request: UpstreamRequest,
        setting: ToolSetting | None,
        guard: _Guard,
    ) -> bool:
        """Whether a failed attempt is sent again: safe to, tries and retry budget left."""
        if attempt >= self._policy.retry_attempts or not isinstance(exc, UpstreamUnavailable):
            return False
        if isinstance(exc, _NEVER_SENT):
            pass  # it never reached the upstream
        elif isinstance(exc, NotConnected) or exc.details.get("circuit") or exc.details.get("bulkhead"):
            return False  # nothing was tried (backoff, open circuit): trying again now would not either
        elif not request.may_resend:
            return False  # it may have run: a tools/call runs once unless an admin said it is idempotent
        if guard.breaker is not None and guard.breaker.opened_at is not None:
            return False
        return guard.budget.spend()

    async def _send(
        self,
        name: str,
        client: UpstreamClient,
        request: UpstreamRequest,
        caller: SecretStr | None,
        on_send: Callable[[], None] | None,
        remaining: float,
    ) -> dict[str, Any]:
        if client.callers is None:
            return await client.request(request, deadline_s=remaining, on_send=on_send)
        if caller is None:
            raise CallerTokenRequired(
                f"upstream {name!r} acts on behalf of the caller and needs an OAuth access token to "
                "exchange; API keys cannot be exchanged",
                upstream=name,
            )
        return await client.callers.request(caller, request, remaining, on_send)

    async def put(self, spec: UpstreamSpec, *, up: bool | None = None) -> UpstreamClient:
        """Add or replace an upstream's client; a changed spec retires the old client and its connection.
        The upstream's health stays what was last learnt until the new client connects or fails, or is
        ``up`` when given (a definition restored after its replacement failed is as it was)."""
        assert self._tg is not None, "the pool is used inside its context"
        old = self._clients.get(spec.name)
        if old is not None and old.spec == spec:
            return old  # the same client: what it learnt stands, whatever ``up`` says
        if up is not None:
            self.health.mark(spec.name, up)
        client = self._client(spec, self._outbound.shared(spec.name, spec.credential), self._callers(spec))
        client.on_health = self._report
        self._clients[spec.name] = client
        self._guards[spec.name] = self._guard(spec)
        if old is not None:
            await old.aclose()
        return client

    async def remove(self, name: str) -> None:
        self._guards.pop(name, None)
        client = self._clients.pop(name, None)
        try:
            if client is not None:
                await client.aclose()
        finally:
            # Only now: while it closes, a down upstream's entries stay out of the catalog's lists.
            self.health.forget(name)

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
            ask_agents=self._ask_agents,
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

    def _guard(self, spec: UpstreamSpec) -> _Guard:
        p = self._policy
        breaker = None
        if p.breaker_threshold:
            breaker = Breaker(
                spec.name, threshold=p.breaker_threshold, open_s=p.breaker_open_s, clock=self._clock
            )
        return _Guard(
            breaker=breaker,
            bulkhead=Bulkhead(
                spec.name,
                limit=spec.max_concurrency or p.max_concurrency,
                max_waiting=p.max_waiting,
                wait_s=p.queue_timeout_s,
            ),
            budget=RetryBudget(ratio=p.retry_ratio, min_per_s=p.retry_min_per_s, clock=self._clock),
            fallback=spec.fallback,
        )

    def _report(self, client: UpstreamClient, healthy: bool) -> None:
        # A retired client (replaced or removed meanwhile) may still finish a request or a connect
        # attempt; what it learns says nothing about the upstream's current definition.
        if self._clients.get(client.spec.name) is not client:
            return
        if healthy:  # a new connection after a failure: the upstream is back, so is its circuit
            guard = self._guards.get(client.spec.name)
            if guard is not None and guard.breaker is not None:
                guard.breaker.reset()
        self.health.mark(client.spec.name, healthy)


_PINNED = "this call continues an exchange (requestState) begun on one upstream, so it is not sent to another"


def _plan(
    client: UpstreamClient, setting: ToolSetting | None, request: UpstreamRequest
) -> tuple[float, float, UpstreamRequest]:
    """A call's timeout, its deadline from now, and the request marked safe to send twice if it is."""
    timeout = setting.timeout_s if setting is not None and setting.timeout_s else client.spec.call_timeout_s
    if not request.may_resend and (request.method in READS or (setting is not None and setting.idempotent)):
        request = replace(request, may_resend=True)  # safe to send twice (relay.py)
    return timeout, time.monotonic() + timeout, request


def _before_upstream(exc: UpstreamUnavailable) -> bool:
    """Whether a failed call never reached the upstream (so another upstream may take it)."""
    if isinstance(exc, UpstreamTimeout):
        return False
    return isinstance(exc, NotConnected | ConnectFailed | SessionGone) or bool(
        exc.details.get("circuit") or exc.details.get("bulkhead")
    )


def _backoff_left(client: UpstreamClient, caller: SecretStr | None) -> float:
    """Until the connection the call used (the shared one, or the caller's own) may connect again."""
    if client.callers is not None and caller is not None:
        return client.callers.backoff_left(caller)
    return client.backoff_left()


def _rename(exc: ArbiterError, fallback: str, primary: str) -> None:
    """Make ``exc``, raised for the fallback, name the primary upstream (the one the caller's tool
    belongs to) instead: a refusal must not reveal an upstream the caller may not know."""
    if exc.details.get("upstream") != fallback:
        return
    exc.message = exc.message.replace(repr(fallback), repr(primary))
    exc.args = (exc.message,)
    exc.details["upstream"] = primary


def _judge(breaker: Breaker, exc: Exception, probe: bool) -> None:
    """Tell the breaker how an attempt ended: transport failures and timeouts count, the upstream's own
    answers (JSON-RPC errors, even malformed ones) prove it is there, and the rest (nothing tried, a
    refused credential) says nothing."""
    if isinstance(exc, MCPError | UpstreamProtocolError):
        breaker.success()
    elif isinstance(exc, _NEUTRAL) or (
        isinstance(exc, UpstreamUnavailable) and (exc.details.get("circuit") or exc.details.get("bulkhead"))
    ):
        if probe:
            breaker.release()
    else:
        breaker.failure()
