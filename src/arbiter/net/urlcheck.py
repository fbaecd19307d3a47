"""Where an upstream (or its OAuth token endpoint) may point: http(s) only, no credentials in the URL, no
link-local or cloud-metadata addresses unless the operator allows them (settings
``upstream.allow_link_local`` / ``allow_metadata_hosts``), and only addresses inside
``upstream.allowed_networks`` (when set) and outside ``upstream.denied_networks``.

``check_upstream_url`` resolves the host at registration. A name may re-resolve elsewhere later, so
``net/egress.py`` applies the same rule (``refusal``) again on every new connection, to every address
the host then resolves to, and connects only to an address it checked.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import anyio

from arbiter.errors import InvalidInput
from arbiter.settings import UpstreamPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses it resolves to, as getaddrinfo spells them (IPv6 may carry a %scope).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
METADATA_IPS = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
RESOLVE_TIMEOUT_S = 5.0


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, field="url")


async def check_upstream_url(url: str, policy: UpstreamPolicy) -> None:
    """Raise ``InvalidInput`` (field ``url``) when Arbiter must not connect to ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _bad("upstream URLs must use http or https")
    if not parts.hostname:
        raise _bad("the upstream URL has no host")
    if parts.username is not None or parts.password is not None:
        raise _bad("credentials in the upstream URL are not allowed; configure upstream credentials instead")
    host = parts.hostname.lower().rstrip(".")
    if host in METADATA_HOSTS and not policy.allow_metadata_hosts:
        raise _bad(
            f"{host} is a cloud metadata endpoint; refused unless upstream.allow_metadata_hosts is set"
        )
    try:
        found = await resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        raise _bad(f"cannot resolve upstream host {host!r}") from exc
    literal = is_literal(host)
    for text in found:
        why = refusal(parse_address(text), policy)
        if why is not None:
            # Odd spellings (2130706433, 0x7f.1, 017700000001) reach here as the address they resolve to.
            raise _bad(why if literal else f"{host!r} resolves to a refused address: {why}")


def check_address(addr: IPAddress, policy: UpstreamPolicy) -> None:
    """Raise ``InvalidInput`` (field ``url``) when Arbiter must not connect to ``addr``."""
    why = refusal(addr, policy)
    if why is not None:
        raise _bad(why)


def refusal(addr: IPAddress, policy: UpstreamPolicy) -> str | None:
    """Why Arbiter must not connect to ``addr`` (a sentence naming the setting), or None when it may.

    An IPv6 address that reaches an IPv4 one (mapped, IPv4-compatible, 6to4, NAT64) is judged by that
    IPv4 address too, and the unspecified address (0.0.0.0, ::), which connects to this host, as loopback.
    """
    shown = _show(addr)
    for candidate in (addr, *_embedded_ipv4(addr)):
        if candidate in METADATA_IPS and not policy.allow_metadata_hosts:
            return f"{shown} is a cloud metadata address; refused unless upstream.allow_metadata_hosts is set"
        if candidate.is_link_local and not policy.allow_link_local:
            return f"{shown} is a link-local address; refused unless upstream.allow_link_local is set"
    targets = _destinations(addr)
    for candidate in dict.fromkeys((addr, *_embedded_ipv4(addr), *targets)):
        net = _match(candidate, networks(tuple(policy.denied_networks)))
        if net is not None:
            return f"{shown} is in upstream.denied_networks ({net})"
    allowed = networks(tuple(policy.allowed_networks))
    if allowed and any(_match(t, allowed) is None for t in targets):
        return f"{shown} is not in upstream.allowed_networks"
    return None


@functools.lru_cache(maxsize=64)
def networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """The parsed networks of a setting (validated at load; parsed once per distinct list)."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _match(addr: IPAddress, nets: tuple[IPNetwork, ...]) -> IPNetwork | None:
    return next((n for n in nets if n.version == addr.version and addr in n), None)


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_address(text: str) -> IPAddress:
    """An address as getaddrinfo returns it, without an IPv6 zone (``fe80::1%eth0``)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_V6_LOOPBACK = ipaddress.IPv6Address("::1")


def _embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches: mapped, 6to4, NAT64 and the old IPv4-compatible form."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    # :: and ::1 lie in ::/96 but are the unspecified and loopback addresses, not IPv4-compatible ones.
    if (addr in _IPV4_COMPATIBLE and int(addr) > 1) or addr in _NAT64:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def _destinations(addr: IPAddress) -> list[IPAddress]:
    """What a connection to ``addr`` reaches; each must lie in ``allowed_networks``.

    A mapped or IPv4-compatible address is its IPv4 address (the socket connects over IPv4); 6to4 and NAT64
    go through an IPv6 gateway to the IPv4 address, so both count.
    """
    if isinstance(addr, ipaddress.IPv6Address) and (addr.ipv4_mapped is not None or addr in _IPV4_COMPATIBLE):
        v4 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if int(addr) > 1 else None
        if v4 is not None:
            return _destinations(v4)
    if addr.is_unspecified:
        return [_V4_LOOPBACK if addr.version == 4 else _V6_LOOPBACK]
    return [addr, *_embedded_ipv4(addr)]


def _show(addr: IPAddress) -> str:
    embedded = _embedded_ipv4(addr)
    if embedded:
        return f"{addr} ({', '.join(map(str, embedded))})"
    if addr.is_unspecified:
        return f"{addr} (this host)"
    return str(addr)


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), bounded in time; an address literal is returned as it is.

    Raises ``OSError`` when the name does not resolve (``TimeoutError`` is one).
    """
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    with anyio.fail_after(RESOLVE_TIMEOUT_S):
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
