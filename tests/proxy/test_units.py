"""Small pure pieces: naming, canonical hashing, URL safety checks."""

from __future__ import annotations

import hashlib

import pytest

from arbiter.errors import InvalidInput
from arbiter.naming import exposed_name, exposed_uri, split_name, split_uri
from arbiter.net.urlcheck import check_upstream_url
from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.health import Health
from arbiter.settings import UpstreamPolicy
from arbiter.store.upstreams import canonical_sha256


def test_names_round_trip_and_split_at_the_first_separator() -> None:
    assert exposed_name("crm", "get_customer") == "crm__get_customer"
    assert split_name("crm__get__weird__tool") == ("crm", "get__weird__tool")
    for bad in ("crm", "__tool", "crm__", ""):
        assert split_name(bad) is None
    assert exposed_uri("kb", "kb://docs/x") == "arbiter://kb/kb://docs/x"
    assert split_uri("arbiter://kb/kb://docs/x") == ("kb", "kb://docs/x")
    assert split_uri("arbiter://kb/file:///a/b?c=1") == ("kb", "file:///a/b?c=1")
    for bad in ("kb://docs/x", "arbiter://kb", "arbiter:///x", "arbiter://kb/"):
        assert split_uri(bad) is None


def test_canonical_hash_ignores_key_order_and_whitespace() -> None:
    a = {"name": "t", "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}
    b = {"inputSchema": {"properties": {"x": {"type": "string"}}, "type": "object"}, "name": "t"}
    assert canonical_sha256(a) == canonical_sha256(b)
    expected = hashlib.sha256(
        b'{"inputSchema":{"properties":{"x":{"type":"string"}},"type":"object"},"name":"t"}'
    ).hexdigest()
    assert canonical_sha256(a) == expected
    assert canonical_sha256({**a, "description": "d"}) != canonical_sha256(a)


def test_catalog_views_hide_down_upstreams_but_keep_them_resolvable() -> None:
    health = Health()  # the pool's: the catalog only reads it
    catalog = Catalog(health)
    catalog.put(UpstreamCatalog.from_items("crm", [("tool", "get", {"name": "get", "inputSchema": {}})]))
    catalog.put(UpstreamCatalog.from_items("kb", [("tool", "find", {"name": "find", "inputSchema": {}})]))
    assert [t["name"] for t in catalog.views.tools] == ["crm__get", "kb__find"]
    health.mark("crm", False)
    assert [t["name"] for t in catalog.views.tools] == ["kb__find"]
    assert catalog.hidden() == ["crm"]
    assert catalog.views.unavailable_tools == {"crm": ("get",)}
    assert catalog.get("crm") is not None  # calls still route, and get the unavailable error
    assert catalog.views.input_schemas == {"kb__find": {}}
    health.mark("crm", True)
    catalog.remove("kb")
    assert [t["name"] for t in catalog.views.tools] == ["crm__get"]
    assert catalog.hidden() == []
    health.mark("kb", False)  # down, but no longer in the catalog: nothing to hide
    assert catalog.hidden() == []
    assert [t["name"] for t in catalog.views.tools] == ["crm__get"]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("gopher://127.0.0.1/", "http or https"),
        ("http:///mcp", "no host"),
        ("http://u:p@127.0.0.1/mcp", "credentials"),
        ("http://169.254.169.254/", "metadata"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[::a9fe:a9fe]/", "metadata"),  # IPv4-compatible
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),  # NAT64
        ("http://[2002:a9fe:a9fe::1]/", "metadata"),  # 6to4
        ("http://[2002:a9fe:0101::1]/", "link-local"),
        ("http://2852039166/", "metadata"),  # 169.254.169.254 as one decimal number
        ("http://metadata.google.internal/", "metadata"),
        ("http://no-such-host.invalid/", "cannot resolve"),
    ],
)
async def test_unsafe_upstream_urls_are_refused(url: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await check_upstream_url(url, UpstreamPolicy())
    assert needle in err.value.message
    assert err.value.details == {"field": "url"}


async def test_safe_and_operator_allowed_urls_pass() -> None:
    await check_upstream_url("http://127.0.0.1:8001/mcp", UpstreamPolicy())
    await check_upstream_url("https://localhost/mcp", UpstreamPolicy())
    await check_upstream_url("http://169.254.1.1/", UpstreamPolicy(allow_link_local=True))
    await check_upstream_url(
        "http://169.254.169.254/", UpstreamPolicy(allow_link_local=True, allow_metadata_hosts=True)
    )
