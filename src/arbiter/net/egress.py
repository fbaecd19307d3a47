"""The connect hook of Arbiter's own HTTP clients towards upstreams and their OAuth token endpoints.

Registration checks where a URL's host resolves to, but DNS may answer differently later (a changed
record, or DNS rebinding). So every new connection resolves the host here, checks every address it gets
with the rule registration used (``urlcheck.refusal``: link-local, cloud metadata,
``upstream.allowed_networks`` / ``denied_networks``) and connects to one of those checked addresses; the
HTTP library never resolves the name itself. TLS still verifies the certificate against the host name,
which httpcore sends as SNI. Pooled connections are reused as usual: the cost is one resolution per new
connection, not per request.

The relay's aiohttp client (``proxy/relay.py``) resolves through ``GuardedResolver``, the same check in
aiohttp's resolver seam; it too resolves once per new connection (its DNS cache is off). aiohttp does
not resolve an IP literal, so such a URL is not checked there: the relay exists only once the SDK's
client has connected to the same URL through ``GuardedBackend``, which checked the literal, and the
address rule is fixed for the process.

These clients do not use ``HTTP(S)_PROXY`` from the environment: a proxy would resolve the name itself,
past the check.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable
from typing import cast

import aiohttp
import anyio
import httpcore2
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult

from arbiter.net.urlcheck import Resolver, is_literal, parse_address, refusal, resolve_host
from arbiter.settings import UpstreamPolicy

log = logging.getLogger(__name__)

SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class EgressRefused(httpcore2.ConnectError):
    """Arbiter would not open a connection: the host resolved to an address the upstream policy forbids.

    A ``ConnectError``, so every client handles it as the failed connection it is (for upstreams:
    ``upstream_unavailable``); the message names the address and the setting, never a secret.
    """


class Egress:
    """The operator's address rule, applied when a connection is opened; one per app.

    ``resolver`` is the seam: tests set it to make a name resolve elsewhere without touching DNS.
    """

    def __init__(self, policy: UpstreamPolicy, resolver: Resolver = resolve_host) -> None:
        self.policy = policy
        self.resolver = resolver

    async def checked(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, in the resolver's order, once each one is allowed.

        One forbidden address refuses them all: a name that answers with a good and a bad address is
        trusted with neither, as at registration.
        """
        try:
            found = list(await self.resolver(host, port))
        except OSError as exc:  # TimeoutError included
            raise httpcore2.ConnectError(f"cannot resolve {host!r} ({type(exc).__name__})") from exc
        if not found:
            raise httpcore2.ConnectError(f"{host!r} resolves to no address")
        for text in found:
            try:
                why = refusal(parse_address(text), self.policy)
            except ValueError:
                why = f"the resolver answered {text!r}, which is not an IP address"
            if why is not None:
                raise EgressRefused(
                    why if is_literal(host) else f"{host!r} resolves to a refused address: {why}"
                )
        return found

    def backend(self, label: str) -> GuardedBackend:
        """A network backend for one client; ``label`` (e.g. ``upstream kb``) names it in log lines."""
        return GuardedBackend(self, label)


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's network backend: resolve, check every address, connect to a checked one."""

    def __init__(
        self, egress: Egress, label: str, inner: httpcore2.AsyncNetworkBackend | None = None
    ) -> None:
        self.egress = egress
        self.label = label
        # anyio's backend serves asyncio and trio alike; httpcore2 defines it conditionally, hence the cast.
        self._inner = inner or cast(httpcore2.AsyncNetworkBackend, httpcore2.AnyIOBackend())
        # Why the last connection was refused; None once one is opened. Clients report it as the cause.
        self.refused: str | None = None

    def transport(
        self, *, limits: httpx2.Limits | None = None, verify: ssl.SSLContext | bool = True
    ) -> GuardedTransport:
        """A new transport (connection pool) connecting through this backend, for one ``AsyncClient``."""
        return GuardedTransport(self, limits=limits or httpx2.Limits(), verify=verify)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        options = list(socket_options or ())
        deadline = None if timeout is None else anyio.current_time() + timeout
        try:
            # Resolution counts towards the connect timeout, as it does in httpcore's own backend.
            with anyio.fail_after(timeout):
                addresses = await self.egress.checked(host, port)
            failure: Exception | None = None
            for i, address in enumerate(addresses):
                # One after the other (no happy eyeballs), each with its share of the time left, so one
                # unreachable address does not use up the whole timeout.
                left = len(addresses) - i
                share = None if deadline is None else max(deadline - anyio.current_time(), 0) / left
                try:
                    stream = await self._inner.connect_tcp(
                        address, port, timeout=share, local_address=local_address, socket_options=options
                    )
                except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                    failure = exc
                    continue
                self.refused = None
                return stream
            assert failure is not None  # checked() never answers with no address
            raise failure
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"resolving {host} took over {timeout}s") from None
        except EgressRefused as exc:
            self.refused = str(exc)
            log.warning("%s: refused to connect to %s:%d: %s", self.label, host, port, exc)
            raise

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise EgressRefused("upstream connections are TCP only")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport, its connection pool opening connections through a ``GuardedBackend``.

    httpx2 takes no network backend of its own, so the pool its constructor built is replaced by one
    with the same settings and the backend.
    """

    def __init__(
        self, backend: GuardedBackend, *, limits: httpx2.Limits, verify: ssl.SSLContext | bool
    ) -> None:
        context = verify if isinstance(verify, ssl.SSLContext) else httpx2.create_ssl_context(verify=verify)
        super().__init__(verify=context, limits=limits)
        self.backend = backend
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver seam: every address a new connection may use is checked first."""

    def __init__(self, backend: GuardedBackend) -> None:
        self._backend = backend

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self._backend.egress.checked(host, port)
        except EgressRefused as exc:
            self._backend.refused = str(exc)
            log.warning("%s: refused to connect to %s:%d: %s", self._backend.label, host, port, exc)
            raise OSError(str(exc)) from None
        except httpcore2.ConnectError as exc:
            raise OSError(str(exc)) from None
        self._backend.refused = None
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def connector(
    backend: GuardedBackend | None, *, limit: int, keepalive_s: float | None
) -> aiohttp.TCPConnector:
    """An aiohttp connection pool whose new connections go through ``backend``'s address check.

    ``keepalive_s=None``: no pooling at all, each request on a connection of its own.
    """
    resolver = GuardedResolver(backend) if backend is not None else None
    if keepalive_s is None:
        return aiohttp.TCPConnector(limit=limit, use_dns_cache=False, resolver=resolver, force_close=True)
    # use_dns_cache off: resolve (and check) for every new connection.
    return aiohttp.TCPConnector(
        limit=limit, use_dns_cache=False, resolver=resolver, keepalive_timeout=keepalive_s
    )
