"""Which networks upstreams may live on: ``upstream.allowed_networks`` / ``denied_networks``, checked at
registration and again on every new connection, on every address the host then resolves to.

Everything stays on loopback: names that "move" elsewhere do so through the connect hook's resolver
seam, and a recorder on httpcore's socket backend proves no connection to them is ever attempted.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from arbiter.auth.outbound import CredentialSpec, TokenSource, UpstreamAuthFailed
from arbiter.auth.secrets import SecretBox, SecretRef
from arbiter.errors import InvalidInput, UpstreamUnavailable
from arbiter.net.egress import Egress, GuardedBackend
from arbiter.net.urlcheck import check_upstream_url, parse_address, refusal, resolve_host
from arbiter.proxy.upstream import UpstreamClient, UpstreamSpec
from arbiter.settings import Settings, UpstreamPolicy
from tests.conftest import ArbiterFactory, UpstreamProc
from tests.refusals import tool_refusal

ELSEWHERE = "10.1.2.3"  # never connected to: the hook refuses it before any socket is opened


# --- the rule, over the odd spellings -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8001/mcp", "127.0.0.1"),
        ("http://localhost:8001/mcp", "127.0.0.1"),
        ("http://2130706433/mcp", "127.0.0.1"),  # one decimal number
        ("http://0x7f.1/mcp", "127.0.0.1"),  # hex, two parts
        ("http://017700000001/mcp", "127.0.0.1"),  # one octal number
        ("http://0177.0.0.1/mcp", "127.0.0.1"),  # octal first part
        ("http://127.1/mcp", "127.0.0.1"),  # short form
        ("http://[::ffff:127.0.0.1]/mcp", "(127.0.0.1)"),  # IPv4-mapped
        ("http://[::ffff:7f00:1]/mcp", "(127.0.0.1)"),
        ("http://0/mcp", "this host"),  # 0.0.0.0 connects to this host
        ("http://0.0.0.0/mcp", "this host"),
        ("http://[::]/mcp", "this host"),
    ],
)
async def test_outside_allowed_networks_is_refused_in_every_spelling(url: str, address: str) -> None:
    policy = UpstreamPolicy(allowed_networks=["10.0.0.0/8"])
    with pytest.raises(InvalidInput) as err:
        await check_upstream_url(url, policy)
    assert address in err.value.message
    assert "not in upstream.allowed_networks" in err.value.message
    assert err.value.details == {"field": "url"}


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/mcp",
        "http://167838211/mcp",  # 10.1.2.3 as one decimal number
        "http://0x0a.1.2.3/mcp",
        "http://0xa010203/mcp",
        "http://012.1.2.3/mcp",  # octal 012 = 10
        "http://10.66051/mcp",  # 10.1.2.3 as two parts
        "http://[::ffff:10.1.2.3]/mcp",  # mapped
        "http://[::a01:203]/mcp",  # IPv4-compatible
        "http://[64:ff9b::a01:203]/mcp",  # NAT64
        "http://[2002:a01:203::1]/mcp",  # 6to4
    ],
)
async def test_denied_networks_catch_every_spelling(url: str) -> None:
    policy = UpstreamPolicy(denied_networks=["10.0.0.0/8"])
    with pytest.raises(InvalidInput) as err:
        await check_upstream_url(url, policy)
    assert "is in upstream.denied_networks (10.0.0.0/8)" in err.value.message
    assert "10.1.2.3" in err.value.message


async def test_allowed_networks_admit_their_addresses_and_deny_wins() -> None:
    policy = UpstreamPolicy(allowed_networks=["10.0.0.0/8", "fd00::/8"], denied_networks=["10.9.0.0/16"])
    for url in ("http://10.1.2.3/", "http://0x0a.1.2.3/", "http://[::ffff:10.1.2.3]/", "http://[fd00::5]/"):
        await check_upstream_url(url, policy)  # resolved (numerically), never connected to
    with pytest.raises(InvalidInput, match=r"10\.9\.0\.1 is in upstream\.denied_networks \(10\.9\.0\.0/16\)"):
        await check_upstream_url("http://0x0a090001/", policy)
    # No setting: any address, as before (link-local and metadata aside).
    await check_upstream_url("http://10.1.2.3/", UpstreamPolicy())
    await check_upstream_url("http://[::ffff:10.1.2.3]/", UpstreamPolicy())


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::", True),  # connects to ::1
        ("10.0.0.1", False),
        ("::ffff:127.0.0.1", True),  # the socket goes to 127.0.0.1
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 reaches 127.0.0.1 through a gateway outside the allowed set
        ("2002:7f00:1::1", False),  # so does 6to4
        ("fe80::1", False),  # link-local is refused whatever the networks say
    ],
)
def test_ipv6_forms_are_judged_by_where_they_go(address: str, allowed: bool) -> None:
    policy = UpstreamPolicy(allowed_networks=["127.0.0.0/8", "::1/128"])
    assert (refusal(parse_address(address), policy) is None) is allowed


def test_a_denied_ipv6_prefix_also_catches_the_ipv4_it_embeds() -> None:
    policy = UpstreamPolicy(denied_networks=["::ffff:0:0/96"])
    assert refusal(parse_address("::ffff:10.0.0.1"), policy) is not None
    assert refusal(parse_address("10.0.0.1"), policy) is None  # plain IPv4 is not in an IPv6 prefix


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (
            "allowed_networks",
            "10.0.0.300/8",
            "upstream.allowed_networks: '10.0.0.300/8' is not a CIDR network",
        ),
        ("allowed_networks", "10.0.0.1/8", "has host bits set"),
        ("denied_networks", "0x7f000001/8", "upstream.denied_networks: '0x7f000001/8' is not a CIDR network"),
        ("denied_networks", "localhost", "upstream.denied_networks: 'localhost'"),
    ],
)
def test_a_bad_cidr_is_refused_at_load_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(f"ARBITER_UPSTREAM__{key.upper()}", f'["10.0.0.0/8", "{value}"]')
    with pytest.raises(ValidationError) as err:
        Settings()
    assert needle in str(err.value)


def test_networks_load_from_the_environment_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARBITER_UPSTREAM__ALLOWED_NETWORKS", '["10.0.0.0/8", "fd00::/8", "192.168.1.7"]')
    monkeypatch.setenv("ARBITER_UPSTREAM__DENIED_NETWORKS", '["10.9.0.0/16"]')
    upstream = Settings().upstream
    assert upstream.allowed_networks == ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
    assert upstream.denied_networks == ["10.9.0.0/16"]


# --- the connect hook ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sockets(loopback_only: list[str]) -> list[str]:
    """Every host Arbiter's HTTP clients were asked to connect to (anything but loopback is refused)."""
    return loopback_only


class Names:
    """A resolver that answers from a table (the seam); any other name goes to the system resolver."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        return self.table[host] if host in self.table else await resolve_host(host, port)


@asynccontextmanager
async def http_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A tiny HTTP/1.1 server on 127.0.0.1 answering 200 "ok" to everything (keep-alive)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def guarded(policy: UpstreamPolicy, names: Names) -> GuardedBackend:
    return Egress(policy, names).backend("test")


async def test_the_hook_connects_to_the_address_it_checked_once_per_connection(sockets: list[str]) -> None:
    names = Names({"upstream.test": ["127.0.0.1"]})
    backend = guarded(UpstreamPolicy(allowed_networks=["127.0.0.0/8"]), names)
    async with http_server() as port, httpx2.AsyncClient(transport=backend.transport()) as http:
        for _ in range(3):
            assert (await http.get(f"http://upstream.test:{port}/")).text == "ok"
        # Odd spellings are resolved by the hook, and the socket goes to what it resolved them to.
        for host in ("2130706433", "0x7f.1", "017700000001", "127.1"):
            assert (await http.get(f"http://{host}:{port}/")).status_code == 200
    assert names.asked == [
        "upstream.test",
        "2130706433",
        "0x7f.1",
        "017700000001",
        "127.1",
    ]  # pooled: once each
    assert sockets == ["127.0.0.1"] * 5  # never the name: nothing resolves it a second time


async def test_the_hook_tries_each_checked_address_in_turn(sockets: list[str]) -> None:
    # Nothing listens on 127.0.0.2 at that port: refused at once, then 127.0.0.1 answers.
    names = Names({"two.test": ["127.0.0.2", "127.0.0.1"]})
    backend = guarded(UpstreamPolicy(allowed_networks=["127.0.0.0/8"]), names)
    async with http_server() as port, httpx2.AsyncClient(transport=backend.transport()) as http:
        assert (await http.get(f"http://two.test:{port}/")).text == "ok"
    assert sockets == ["127.0.0.2", "127.0.0.1"]


async def test_a_name_that_moves_is_refused_on_the_next_connection(
    sockets: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    names = Names({"upstream.test": ["127.0.0.1"]})
    backend = guarded(UpstreamPolicy(allowed_networks=["127.0.0.0/8"]), names)
    async with http_server() as port:
        async with httpx2.AsyncClient(transport=backend.transport()) as http:
            assert (await http.get(f"http://upstream.test:{port}/")).status_code == 200
        names.table["upstream.test"] = ["127.0.0.1", ELSEWHERE]  # one bad answer spoils the lot
        async with httpx2.AsyncClient(transport=backend.transport()) as http:
            with (
                caplog.at_level(logging.WARNING, "arbiter.net.egress"),
                pytest.raises(httpx2.ConnectError, match=r"upstream\.allowed_networks"),
            ):
                await http.get(f"http://upstream.test:{port}/")
    assert sockets == ["127.0.0.1"]
    assert backend.refused is not None and ELSEWHERE in backend.refused
    assert f"refused to connect to upstream.test:{port}" in caplog.text
    assert f"{ELSEWHERE} is not in upstream.allowed_networks" in caplog.text


def _certificate(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for ``name``: the server's context, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


async def test_tls_still_verifies_the_host_name(sockets: list[str], tmp_path: Path) -> None:
    server_tls, client_tls = _certificate(tmp_path, "upstream.test")
    names = Names({"upstream.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    backend = guarded(UpstreamPolicy(allowed_networks=["127.0.0.0/8"]), names)
    async with (
        http_server(server_tls) as port,
        httpx2.AsyncClient(transport=backend.transport(verify=client_tls)) as http,
    ):
        assert (await http.get(f"https://upstream.test:{port}/")).text == "ok"
        # Same address, another name: the certificate does not match it, so TLS fails.
        with pytest.raises(httpx2.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            await http.get(f"https://other.test:{port}/")
    assert sockets == ["127.0.0.1", "127.0.0.1"]


async def test_a_refused_upstream_connection_is_upstream_unavailable_and_says_why(
    kb_upstream: UpstreamProc, sockets: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # localhost: the demo upstream checks the Host header; the seam decides where the name goes.
    names = Names({"localhost": ["127.0.0.1"]})
    egress = Egress(UpstreamPolicy(allowed_networks=["127.0.0.0/8"]), names)
    spec = UpstreamSpec(
        name="kb", transport="streamable_http", url=f"http://localhost:{kb_upstream.port}/mcp"
    )
    async with anyio.create_task_group() as tg:
        first = UpstreamClient(spec, tg, max_connections=4, reconnect_backoff_s=0, egress=egress)
        assert (await first.discover()).tools
        await first.aclose()

        names.table["localhost"] = [ELSEWHERE]
        second = UpstreamClient(spec, tg, max_connections=4, reconnect_backoff_s=0, egress=egress)
        reports: list[bool] = []
        second.on_health = lambda _client, up: reports.append(up)
        with caplog.at_level(logging.WARNING), pytest.raises(UpstreamUnavailable) as err:
            await second.discover()
        assert err.value.code == "upstream_unavailable"
        assert second.last_error is not None
        assert f"{ELSEWHERE} is not in upstream.allowed_networks" in second.last_error
        assert "upstream kb: connect refused: 'localhost' resolves to a refused address" in caplog.text
        assert reports == [False]  # what the pool would mark the upstream
        await second.aclose()
        tg.cancel_scope.cancel()
    assert sockets and ELSEWHERE not in sockets


async def test_token_endpoint_requests_go_through_the_hook(
    sockets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETWORKS_TEST_SECRET", "s3cret")
    spec = CredentialSpec(
        kind="client_credentials",
        token_url="http://idp.test:9/token",
        client_id="gw",
        secret=SecretRef(env="NETWORKS_TEST_SECRET"),
    )
    egress = Egress(UpstreamPolicy(denied_networks=["10.0.0.0/8"]), Names({"idp.test": [ELSEWHERE]}))
    tokens = TokenSource("crm", spec, SecretBox(None), 5.0, egress=egress)
    with pytest.raises(UpstreamAuthFailed) as err:
        await tokens.get()
    assert (
        f"the token endpoint's address is refused: 'idp.test' resolves to a refused address: {ELSEWHERE}"
        in (err.value.message)
    )
    assert "s3cret" not in err.value.message
    assert sockets == []


# --- a real Arbiter ------------------------------------------------------------------------------


def test_registration_outside_allowed_networks_is_a_422_naming_address_and_setting(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(upstream={"allowed_networks": ["10.0.0.0/8"]})
    with server.admin() as admin:
        resp = admin.post("/upstreams", json={"name": "kb", "url": kb_upstream.url})
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["field"] == "url"
        assert "127.0.0.1 is not in upstream.allowed_networks" in error["message"]
        assert admin.get("/upstreams").json() == []  # nothing stored


def test_registration_inside_allowed_networks_works(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(
        upstream={"allowed_networks": ["127.0.0.0/8"], "denied_networks": ["127.0.0.2/32"]}
    )
    body = server.register("kb", kb_upstream.url)
    assert body["status"] == "connected"
    # The token endpoint of an upstream credential is held to the same networks.
    with server.admin() as admin:
        resp = admin.post(
            "/upstreams",
            json={
                "name": "crm",
                "url": kb_upstream.url,
                "credential": {
                    "kind": "client_credentials",
                    "token_url": "http://127.0.0.2:9/token",
                    "client_id": "gw",
                    "client_secret_env": "NETWORKS_TEST_SECRET",
                },
            },
        )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "credential.token_url"
    assert "127.0.0.2 is in upstream.denied_networks (127.0.0.2/32)" in resp.json()["error"]["message"]


async def test_an_upstream_whose_name_moves_after_registration_is_refused(
    arbiter_factory: ArbiterFactory, sockets: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    kb = UpstreamProc("arbiter.demo.kb").start()
    try:
        server = arbiter_factory(
            upstream={"allowed_networks": ["127.0.0.0/8", "::1/128"], "reconnect_backoff_s": 0.0}
        )
        server.register("kb", f"http://localhost:{kb.port}/mcp")  # resolves to 127.0.0.1 today
        egress: Egress = server.app.state.runtime.pool.egress
        names = Names({"localhost": [ELSEWHERE]})
        async with server.client("2026-07-28") as client:
            result = await client.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
            assert result.is_error is False

            # The name now points elsewhere; the upstream restarts, so the next request needs a new
            # connection, and the hook refuses it.
            egress.resolver = names
            kb.kill()
            kb = UpstreamProc("arbiter.demo.kb", port=kb.port).start()
            with caplog.at_level(logging.WARNING):
                failed = await client.session.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
            refusal = tool_refusal(failed)
            assert refusal["reason"] == "upstream_unavailable" and refusal["upstream"] == "kb"
            assert "localhost" in names.asked
            assert (
                f"'localhost' resolves to a refused address: {ELSEWHERE} is not in upstream.allowed_networks"
                in caplog.text
            )

            # Back on loopback, the next call reconnects: it was the address, not the restart.
            egress.resolver = resolve_host
            result = await client.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
            assert result.is_error is False
    finally:
        kb.kill()
    assert ELSEWHERE not in sockets
    assert sockets and all(ipaddress.ip_address(h).is_loopback for h in sockets)


async def test_a_replica_with_a_narrower_setting_refuses_what_another_registered(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, caplog: pytest.LogCaptureFixture
) -> None:
    first = arbiter_factory()
    first.register("kb", f"http://localhost:{kb_upstream.port}/mcp")
    # Same database, stricter operator: the registry row is served, but its connection is refused.
    second = arbiter_factory(upstream={"denied_networks": ["127.0.0.0/8"], "reconnect_backoff_s": 0.0})
    async with second.client("2026-07-28") as client:
        failed = await client.session.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
    refusal = tool_refusal(failed)
    assert refusal["reason"] == "upstream_unavailable" and refusal["upstream"] == "kb"
    assert "127.0.0.1 is in upstream.denied_networks (127.0.0.0/8)" in caplog.text
    async with first.client("2026-07-28") as client:  # the first replica's setting lets it through
        assert (await client.call_tool("kb__get_doc", {"doc_id": "sso-setup"})).is_error is False
