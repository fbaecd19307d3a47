"""Resource paths are normalised before the policy matches them, and the normal form is what is forwarded.

Issue 10, finding 9: with ``allow up/up://files/*``, ``arbiter://up/up://files/../secret`` was allowed
and forwarded as sent, so an upstream that resolves dot segments served ``up://secret``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from mcp import Client
from mcp.server import MCPServer
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.shared.exceptions import MCPError

from arbiter.errors import AmbiguousResourceUri
from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.interceptors.audit import mcp_event
from arbiter.proxy.interceptors.resolve import Resolve
from arbiter.proxy.pipeline import CallContext, Result
from arbiter.proxy.resource_uri import normalise
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread

# --- normalise, as a pure function ----------------------------------------------------------------

TRAVERSALS_NORMALISED = [
    ("up://files/../secret", "up://secret"),
    ("up://files/%2e%2e/secret", "up://secret"),
    ("up://files/%2E%2E/secret", "up://secret"),
    ("up://files/.%2e/secret", "up://secret"),
    ("up://files/x/../../secret", "up://secret"),
    ("up://files/./a/./b/../c", "up://files/a/c"),
    ("up://files//../x", "up://files/x"),  # RFC 3986 5.2.4: ".." removes the empty segment
    ("up://files/a/..", "up://files/"),  # the trailing slash stays, as in RFC 3986
    ("up://files/a/.", "up://files/a/"),
    ("file:///a/../b", "file:///b"),
    ("up:files/../secret", "up:secret"),  # no "//": still a path
]

AMBIGUOUS = [
    "up://files/..%2fsecret",
    "up://files/..%2Fsecret",
    "up://files/%2e%2e%2fsecret",
    "up://files/%252e%252e/secret",  # double encoded
    "up://files/%25252e%25252e/secret",  # triple
    "up://files/..%252fsecret",
    "up://files/..\\secret",
    "up://files/..%5csecret",
    "up://files/a\\.\\b",
    "up://files/%2e%2e%5csecret",
    "up://../secret",  # above the start
    "up://files/../../secret",
    "file:///../etc/passwd",  # above the root: it would make "etc" the authority
    "../secret",
    "up://files/%zz",  # not a percent-encoding at all
    "up://files/50%",
    # An escaped scheme is decoded before the scheme is read (found in review): `%75p:` is `up:`.
    "%75p:../secret",
    "%75p:..",
    "%66ile:///../etc/passwd",
    "u%70:../../etc/passwd",
    # Dot segments between separators in the query or fragment: data to a real MCP server, a path to
    # an upstream that takes the whole string for one.
    "up://files/a?/../../secret",
    "up://files/a#/..",
    "up://files/a?%2f%2e%2e%2fsecret",
    "up://files/q?path=../../secret",  # a query value naming a path is judged like a path
]

UNCHANGED = [
    "kb://index",
    "kb://docs/refund-policy",
    "up://files/a.txt",
    "up://files/.hidden",
    "up://files/...",
    "up://files/a..b",
    "up://files/a%2Fb",  # reserved characters stay encoded: a file name, not a separator
    "up://files/report%20v2.pdf",
    "up://files/caf%C3%A9",
    "up://Files/CaseKept",  # only the scheme's case is normal; a custom "authority" may be a directory
    "up://files/q?x=%2e%2e#../frag",
    "https://example.com/a/b?c=d",
    "file:///etc/hosts",
    "urn:isbn:0451450523",
    "mailto:someone@example.com",
    "data:text/plain,hello",
    "up://",
]


@pytest.mark.parametrize(("uri", "want"), TRAVERSALS_NORMALISED)
def test_dot_segments_are_removed(uri: str, want: str) -> None:
    assert normalise(uri) == want


@pytest.mark.parametrize("uri", AMBIGUOUS)
def test_what_cannot_be_normalised_unambiguously_is_refused(uri: str) -> None:
    with pytest.raises(AmbiguousResourceUri) as err:
        normalise(uri)
    mcp = err.value.to_mcp_error().error
    assert (mcp.code, mcp.data) == (-32602, {"reason": "ambiguous_resource_uri"})


@pytest.mark.parametrize("uri", UNCHANGED)
def test_legitimate_uris_are_byte_identical(uri: str) -> None:
    assert normalise(uri) == uri


def test_rfc_equivalent_spellings_share_one_normal_form() -> None:
    assert normalise("UP://files/%7euser/%61") == "up://files/~user/a"  # unreserved decoded (6.2.2.2)
    assert normalise("up://files/a%2fb") == "up://files/a%2Fb"  # hex upper-cased (6.2.2.1)
    assert normalise("up://files/a%2fb?q=%2f") == "up://files/a%2Fb?q=%2f"  # but not in the query


def test_normal_forms_are_fixed_points() -> None:
    for uri, _ in TRAVERSALS_NORMALISED:
        once = normalise(uri)
        assert normalise(once) == once
    for uri in UNCHANGED:
        assert normalise(normalise(uri)) == normalise(uri)


# --- the resolve step, against a catalog ----------------------------------------------------------


async def _resolve(catalog: Catalog, exposed: str) -> CallContext:
    ctx = CallContext(method="resources/read", params={"uri": exposed})

    async def done(_: CallContext) -> Result:
        return {}

    await Resolve(catalog)(ctx, done)
    return ctx


def _catalog(*items: tuple[str, str]) -> Catalog:
    catalog = Catalog()
    catalog.put(
        UpstreamCatalog.from_items("up", [(kind, name, {"uri": name, "name": name}) for kind, name in items])
    )
    return catalog


async def test_resolve_targets_the_normal_form_and_keeps_what_the_agent_sent() -> None:
    catalog = _catalog(("resource", "up://files/readme"), ("resource_template", "up://files/{name}"))
    ctx = await _resolve(catalog, "arbiter://up/up://files/x/../%72eadme")
    assert (ctx.upstream, ctx.target, ctx.exposed) == (
        "up",
        "up://files/readme",
        "arbiter://up/up://files/x/../%72eadme",
    )
    assert (
        ctx.definition is not None and ctx.definition["uri"] == "up://files/readme"
    )  # the listed resource, found by its normal form
    templated = await _resolve(catalog, "arbiter://up/up://files/../secret")
    assert (templated.target, templated.definition) == ("up://secret", None)


async def test_a_listed_uri_is_forwarded_as_the_upstream_spells_it() -> None:
    # "%7e" is "~" by RFC 3986, but an upstream may look its own names up by exact match.
    catalog = _catalog(("resource", "up://files/%7euser"))
    ctx = await _resolve(catalog, "arbiter://up/up://files/%7euser")
    assert ctx.target == "up://files/%7euser"


async def test_the_refusal_does_not_depend_on_the_catalog() -> None:
    # Refused the same for a registered upstream and an unknown one: it reveals nothing about either.
    catalog = _catalog(("resource_template", "up://files/{name}"))
    for exposed in ("arbiter://up/up://files/..%2fsecret", "arbiter://nope/up://files/..%2fsecret"):
        with pytest.raises(AmbiguousResourceUri):
            await _resolve(catalog, exposed)


# --- end to end: a real Arbiter in front of an upstream that resolves dot segments itself ---------

SECRET = "TOP SECRET: the launch codes"
POLICY = "p, *, *, up/up://files/*, read, allow\n"
MODES = ["legacy", "2026-07-28"]


class PathResolvingUpstream(MCPServer):
    """An upstream that, like a naive file server, decodes and resolves paths before looking files up.

    It records every URI it receives, so tests can tell exactly what Arbiter forwarded.
    """

    FILES = {"up://files/readme": "public readme", "up://secret": SECRET}

    def __init__(self) -> None:
        super().__init__("path-resolving")
        self.received: list[str] = []

        @self.resource("up://files/readme", mime_type="text/plain")
        def readme() -> str:  # pyright: ignore[reportUnusedFunction]
            return self.FILES["up://files/readme"]

        @self.resource("up://files/{name}", mime_type="text/plain")
        def file(name: str) -> str:  # pyright: ignore[reportUnusedFunction]  # never reached: read_resource below
            return name

    async def read_resource(self, uri: Any, context: Any = None) -> Iterable[ReadResourceContents]:  # type: ignore[override]
        self.received.append(str(uri))
        path = str(uri).removeprefix("up://")
        while (decoded := unquote(path)) != path:
            path = decoded
        resolved = "up://" + posixpath.normpath(path.replace("\\", "/")).lstrip("/")
        if resolved not in self.FILES:
            raise ResourceNotFoundError(f"Unknown resource: {uri}")
        return [ReadResourceContents(content=self.FILES[resolved], mime_type="text/plain")]


@pytest.fixture(scope="module")
def files_upstream() -> Iterator[tuple[PathResolvingUpstream, str]]:
    server = PathResolvingUpstream()
    app = server.streamable_http_app(json_response=True, stateless_http=True)
    with serve_in_thread(app) as port:
        yield server, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture
def governed(
    arbiter_factory: ArbiterFactory, files_upstream: tuple[PathResolvingUpstream, str]
) -> tuple[ArbiterServer, PathResolvingUpstream]:
    upstream, url = files_upstream
    server = arbiter_factory(policy=POLICY)
    server.register("up", url)
    upstream.received.clear()
    return server, upstream


async def test_the_upstream_really_serves_the_secret_to_a_traversal(
    files_upstream: tuple[PathResolvingUpstream, str],
) -> None:
    # Without this, the end-to-end test below could pass against an upstream that is safe on its own.
    _, url = files_upstream
    async with Client(url, cache=None) as direct:  # pyright: ignore[reportArgumentType]
        for path in ("../secret", "..%2fsecret", "%2e%2e/secret", "x/../../secret", "%252e%252e/secret"):
            read = await direct.read_resource(f"up://files/{path}")
            assert getattr(read.contents[0], "text", "") == SECRET, path


TRAVERSALS = [
    ("../secret", "not_found"),
    ("%2e%2e/secret", "not_found"),
    ("%2E%2E/secret", "not_found"),
    ("x/../../secret", "not_found"),
    ("..%2fsecret", "ambiguous"),
    ("%2e%2e%2fsecret", "ambiguous"),
    ("%252e%252e/secret", "ambiguous"),
    ("..\\secret", "ambiguous"),
    ("..%5csecret", "ambiguous"),
    ("../../secret", "ambiguous"),
]


@pytest.mark.parametrize("mode", MODES)
async def test_traversals_are_refused_or_not_found_and_never_forwarded(
    governed: tuple[ArbiterServer, PathResolvingUpstream], mode: str
) -> None:
    server, upstream = governed
    async with server.client(mode) as client:  # pyright: ignore[reportArgumentType]
        for path, outcome in TRAVERSALS:
            exposed = f"arbiter://up/up://files/{path}"
            with pytest.raises(MCPError) as err:
                await client.read_resource(exposed)
            got = (err.value.code, err.value.message, err.value.data)
            if outcome == "not_found":  # exactly what a resource that does not exist answers
                assert got == (-32002, f"Resource not found: {exposed}", None), path
            else:
                assert got[0] == -32602 and got[2] == {"reason": "ambiguous_resource_uri"}, path
                assert "cannot be normalised unambiguously" in got[1]
        with pytest.raises(MCPError) as missing:
            await client.read_resource("arbiter://up/up://secret")
        assert (missing.value.code, missing.value.data) == (-32002, None)
    assert upstream.received == [], "nothing that the policy refused may reach the upstream"


@pytest.mark.parametrize("mode", MODES)
async def test_legitimate_reads_work_and_the_upstream_gets_the_normal_form(
    governed: tuple[ArbiterServer, PathResolvingUpstream], mode: str
) -> None:
    server, upstream = governed
    async with server.client(mode) as client:  # pyright: ignore[reportArgumentType]
        for exposed in (
            "arbiter://up/up://files/readme",
            "arbiter://up/up://files/./readme",
            "arbiter://up/up://files/sub/../readme",
            "arbiter://up/up://files/%72eadme",
        ):
            read = await client.read_resource(exposed)
            content = read.contents[0]
            assert getattr(content, "text", "") == "public readme", exposed
            assert content.uri == "arbiter://up/up://files/readme"  # named by what was read
    assert upstream.received == ["up://files/readme"] * 4


def test_an_ambiguous_uri_is_audited_as_a_refusal() -> None:
    ctx = CallContext(method="resources/read", params={"uri": "arbiter://up/up://files/..%2fsecret"})
    with pytest.raises(AmbiguousResourceUri) as err:
        normalise("up://files/..%2fsecret")
    event = mcp_event(ctx, None, err.value)
    assert (event.decision, event.reason) == ("deny", "ambiguous_resource_uri")
