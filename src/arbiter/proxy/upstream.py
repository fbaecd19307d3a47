"""One pooled, long-lived connection per upstream, reconnected on demand.

The SDK's client negotiates the era (and, in the handshake era, the session), discovers the catalog, and
carries every request to stdio and SSE upstreams. Requests to streamable-HTTP upstreams take the lean
relay (``relay.py``) over the same pooled HTTP client instead: no protocol models on the way.

The SDK's client is an async context manager whose task group must be entered and exited in the
same task, so each connection lives in a task of its own; requests from any task share it. A broken
connection is dropped and re-opened by the next request, no sooner than ``reconnect_backoff_s`` after
the last failed attempt. Only an upstream that cannot be reached breaks a connection: a request that
fails on its own (a timeout, a connection closed mid-answer) fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import aiohttp
import anyio
import httpx2
import mcp_types as types
from anyio.abc import TaskGroup
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from pydantic import TypeAdapter

from arbiter.auth.outbound import CredentialSpec, OutboundAuth, UpstreamAuthFailed
from arbiter.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from arbiter.net.egress import Egress, GuardedTransport, connector
from arbiter.proxy.callers import CallerSessions
from arbiter.proxy.catalog import UpstreamCatalog, discover
from arbiter.proxy.fresh_retry import FreshRetry
from arbiter.proxy.relay import (
    SESSION_HEADER,
    Interrupted,
    Relay,
    SessionLost,
    Stale,
    Unreachable,
    UpstreamRequest,
    relay_sessions,
)

log = logging.getLogger(__name__)

# The SDK types result adapters for its own models; a plain dict keeps the upstream's answer verbatim.
_RAW_RESULT: Any = TypeAdapter(dict[str, Any])
# What an upstream says when its lists or a resource changed (UpstreamClient.on_notification).
_CHANGE_NOTIFICATIONS = (
    types.ToolListChangedNotification,
    types.PromptListChangedNotification,
    types.ResourceListChangedNotification,
    types.ResourceUpdatedNotification,
)
T = TypeVar("T")


# How a call failed before it reached the upstream (the pool's retry, breaker and fallback read these;
# agents see plain ``upstream_unavailable``).
class NotConnected(UpstreamUnavailable):
    """Nothing was tried: the reconnect backoff holds after a failure, or the client is retired."""


class ConnectFailed(UpstreamUnavailable):
    """No connection to the upstream could be opened: the request never left Arbiter."""


class StaleConnection(UpstreamUnavailable):
    """A pooled connection failed before any answer (most likely closed by the upstream while idle): this
    request fails, since it may have run, but the upstream is not down and its circuit does not count it."""


class SessionGone(UpstreamUnavailable):
    """The upstream answered that it forgot our session (it restarted): the request never ran."""


@dataclass(frozen=True)
class UpstreamSpec:
    """What the pool needs to reach one upstream (built from the registry row)."""

    name: str
    transport: str
    url: str | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict[str, str])
    cwd: str | None = None
    connect_timeout_s: float = 10.0
    call_timeout_s: float = 30.0
    credential: CredentialSpec = field(default_factory=CredentialSpec)
    max_concurrency: int | None = None  # the pool's bulkhead for it (None: upstream.max_concurrency)
    fallback: str | None = None  # the pool sends calls there when this one cannot take them


class _Connection:
    """One upstream session, the event that tells its owner task to close it, and what we learnt of it."""

    def __init__(self) -> None:
        self.close = anyio.Event()
        self.session: ClientSession | None = None
        self.relay: Relay | None = None  # streamable-HTTP upstreams: requests bypass the SDK session
        self.session_id: str | None = None  # what the upstream's initialize answer named (handshake era)
        self.broken = False
        # Set when the upstream answered 404 to our session id: it restarted and forgot us, so the
        # request never ran and may be retried on a new session.
        self.session_lost = False


class UpstreamClient:
    """The pooled connection to one upstream."""

    def __init__(
        self,
        spec: UpstreamSpec,
        task_group: TaskGroup,
        *,
        max_connections: int,
        reconnect_backoff_s: float,
        idle_connection_s: float = 4.0,
        auth: OutboundAuth | None = None,
        callers: CallerSessions[UpstreamClient] | None = None,
        egress: Egress | None = None,
        ask_agents: bool = False,
    ) -> None:
        self.spec = spec
        # Declare elicitation, sampling and roots on the shared session: Arbiter puts such requests to the
        # agent whose call they belong to (proxy/downstream.py), or answers "not supported" per call.
        self._ask_agents = ask_agents
        self._tg = task_group
        self._max_connections = max_connections
        self._idle_s = idle_connection_s  # pooled connections idle this long are closed (settings)
        self._backoff = reconnect_backoff_s
        self._auth = auth  # Arbiter's own credential for this upstream (never the caller's)
        # Token exchange: calls run on per-caller sessions; this client's own session serves discovery.
        self.callers = callers
        # Every new HTTP connection resolves and checks the host again (upstream.allowed_networks, ...).
        self._egress = egress.backend(f"upstream {spec.name}") if egress is not None else None
        self._conn: _Connection | None = None
        self._lock = anyio.Lock()
        self._last_failure = 0.0
        self._closed = False
        self.last_error: str | None = None
        self.connects = 0  # how many sessions were opened; tests use it to prove pooling
        # Told (this client, whether it is up) when a connect succeeds or fails, or a connection breaks:
        # the pool keeps the upstream's health (proxy/health.py).
        self.on_health: Callable[[UpstreamClient, bool], None] | None = None
        # Told (method, params) of the upstream's change notifications on this client's own session:
        # list_changed and resources/updated (proxy/notifications.py). Called in the SDK's receive loop,
        # so it must not block.
        self.on_notification: Callable[[str, dict[str, Any] | None], None] | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.broken

    def live_session(self) -> ClientSession | None:
        """The SDK session of the open connection, if there is one; never connects (nor marks anything
        down): Arbiter's own subscriptions upstream ride connections that requests opened."""
        conn = self._conn
        return conn.session if conn is not None and not conn.broken else None

    async def _notified(self, message: object) -> None:
        # The SDK client's message handler: server notifications (and transport errors, ignored here).
        if self.on_notification is None or not isinstance(message, _CHANGE_NOTIFICATIONS):
            return
        data: dict[str, Any] = message.model_dump(by_alias=True, mode="json", exclude_none=True)
        method = data.get("method")
        if isinstance(method, str):
            self.on_notification(method, data.get("params"))

    async def request(
        self,
        request: UpstreamRequest,
        *,
        deadline_s: float | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Send one request on this client's own connection and return the upstream's raw result;
        JSON-RPC errors from it pass through. (``UpstreamPool.request`` routes a token-exchange
        upstream's requests to per-caller clients instead.)

        ``on_send`` is called just before the request is handed to the upstream: a failure before that
        point (no connection, no credential) means the upstream never saw the request. ``deadline_s``
        bounds the whole request: fetching a token, connecting, sending and a retry on a new session.
        """
        deadline = deadline_s or self.spec.call_timeout_s

        async def send(conn: _Connection) -> dict[str, Any]:
            if conn.relay is not None:
                return await conn.relay.request(request, on_send=on_send)  # _run holds the deadline
            assert conn.session is not None
            if on_send is not None:
                on_send()
            # The SDK's own per-request timeout (REQUEST_TIMEOUT) too: its clean end of the request; _run's
            # deadline also bounds the token fetch and the connect before it.
            result: dict[str, Any] = await conn.session.send_request(
                _sdk_request(request),
                _RAW_RESULT,
                request_read_timeout_seconds=deadline,
                progress_callback=_progress_relay(request),
            )
            return result

        return await self._run(request.method, deadline, send)

    async def discover(self) -> UpstreamCatalog:
        """List what the upstream offers, under its connect + call deadline."""
        deadline = self.spec.connect_timeout_s + self.spec.call_timeout_s

        async def list_all(conn: _Connection) -> UpstreamCatalog:
            assert conn.session is not None
            with anyio.fail_after(deadline):
                return await discover(self.spec.name, conn.session)

        try:
            return await self._run("discovery", deadline, list_all)
        except MCPError as exc:  # no agent to pass the upstream's own error to: it is a protocol failure
            raise UpstreamProtocolError(
                f"upstream {self.spec.name!r} failed discovery: {exc.message[:200]}", upstream=self.spec.name
            ) from exc

    async def aclose(self) -> None:
        """Close the connection; this client is retired and never connects again."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close.set()
        if self.callers is not None:
            await self.callers.aclose()

    async def _run(self, method: str, deadline: float, op: Callable[[_Connection], Awaitable[T]]) -> T:
        """Run ``op`` on the connection, mapping failures; retry once if the upstream forgot our session.

        One deadline covers it all (a token fetch, the connect, each attempt): when it passes, the
        request fails with ``UpstreamTimeout``."""
        try:
            # asyncio's own timeout rather than anyio.fail_after: this runs once per call, and anyio looks
            # up the running async library (sniffio, current_task) on every entry, which a profile of the
            # handshake era put at a tenth of the request path's CPU. Nothing below shields itself.
            async with asyncio.timeout(deadline):
                for attempt in (1, 2):
                    if self._auth is not None:
                        # Token fetches happen here, in the caller's task, so their failures reach the caller.
                        await self._auth.ready()
                    conn = await self._connection()
                    try:
                        return await op(conn)
                    except Exception as exc:
                        failure = self._failure(method, conn, deadline, exc)
                        if conn.session_lost and attempt == 1:
                            continue
                        if failure is exc:  # the upstream's own JSON-RPC error, or something unforeseen
                            raise
                        raise failure from exc
        except TimeoutError:  # our deadline (``op``'s own timeouts are mapped above)
            raise self._timeout(method, deadline) from None
        raise AssertionError("unreachable")  # pragma: no cover - the second attempt returns or raises

    def _failure(self, method: str, conn: _Connection, deadline: float, exc: Exception) -> Exception:
        """Map a failed request to Arbiter's errors; the upstream's own JSON-RPC errors pass through."""
        if isinstance(exc, SessionLost):
            conn.session_lost = True
        elif isinstance(exc, Unreachable):
            # The upstream is down: reconnect, report it. The request never left.
            return self._unavailable(str(exc), conn, ConnectFailed)
        elif isinstance(exc, Stale):
            self.last_error = f"{method}: {exc}"
            log.warning("upstream %s: %s", self.spec.name, self.last_error)
            return StaleConnection.of(self.spec.name)
        elif isinstance(exc, Interrupted):
            # One request's connection failed mid-answer (after the relay's retry of an unanswered one):
            # that request fails; the upstream answered, so it stays up and the connection stays open.
            return self._unavailable(f"{method}: {exc}", None)
        if conn.session_lost:
            return self._session_lost(conn)
        if isinstance(exc, TimeoutError):
            return self._timeout(method, deadline)
        if isinstance(exc, MCPError):
            if exc.code == types.REQUEST_TIMEOUT:  # a slow upstream, not a broken connection: keep it
                return self._timeout(method, deadline)
            return self._unavailable(exc.message, conn) if exc.code == types.CONNECTION_CLOSED else exc
        if isinstance(
            exc, OSError | httpx2.TransportError | anyio.BrokenResourceError | anyio.ClosedResourceError
        ):
            return self._unavailable(type(exc).__name__, conn)
        if isinstance(exc, ValueError):  # includes pydantic.ValidationError of a malformed result
            return UpstreamProtocolError(
                f"upstream {self.spec.name!r} answered {method} with an invalid result",
                upstream=self.spec.name,
            )
        return exc

    def backoff_left(self) -> float:
        """Seconds until the reconnect backoff after a failed connect lets a new attempt through (and a
        hair more: a timer may wake a clock tick early)."""
        if not self._last_failure:
            return 0.0
        return max(0.0, self._last_failure + self._backoff + 0.01 - time.monotonic())

    def _drop(self, conn: _Connection) -> bool:
        """Close ``conn`` if it is still this client's connection; whether it was."""
        if conn is not self._conn:
            return False
        conn.broken = True
        conn.close.set()
        self._conn = None
        return True

    def _timeout(self, method: str, deadline: float) -> UpstreamTimeout:
        # A slow upstream, not a gone one: it stays listed and its connection stays open.
        self.last_error = f"{method} timed out after {deadline:g}s"
        log.warning("upstream %s: %s", self.spec.name, self.last_error)
        return UpstreamTimeout.after(self.spec.name, deadline)

    def _session_lost(self, conn: _Connection) -> UpstreamUnavailable:
        # The upstream answered (it restarted and forgot us): drop the session so the next request opens
        # a new one at once. No backoff and no "down": the upstream is there.
        self._drop(conn)
        self.last_error = "the upstream lost our session (it restarted)"
        log.warning("upstream %s: %s", self.spec.name, self.last_error)
        return SessionGone.of(self.spec.name)

    def _unavailable(
        self, why: str, conn: _Connection | None, kind: type[UpstreamUnavailable] = UpstreamUnavailable
    ) -> UpstreamUnavailable:
        # With a connection: it broke, so drop it and report the upstream down. Without one (a deadline
        # passed): the upstream is slow, not gone, and stays listed.
        if conn is not None and self._drop(conn):
            self._last_failure = time.monotonic()
            self._report(False)
        refused = self._refused() if conn is not None else None
        if refused is not None:  # a new connection to a forbidden address, not a network failure
            why = f"connection refused by Arbiter: {refused}"
        self.last_error = why
        log.warning("upstream %s unavailable: %s", self.spec.name, why)
        return kind.of(self.spec.name)

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        async with self._lock:
            if self._conn is not None and not self._conn.broken:
                return self._conn
            if self._closed or (self._last_failure and time.monotonic() - self._last_failure < self._backoff):
                raise NotConnected.of(self.spec.name)
            if self._egress is not None:
                self._egress.refused = None
            try:
                with anyio.fail_after(self.spec.connect_timeout_s):
                    conn = await self._tg.start(self._run_connection)
            except Exception as exc:
                self._last_failure = time.monotonic()
                self.last_error = f"connect failed: {type(exc).__name__}"
                self._report(False)
                refused = self._refused()
                if refused is not None:  # the SDK may hide the cause; say it plainly
                    self.last_error = f"connect refused by Arbiter: {refused}"
                    log.warning("upstream %s: connect refused: %s", self.spec.name, refused)
                else:
                    log.warning("upstream %s: connect failed: %s", self.spec.name, _describe(exc))
                status = self._auth.last_status if self._auth is not None else None
                if status in (401, 403):  # say so: "unavailable" would send the operator the wrong way
                    self.last_error = f"connect failed: the upstream refused Arbiter's credential ({status})"
                    raise UpstreamAuthFailed(
                        f"upstream {self.spec.name!r} refused Arbiter's credential (HTTP {status})",
                        upstream=self.spec.name,
                    ) from exc
                raise ConnectFailed.of(self.spec.name) from exc
            if self._closed:  # retired while connecting (the upstream was changed or removed)
                conn.close.set()
                raise NotConnected.of(self.spec.name)
            self._conn = conn
            self.last_error = None
            self.connects += 1
            self._report(True)
            return conn

    def _spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tg.start_soon(work)

    def _refused(self) -> str | None:
        return self._egress.refused if self._egress is not None else None

    def _transport(self) -> GuardedTransport | None:
        """A transport checking every new connection's address, or None for httpx2's own."""
        if self._egress is None:
            return None
        return self._egress.transport(limits=self._limits())

    def _retrying_transport(self) -> FreshRetry:
        """The SDK session's transport: pooled, and a request that met a stale pooled connection sent
        once more on a new one (``fresh_retry.py``), so the session survives it."""
        once = httpx2.Limits(max_connections=self._max_connections, max_keepalive_connections=0)
        if self._egress is None:
            return FreshRetry(
                httpx2.AsyncHTTPTransport(limits=self._limits()), httpx2.AsyncHTTPTransport(limits=once)
            )
        return FreshRetry(self._egress.transport(limits=self._limits()), self._egress.transport(limits=once))

    def _limits(self) -> httpx2.Limits:
        return httpx2.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
            keepalive_expiry=self._idle_s,
        )

    def _report(self, healthy: bool) -> None:
        if self.on_health is not None:
            self.on_health(self, healthy)

    async def _run_connection(self, *, task_status: anyio.abc.TaskStatus[_Connection]) -> None:
        conn = _Connection()
        started = False
        try:
            async with self._client(conn) as client, AsyncExitStack() as stack:
                conn.session = client.session
                if self.spec.transport == "streamable_http" and self.spec.url is not None:
                    http, fresh_http = await stack.enter_async_context(self._relay_pools())
                    conn.relay = Relay(
                        self.spec.url,
                        http,
                        fresh_http,
                        protocol_version=client.protocol_version,
                        session_id=conn.session_id,
                        credential=self._auth.headers if self._auth is not None else None,
                        renew=self._auth.renewed if self._auth is not None else None,
                        spawn=self._spawn,
                    )
                task_status.started(conn)
                started = True
                await conn.close.wait()
        except Exception as exc:
            if not started:
                raise
            log.info("upstream %s: connection ended: %s", self.spec.name, _describe(exc))
        finally:
            conn.broken = True

    def _client(self, conn: _Connection) -> Client:
        spec = self.spec
        if spec.transport == "stdio":
            params = StdioServerParameters(
                command=spec.command[0], args=list(spec.command[1:]), env=spec.env or None, cwd=spec.cwd
            )
            return Client(params, mode="auto", cache=None, message_handler=self._notified, **self._asks())
        assert spec.url is not None
        if spec.transport == "sse":
            transport = sse_client(
                spec.url,
                timeout=spec.connect_timeout_s,
                httpx_client_factory=self._sse_http_client,
                auth=self._auth,
            )
            return Client(
                transport, mode="legacy", cache=None, message_handler=self._notified, **self._asks()
            )

        async def watch_session(response: httpx2.Response) -> None:
            if response.status_code == 404 and SESSION_HEADER in response.request.headers:
                conn.session_lost = True
            elif conn.relay is None and (sid := response.headers.get(SESSION_HEADER)) is not None:
                conn.session_id = sid  # the handshake's answer: the relay's requests belong to this session

        http = httpx2.AsyncClient(
            # Redirects: the SDK itself follows only same-origin, method-preserving ones and refuses the
            # rest; this client adds none of its own.
            follow_redirects=False,
            timeout=httpx2.Timeout(spec.call_timeout_s, connect=spec.connect_timeout_s),
            limits=self._limits(),
            event_hooks={"response": [watch_session]},
            auth=self._auth,
            transport=self._retrying_transport(),  # it holds the limits above
        )
        return Client(
            _http_transport(spec.url, http),
            mode="auto",
            cache=None,
            message_handler=self._notified,
            **self._asks(),
        )

    def _asks(self) -> dict[str, Any]:
        """The SDK client's callbacks for requests from the upstream, which declare the capabilities to it.

        Those the relay reads in a call's own answer go to that call's agent; what reaches the shared
        session itself (its standalone stream, stdio, SSE) belongs to no call that Arbiter can tell, and is
        refused: never put to an agent it may not belong to."""
        if not self._ask_agents:
            return {}
        return {
            "elicitation_callback": _unattributed,
            "sampling_callback": _unattributed,
            "list_roots_callback": _unattributed,
        }

    def _relay_pools(
        self,
    ) -> AbstractAsyncContextManager[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
        """The relay's connection pool, and a client keeping no connection for a retry's fresh one."""
        return relay_sessions(
            connector(self._egress, limit=self._max_connections, keepalive_s=self._idle_s),
            connector(self._egress, limit=self._max_connections, keepalive_s=None),
            connect_timeout_s=self.spec.connect_timeout_s,
        )

    def _sse_http_client(
        self,
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        # A new transport per client: closing the client closes its transport.
        return httpx2.AsyncClient(
            headers=headers, timeout=timeout, auth=auth, follow_redirects=False, transport=self._transport()
        )


async def _unattributed(context: ClientRequestContext, params: Any = None) -> types.ErrorData:
    return types.ErrorData(
        code=types.INVALID_REQUEST,
        message="Arbiter relays requests to agents only inside the answer to their own call "
        "on streamable HTTP",
    )


def _progress_relay(request: UpstreamRequest) -> ProgressFnT | None:
    """For the SDK's session (stdio, SSE upstreams): the call's progress, back under the agent's token.

    The SDK sends its own request id as the token and finds the call by it; the agent knows its own."""
    downstream = request.downstream
    meta: Any = request.params.get("_meta")
    token: Any = cast(dict[str, Any], meta).get("progressToken") if isinstance(meta, dict) else None
    if downstream is None or token is None:
        return None

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        params: dict[str, Any] = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await downstream.message({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

    return relay


def _sdk_request(request: UpstreamRequest) -> types.ClientRequest:
    """The SDK's model of ``request``, for upstreams the relay does not serve (stdio, SSE).

    Without the agent's log-level opt-in: on these transports a log message carries nothing that ties it
    to a call (one stream for everything, no request id in it), so Arbiter drops them all (``_notified``
    hears only change notifications) and does not ask a 2026-07-28 upstream to send them."""
    params = request.params
    meta: Any = params.get("_meta")
    if isinstance(meta, dict) and types.LOG_LEVEL_META_KEY in meta:
        kept = {k: v for k, v in cast(dict[str, Any], meta).items() if k != types.LOG_LEVEL_META_KEY}
        params = {**params, "_meta": kept}
    match request.method:
        case "tools/call":
            return types.CallToolRequest(params=types.CallToolRequestParams.model_validate(params))
        case "prompts/get":
            return types.GetPromptRequest(params=types.GetPromptRequestParams.model_validate(params))
        case "resources/read":
            return types.ReadResourceRequest(params=types.ReadResourceRequestParams.model_validate(params))
        case "completion/complete":
            return types.CompleteRequest(params=types.CompleteRequestParams.model_validate(params))
        case _:
            raise ValueError(f"no upstream request for {request.method}")


@asynccontextmanager
async def _http_transport(url: str, http: httpx2.AsyncClient) -> AsyncGenerator[TransportStreams]:
    """Streamable HTTP over Arbiter's own HTTP client, closed with the transport."""
    async with http, streamable_http_client(url, http_client=http) as streams:
        yield streams


def _describe(exc: BaseException) -> str:
    # Exception groups from task groups hide the cause; name the leaves, never their arguments' secrets.
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(_describe(e) for e in exc.exceptions)  # pyright: ignore[reportUnknownVariableType, reportUnknownMemberType, reportUnknownArgumentType]
    return f"{type(exc).__name__}: {str(exc)[:200]}"
