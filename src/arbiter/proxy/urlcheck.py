"""Where an upstream may point: http(s) only, no credentials in the URL, no link-local or cloud-metadata
addresses unless the operator allows them (settings ``upstream.allow_link_local`` / ``allow_metadata_hosts``).

The check resolves the host at registration time; a name that later re-resolves elsewhere is not
re-checked per request (see docs: run Arbiter behind an egress policy for that).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from arbiter.errors import InvalidInput
from arbiter.settings import UpstreamPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

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
_RESOLVE_TIMEOUT_S = 5.0


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
    for addr in await _addresses(host, parts.port or (443 if parts.scheme == "https" else 80)):
        check_address(addr, policy)


def check_address(addr: IPAddress, policy: UpstreamPolicy) -> None:
    for candidate in (addr, *_embedded_ipv4(addr)):
        if candidate in METADATA_IPS and not policy.allow_metadata_hosts:
            raise _bad(
                f"{addr} is a cloud metadata address; refused unless upstream.allow_metadata_hosts is set"
            )
        if candidate.is_link_local and not policy.allow_link_local:
            raise _bad(f"{addr} is a link-local address; refused unless upstream.allow_link_local is set")


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches: mapped, 6to4, NAT64 and the old IPv4-compatible form."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if addr in _IPV4_COMPATIBLE or addr in _NAT64:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


async def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=_RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise _bad(f"cannot resolve upstream host {host!r}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
