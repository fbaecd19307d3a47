"""List changes and resource subscriptions through Arbiter, in both eras on both sides.

A real upstream MCP server in the test changes its tool list and updates resources on demand (an HTTP
trigger next to its /mcp). It speaks 2026-07-28 (Arbiter holds a ``subscriptions/listen`` open to it) or,
behind a wrapper refusing that revision, only the handshake era (Arbiter hears its GET stream and sends
``resources/subscribe``). Agents connect with the SDK client in both modes and count what they are told
in their message handler; "not told" is proven with a later change they may see as a barrier: each agent's
notifications arrive in order, so by the time it hears the barrier it would have heard the leak.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from arbiter.auth.apikeys import parse as parse_key
from arbiter.auth.principal import Principal
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import parse_csv
from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.notifications import TOOLS, NotificationHub
from arbiter.settings import NotificationSettings
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread

MODES = ["legacy", "2026-07-28"]
UPSTREAM_ERAS = ["2026-07-28", "handshake"]
# The test agent (role agent) may use everything on "up"; role narrow only what is named "open".
POLICY = """\
p, role:agent, *, up/*, call, allow
p, role:agent, *, up/*, read, allow
p, role:narrow, *, up/open*, call, allow
p, role:narrow, *, up/mem://open, read, allow
"""
OPEN, SECRET = "mem://open", "mem://secret"
FAST = {
    # No catalog refresh timer: a new tool can only come from the list_changed itself.
    "upstream": {"catalog_refresh_interval_s": 0},
    "notifications": {"refresh_interval_s": 0.05, "watch_interval_s": 0.1, "listen_backoff_s": 0.1},
}


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``: what it reads changes in other threads (Arbiter's, the upstream's)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - no event crosses those threads
            await anyio.sleep(0.01)


class ChangingUpstream:
    """An MCP server whose tool list grows and whose resources update when the test says so."""

    def __init__(self, templates: tuple[str, ...] = (), refuse: frozenset[str] = frozenset()) -> None:
        self.tools = ["open_tool", "secret_tool"]
        self.refuse = refuse  # resource URIs it refuses to subscribe to (in either era)
        self.bus = InMemorySubscriptionBus()
        # Handshake era: Arbiter's sessions here, told on their GET stream.
        self.sessions: dict[int, ServerSession] = {}
        self.subscribed: set[str] = set()  # handshake era: resources/subscribe
        self.listening: list[frozenset[str]] = []  # 2026-07-28: open listen streams' resources
        self.lists = 0  # tools/list requests answered
        self.listens = 0  # subscriptions/listen requests taken
        self.refused = 0  # subscriptions refused (either era)
        self.gets = 0  # standalone GET streams open (handshake era)
        listen = ListenHandler(self.bus)

        async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
            self.lists += 1
            self._remember(ctx.session)
            return types.ListToolsResult(
                tools=[types.Tool(name=name, input_schema={"type": "object"}) for name in self.tools]
            )

        async def call_tool(ctx: ServerRequestContext[Any, Any], params: Any) -> types.CallToolResult:
            return types.CallToolResult(content=[types.TextContent(text="ok")])

        async def list_resources(
            ctx: ServerRequestContext[Any, Any], params: Any
        ) -> types.ListResourcesResult:
            self._remember(ctx.session)
            return types.ListResourcesResult(
                resources=[types.Resource(uri=OPEN, name="open"), types.Resource(uri=SECRET, name="secret")]
            )

        async def list_templates(
            ctx: ServerRequestContext[Any, Any], params: Any
        ) -> types.ListResourceTemplatesResult:
            return types.ListResourceTemplatesResult(
                resource_templates=[types.ResourceTemplate(uri_template=t, name=t) for t in templates]
            )

        async def read_resource(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ReadResourceResult:
            return types.ReadResourceResult(contents=[types.TextResourceContents(uri=params.uri, text="x")])

        async def subscribe(ctx: ServerRequestContext[Any, Any], params: Any) -> types.EmptyResult:
            self._remember(ctx.session)
            if str(params.uri) in self.refuse:
                self.refused += 1
                raise MCPError(types.INVALID_PARAMS, "no such resource")
            self.subscribed.add(str(params.uri))
            return types.EmptyResult()

        async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: Any) -> types.EmptyResult:
            self.subscribed.discard(str(params.uri))
            return types.EmptyResult()

        async def on_listen(
            ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
        ) -> types.SubscriptionsListenResult:
            uris = frozenset(params.notifications.resource_subscriptions or ())
            if uris & self.refuse:
                self.refused += 1
                raise MCPError(types.INVALID_PARAMS, "no such resource")
            self.listening.append(uris)
            self.listens += 1
            try:
                return await listen(ctx, params)
            finally:
                self.listening.remove(uris)

        self.server: Server[Any] = Server(
            "up",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_list_resources=list_resources,
            on_list_resource_templates=list_templates,
            on_read_resource=read_resource,
            on_subscribe_resource=subscribe,
            on_unsubscribe_resource=unsubscribe,
            on_subscriptions_listen=on_listen,
        )

    def _remember(self, session: ServerSession) -> None:
        # One per connection (the SDK makes a ServerSession per message): each is told once.
        connection: object = getattr(session, "_connection")  # noqa: B009
        if session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self.sessions.setdefault(id(connection), session)

    def heard(self) -> bool:
        """Whether Arbiter listens here for list changes: a change made before it does is never told
        (the tests wait for this rather than for time to pass)."""
        return self.gets > 0 or frozenset[str]() in self.listening

    def watched(self, uri: str) -> bool:
        """Whether Arbiter subscribed to ``uri`` here, in either era."""
        return uri in self.subscribed or any(uri in uris for uris in self.listening)

    def app(self, *, json_response: bool = False) -> ASGIApp:
        async def add(request: Request) -> Response:
            self.tools.append(request.path_params["name"])
            await self.bus.publish(ToolsListChanged())
            for session in list(self.sessions.values()):
                await session.send_tool_list_changed()
            return Response(status_code=204)

        async def touch(request: Request) -> Response:
            uri = request.query_params["uri"]
            await self.bus.publish(ResourceUpdated(uri=uri))
            for session in list(self.sessions.values()):
                await session.send_resource_updated(uri)
            return Response(status_code=204)

        routes = [Route("/add/{name}", add, methods=["POST"]), Route("/touch", touch, methods=["POST"])]
        inner = self.server.streamable_http_app(custom_starlette_routes=routes, json_response=json_response)

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "GET":
                await inner(scope, receive, send)
                return
            self.gets += 1
            try:
                await inner(scope, receive, send)
            finally:
                self.gets -= 1

        return counting


class HandshakeOnly:
    """Answers 2026-07-28 requests like an mcp 1.x server, so clients fall back to the handshake."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"mcp-protocol-version", b"2026-07-28") in scope["headers"]:
            body = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"unsupported"}}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@dataclass
class Up:
    upstream: ChangingUpstream
    base: str

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def add_tool(self, name: str) -> None:
        assert httpx.post(f"{self.base}/add/{name}", timeout=10).status_code == 204

    def touch(self, uri: str) -> None:
        assert httpx.post(f"{self.base}/touch", params={"uri": uri}, timeout=10).status_code == 204


@pytest.fixture(params=UPSTREAM_ERAS)
def up(request: pytest.FixtureRequest) -> Iterator[Up]:
    upstream = ChangingUpstream()
    app = upstream.app()
    with serve_in_thread(HandshakeOnly(app) if request.param == "handshake" else app) as port:
        yield Up(upstream, f"http://127.0.0.1:{port}")


def gateway(arbiter_factory: ArbiterFactory, up: Up, **overrides: Any) -> tuple[ArbiterServer, str]:
    """Arbiter in front of ``up``; the test agent's key (role agent) and a narrow agent's key."""
    server = arbiter_factory(policy=POLICY, **{**FAST, **overrides})
    server.register("up", up.url)
    with server.admin() as admin:
        created = admin.post("/api-keys", json={"owner": "narrow", "roles": ["narrow"], "tenant": "acme"})
    assert created.status_code == 201, created.text
    return server, created.json()["key"]


@dataclass
class Agent:
    """What one agent was told."""

    tool_changes: int = 0
    updates: list[str] = field(default_factory=list[str])
    stream_open: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.tool_changes += 1
        elif isinstance(message, types.ResourceUpdatedNotification):
            self.updates.append(message.params.uri)


@asynccontextmanager
async def agent(
    server: ArbiterServer, key: str, mode: str, resources: tuple[str, ...] = ()
) -> AsyncGenerator[tuple[Client, Agent]]:
    """A connected agent listening for tool list changes and updates of ``resources``, in ``mode``."""
    told = Agent()

    async def opened(response: httpx2.Response) -> None:
        if response.request.method == "GET" and response.status_code == 200:
            told.stream_open.set()  # the handshake era's standalone stream, where notifications come

    @asynccontextmanager
    async def transport() -> AsyncGenerator[Any]:
        async with (
            httpx2.AsyncClient(
                headers={"authorization": f"Bearer {key}"},
                timeout=httpx2.Timeout(30.0),
                event_hooks={"response": [opened]},
            ) as http,
            streamable_http_client(server.mcp_url, http_client=http) as streams,
        ):
            yield streams

    client = Client(transport(), mode=mode, cache=None, message_handler=told.handle)  # pyright: ignore[reportArgumentType]
    async with client:
        if mode == "legacy":
            await told.stream_open.wait()
            for uri in resources:
                await client.subscribe_resource(uri)  # pyright: ignore[reportDeprecated]
            yield client, told
            return
        # The listen stream's frames reach the message handler too; the iterator only has to be drained.
        async with (
            client.listen(tools_list_changed=True, resource_subscriptions=resources) as sub,
            anyio.create_task_group() as tg,
        ):

            async def drain() -> None:
                async for _ in sub:
                    pass

            tg.start_soon(drain)
            yield client, told
            tg.cancel_scope.cancel()


async def tool_names(client: Client) -> set[str]:
    return {tool.name for tool in (await client.list_tools()).tools}


@pytest.mark.parametrize("mode", MODES)
async def test_a_list_change_reaches_only_agents_that_may_see_what_changed(
    up: Up, arbiter_factory: ArbiterFactory, mode: str
) -> None:
    server, narrow_key = gateway(arbiter_factory, up)
    async with (
        agent(server, server.agent_key, mode) as (wide, wide_told),
        agent(server, narrow_key, mode) as (narrow, narrow_told),
    ):
        assert await tool_names(narrow) == {"up__open_tool"}
        await until(up.upstream.heard)
        lists = up.upstream.lists
        # A tool only the wide agent may see: it is told, and lists it at once (no refresh timer).
        await anyio.to_thread.run_sync(up.add_tool, "secret_new")
        await until(lambda: wide_told.tool_changes == 1)
        assert "up__secret_new" in await tool_names(wide)
        assert up.upstream.lists > lists  # Arbiter listed the upstream again
        # A tool both may see: the barrier. The narrow agent hears it as its first change.
        await anyio.to_thread.run_sync(up.add_tool, "open_new")
        await until(lambda: wide_told.tool_changes == 2 and narrow_told.tool_changes >= 1)
        assert narrow_told.tool_changes == 1
        assert await tool_names(narrow) == {"up__open_tool", "up__open_new"}
        assert await tool_names(wide) == {
            "up__open_tool",
            "up__secret_tool",
            "up__secret_new",
            "up__open_new",
        }


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # resources/subscribe
@pytest.mark.parametrize("mode", MODES)
async def test_resource_updates_reach_subscribers_that_may_read_them_under_arbiter_uris(
    up: Up, arbiter_factory: ArbiterFactory, mode: str
) -> None:
    server, narrow_key = gateway(arbiter_factory, up)
    open_uri, secret_uri = f"arbiter://up/{OPEN}", f"arbiter://up/{SECRET}"
    # Subscribing to what the caller may not read answers exactly like a resource that does not exist.
    async with server.client(mode, narrow_key) as probe:
        with pytest.raises(MCPError) as missing:
            await probe.read_resource("arbiter://up/mem://nothing")
        with pytest.raises(MCPError) as hidden:
            if mode == "legacy":
                await probe.subscribe_resource(secret_uri)  # pyright: ignore[reportDeprecated]
            else:
                async with probe.listen(resource_subscriptions=[secret_uri]):
                    pass
    assert (hidden.value.error.code, hidden.value.error.message) == (
        missing.value.error.code,
        missing.value.error.message.replace("mem://nothing", SECRET),
    )
    async with (
        agent(server, server.agent_key, mode, (open_uri, secret_uri)) as (_, wide_told),
        agent(server, narrow_key, mode, (open_uri,)) as (_, narrow_told),
    ):
        await until(lambda: up.upstream.watched(OPEN) and up.upstream.watched(SECRET) and up.upstream.heard())
        await anyio.to_thread.run_sync(up.touch, SECRET)
        await until(lambda: wide_told.updates == [secret_uri])
        await anyio.to_thread.run_sync(up.touch, OPEN)  # the barrier
        await until(lambda: len(wide_told.updates) == 2 and len(narrow_told.updates) >= 1)
        assert wide_told.updates == [secret_uri, open_uri]
        assert narrow_told.updates == [open_uri]
    # Once nobody is subscribed, neither is Arbiter.
    await until(lambda: not up.upstream.watched(OPEN) and not up.upstream.watched(SECRET))


@pytest.mark.parametrize("enabled", [True, False])
async def test_capabilities_advertise_list_changed_and_subscribe_exactly_when_relayed(
    arbiter_factory: ArbiterFactory, enabled: bool
) -> None:
    server = arbiter_factory(notifications={"enabled": enabled})
    for mode in ["legacy", "auto"]:  # initialize's answer; server/discover's (auto probes it)
        async with server.client(mode) as client:
            assert (client.protocol_version in MODERN_PROTOCOL_VERSIONS) is (mode == "auto")
            caps = client.server_capabilities
            assert caps.tools is not None and caps.resources is not None and caps.prompts is not None
            assert bool(caps.tools.list_changed) is enabled
            assert bool(caps.prompts.list_changed) is enabled
            assert bool(caps.resources.list_changed) is enabled
            assert bool(caps.resources.subscribe) is enabled


async def test_a_storm_of_list_changes_is_one_refresh(up: Up, arbiter_factory: ArbiterFactory) -> None:
    # Wide enough that the whole storm lands inside one interval, however slow the machine.
    server, _ = gateway(arbiter_factory, up, notifications={**FAST["notifications"], "refresh_interval_s": 5})
    async with agent(server, server.agent_key, "2026-07-28") as (client, told):
        await until(up.upstream.heard)
        await anyio.to_thread.run_sync(up.add_tool, "first")  # refreshed at once: nothing came before it
        await until(lambda: told.tool_changes == 1)
        lists = up.upstream.lists
        storm = [f"storm_{i}" for i in range(10)]
        for name in storm:
            await anyio.to_thread.run_sync(up.add_tool, name)
        await until(lambda: told.tool_changes == 2)
        assert {f"up__{name}" for name in storm} <= await tool_names(client)
        assert up.upstream.lists == lists + 1  # ten announcements, one listing


async def test_listen_streams_take_no_slot_from_calls(up: Up, arbiter_factory: ArbiterFactory) -> None:
    server, _ = gateway(arbiter_factory, up, mcp={"max_in_flight": 1})
    async with agent(server, server.agent_key, "2026-07-28") as (client, _):  # one listen stream, open
        result = await client.call_tool("up__open_tool", {})
        assert not result.is_error


async def test_a_dropped_listen_is_reopened_and_never_marks_the_upstream_down(
    arbiter_factory: ArbiterFactory,
) -> None:
    upstream = ChangingUpstream()
    with serve_in_thread(upstream.app()) as port:
        up = Up(upstream, f"http://127.0.0.1:{port}")
        server = arbiter_factory(policy=POLICY, **FAST)
        # A quiet listen stream outlives the read timeout of Arbiter's client for this upstream (1 s).
        server.register("up", up.url, call_timeout_s=1)
        await until(lambda: upstream.listens >= 2)  # dropped by the timeout, and listened to again
        with server.admin() as admin:
            (row,) = admin.get("/upstreams").json()
        assert row["status"] != "down"
        async with agent(server, server.agent_key, "2026-07-28") as (client, told):
            assert not (await client.call_tool("up__open_tool", {})).is_error
            await anyio.to_thread.run_sync(up.add_tool, "after_drops")
            await until(lambda: told.tool_changes == 1)
        server.stop()  # before the upstream, which Arbiter still listens to


BOGUS = "mem://aaa-bogus"  # made by the upstream's template, refused by it; sorts before OPEN


@pytest.fixture(params=UPSTREAM_ERAS)
def refusing_up(request: pytest.FixtureRequest) -> Iterator[Up]:
    upstream = ChangingUpstream(templates=("mem://{name}",), refuse=frozenset({BOGUS}))
    app = upstream.app()
    with serve_in_thread(HandshakeOnly(app) if request.param == "handshake" else app) as port:
        yield Up(upstream, f"http://127.0.0.1:{port}")


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # resources/subscribe
@pytest.mark.parametrize("mode", MODES)
async def test_a_resource_the_upstream_refuses_stops_nobody_elses_notifications(
    refusing_up: Up, arbiter_factory: ArbiterFactory, mode: str
) -> None:
    up = refusing_up
    server, _ = gateway(arbiter_factory, up)
    open_uri = f"arbiter://up/{OPEN}"
    async with (
        agent(server, server.agent_key, mode, (f"arbiter://up/{BOGUS}",)) as (_, mallory_told),
        agent(server, server.agent_key, mode, (open_uri,)) as (_, alice_told),
    ):
        await until(lambda: up.upstream.watched(OPEN) and up.upstream.heard())
        # The test upstream counts a listen stream as watching just before its handler joins the bus, so
        # one update can fall in between (CI saw it once on a busy machine): touch again until one lands.
        with anyio.fail_after(20):
            while not alice_told.updates:
                await anyio.to_thread.run_sync(up.touch, OPEN)
                with anyio.move_on_after(0.5):
                    await until(lambda: bool(alice_told.updates))
        assert set(alice_told.updates) == {open_uri}
        # List changes reach everybody, the agent whose URI is refused too.
        await anyio.to_thread.run_sync(up.add_tool, "open_after")
        await until(lambda: alice_told.tool_changes >= 1 and mallory_told.tool_changes >= 1)
        assert not up.upstream.watched(BOGUS)


async def test_a_uri_no_template_of_the_upstream_makes_is_answered_as_missing(
    refusing_up: Up, arbiter_factory: ArbiterFactory
) -> None:
    server, _ = gateway(arbiter_factory, refusing_up)
    async with server.client("2026-07-28") as probe:
        with pytest.raises(MCPError) as missing:
            async with probe.listen(resource_subscriptions=["arbiter://up/other://x"]):
                pass
    assert "other://x" in missing.value.error.message


async def test_listen_streams_are_capped_per_caller(up: Up, arbiter_factory: ArbiterFactory) -> None:
    server, narrow_key = gateway(
        arbiter_factory, up, notifications={**FAST["notifications"], "max_listeners_per_principal": 1}
    )
    async with agent(server, server.agent_key, "2026-07-28"):
        async with server.client("2026-07-28") as second:
            with pytest.raises(MCPError) as refused:
                async with second.listen(tools_list_changed=True):
                    pass
        assert refused.value.error.message == "Subscription limit reached"
        async with agent(server, narrow_key, "2026-07-28") as (client, _):  # another caller still may
            assert await tool_names(client) == {"up__open_tool"}


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # resources/subscribe
@pytest.mark.parametrize("mode", MODES)
async def test_a_session_or_listen_stream_subscribes_to_at_most_the_cap(
    up: Up, arbiter_factory: ArbiterFactory, mode: str
) -> None:
    server, _ = gateway(
        arbiter_factory, up, notifications={**FAST["notifications"], "max_subscriptions_per_listener": 1}
    )
    open_uri, secret_uri = f"arbiter://up/{OPEN}", f"arbiter://up/{SECRET}"
    if mode == "legacy":
        async with agent(server, server.agent_key, mode, (open_uri,)) as (client, _):
            with pytest.raises(MCPError) as refused:
                await client.subscribe_resource(secret_uri)  # pyright: ignore[reportDeprecated]
    else:
        async with server.client(mode) as probe:
            with pytest.raises(MCPError) as refused:
                async with probe.listen(resource_subscriptions=[open_uri, secret_uri]):
                    pass
    assert "at most 1 resource subscriptions" in refused.value.error.message
    assert not up.upstream.watched(SECRET)


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # resources/subscribe
async def test_subscriptions_and_listen_streams_are_audited(up: Up, arbiter_factory: ArbiterFactory) -> None:
    server, narrow_key = gateway(arbiter_factory, up)
    open_uri, secret_uri = f"arbiter://up/{OPEN}", f"arbiter://up/{SECRET}"
    async with agent(server, server.agent_key, "legacy", (open_uri,)) as (client, _):
        await client.unsubscribe_resource(open_uri)  # pyright: ignore[reportDeprecated]
    async with agent(server, server.agent_key, "2026-07-28", (open_uri,)):
        pass
    async with server.client("2026-07-28", narrow_key) as probe:
        with pytest.raises(MCPError):
            async with probe.listen(resource_subscriptions=[secret_uri]):
                pass

    methods = {"resources/subscribe", "resources/unsubscribe", "subscriptions/listen"}

    def found(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] in methods]

    records = found(await anyio.to_thread.run_sync(lambda: wait_for(server, lambda rs: len(found(rs)) >= 4)))
    assert len(records) == 4, records  # one each: the endpoint adds no second record of the refusal
    subscribed, unsubscribed, listened, refused = records
    assert (subscribed["method"], subscribed["decision"]) == ("resources/subscribe", "allow")
    assert (subscribed["upstream"], subscribed["tool"]) == ("up", open_uri)
    assert subscribed["outcome"]["resources"] == [open_uri]
    assert (unsubscribed["method"], unsubscribed["decision"]) == ("resources/unsubscribe", "allow")
    assert (listened["method"], listened["decision"]) == ("subscriptions/listen", "allow")
    assert listened["outcome"]["notifications"] == ["tools"]
    assert listened["outcome"]["resources"] == [open_uri]
    assert (refused["method"], refused["decision"]) == ("subscriptions/listen", "deny")
    assert refused["outcome"]["resources"] == [secret_uri]
    assert refused["actor"]["subject"] == "narrow"
    assert {r["actor"]["subject"] for r in records[:3]} != {"narrow"}
    assert narrow_key not in repr(records) and server.agent_key not in repr(records)


async def test_an_agent_whose_key_is_revoked_is_told_nothing_more(
    up: Up, arbiter_factory: ArbiterFactory
) -> None:
    server, narrow_key = gateway(arbiter_factory, up)
    parsed = parse_key(narrow_key)
    assert parsed is not None
    heard: list[object] = []
    ended = anyio.Event()
    async with (
        server.client("2026-07-28", narrow_key) as client,
        client.listen(tools_list_changed=True) as sub,
        anyio.create_task_group() as tg,
    ):

        async def drain() -> None:
            async for event in sub:
                heard.append(event)
            ended.set()

        tg.start_soon(drain)

        def revoke() -> None:
            with server.admin() as admin:
                assert admin.delete(f"/api-keys/{parsed[0]}").status_code == 204

        await until(up.upstream.heard)
        await anyio.to_thread.run_sync(revoke)
        await anyio.to_thread.run_sync(up.add_tool, "open_after_revoke")  # one it could see
        with anyio.fail_after(20):
            await ended.wait()  # its stream ended instead
    assert heard == []


POLICY_RULES = parse_csv(POLICY)


def _hub(engine: PolicyEngine, calls: list[str], **settings: Any) -> tuple[Catalog, NotificationHub]:
    def may_use(principal: Principal, obj: str, action: str) -> bool | None:
        calls.append(obj)
        sub = Subject.of(principal)
        if not engine.visible(sub, obj, action):
            return None
        return engine.decide(sub, obj, action).allowed

    async def refresh(upstream: str) -> None:
        pass

    catalog = Catalog()
    hub = NotificationHub(
        catalog,
        may_use,
        refresh,
        NotificationSettings(**settings),
        identity=lambda principal: engine.visibility_identity(Subject.of(principal)),
    )
    return catalog, hub


def _tools(*names: str) -> dict[str, dict[str, Any]]:
    return {name: {"name": name, "inputSchema": {"type": "object"}} for name in names}


async def test_a_catalog_change_is_judged_off_put_once_per_policy_identity() -> None:
    engine = PolicyEngine(POLICY_RULES, 1)
    calls: list[str] = []
    catalog, hub = _hub(engine, calls)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.run, stopping)
        await anyio.wait_all_tasks_blocked()
        narrow = [Principal(f"n{i}", "arbiter", "api_key", roles=frozenset({"narrow"})) for i in range(50)]
        inboxes = [hub.open(principal, frozenset({TOOLS}))[1] for principal in narrow]
        hidden = [f"hidden_{i}" for i in range(20)]
        catalog.put(UpstreamCatalog("up", tools=_tools(*hidden, "open_new")))
        assert calls == []  # put only noted the change
        with anyio.fail_after(10):
            told = [await inbox.receive() for inbox in inboxes]
        assert all(isinstance(event, ToolsListChanged) for event in told)
        # One identity (the policy names none of these subjects): judged once, not once per listener.
        assert 0 < len(calls) <= len(hidden) + 1
        stopping.set()


async def test_a_change_beyond_the_cap_is_judged_on_the_upstream_as_a_whole() -> None:
    engine = PolicyEngine(POLICY_RULES, 1)
    calls: list[str] = []
    catalog, hub = _hub(engine, calls, max_changed_judged=5)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.run, stopping)
        await anyio.wait_all_tasks_blocked()
        catalog.put(UpstreamCatalog("up", tools=_tools("open_tool")))
        _, narrow_inbox = hub.open(
            Principal("n", "arbiter", "api_key", roles=frozenset({"narrow"})), frozenset({TOOLS})
        )
        _, blind_inbox = hub.open(
            Principal("b", "arbiter", "api_key", roles=frozenset({"blind"})), frozenset({TOOLS})
        )
        hidden = [f"hidden_{i}" for i in range(20)]
        catalog.put(UpstreamCatalog("up", tools=_tools("open_tool", *hidden)))
        with anyio.fail_after(10):
            # Twenty hidden names changed, more than the cap: the narrow agent may see a tool there.
            assert isinstance(await narrow_inbox.receive(), ToolsListChanged)
        catalog.put(UpstreamCatalog("up", tools=_tools("open_tool", *hidden, "open_barrier")))
        with anyio.fail_after(10):
            assert isinstance(await narrow_inbox.receive(), ToolsListChanged)  # the barrier
        assert blind_inbox.statistics().current_buffer_used == 0  # sees nothing there: never told
        stopping.set()
