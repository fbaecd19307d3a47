"""GET /metrics against a real Arbiter in front of real upstreams: what moves as calls happen, bounded
labels, the token, and nothing at all when metrics are off."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.interceptors.metrics import ClientMetrics, ServerMetrics, labels_of
from arbiter.proxy.interceptors.resolve import Resolve
from arbiter.proxy.pipeline import CallContext
from arbiter.runtime import Runtime
from arbiter.telemetry.metrics import Metrics
from tests.conftest import ALLOW_ALL, ArbiterFactory, ArbiterServer, UpstreamProc
from tests.limits.conftest import admin_post, call

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

METRICS_TOKEN = "metrics-token-0123456789abcdef"
PUBLIC = {"metrics_public": True}  # served without a token (a port only the scraper reaches)
# A conditional deny: the tool stays visible, so the call is refused as policy_denied (not unknown).
POLICY = ALLOW_ALL + 'p, *, *, crm/delete_customer, call, deny, r.args.customer_id == "C-1001"\n'
SECRET_ARG = "C-1001"  # an argument value: never a label
SENT_NAME = "crm__no-such-tool-4711"  # a name the agent made up: never a label


def scrape_text(server: ArbiterServer, token: str | None = None) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def op(method: str, upstream: str, tool: str, outcome: str) -> dict[str, str]:
    return {"method": method, "upstream": upstream, "tool": tool, "outcome": outcome}


def wait_for(server: ArbiterServer, what: str, ok: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 20
    while True:
        found = samples(scrape_text(server))
        if ok(found):
            return found
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def label_values(text: str) -> set[str]:
    return {
        v
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for v in s.labels.values()
    }


async def test_metrics_move_as_calls_happen(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    spare = UpstreamProc("arbiter.demo.crm").start()  # this one dies during the test
    try:
        server = arbiter_factory(policy=POLICY, telemetry=PUBLIC)
        server.register("crm", crm_upstream.url)
        server.register("spare", spare.url)
        admin_post(
            server, "/limits", {"upstream": "crm", "tool": "list_tickets", "limit": 1, "period": "day"}
        )
        before = samples(scrape_text(server))
        assert value(before, "arbiter_upstream_up", upstream="spare") == 1.0
        key = server.agent_key
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await call(http, server, key, "crm__get_customer", {"customer_id": SECRET_ARG})).ok
            denied = await call(http, server, key, "crm__delete_customer", {"customer_id": SECRET_ARG})
            assert denied.reason == "policy_denied"
            unknown = await call(http, server, key, SENT_NAME, {"customer_id": SECRET_ARG})
            assert "error" in unknown.body  # a protocol error, as for any tool that does not exist
            assert (await call(http, server, key, "crm__list_tickets", {"customer_id": SECRET_ARG})).ok
            limited = await call(http, server, key, "crm__list_tickets", {"customer_id": SECRET_ARG})
            assert limited.reason == "rate_limited"
            assert (await call(http, server, key, "spare__get_customer", {"customer_id": SECRET_ARG})).ok
            spare.kill()
            down = await call(http, server, key, "spare__get_customer", {"customer_id": SECRET_ARG})
            assert down.reason == "upstream_unavailable"

        text = scrape_text(server)
        found = samples(text)
        server_count = "mcp_server_operation_duration_seconds_count"
        client_count = "mcp_client_operation_duration_seconds_count"
        call_ = "tools/call"
        assert value(found, server_count, **op(call_, "crm", "crm__get_customer", "allowed")) == 1
        assert value(found, client_count, **op(call_, "crm", "crm__get_customer", "allowed")) == 1
        assert (
            value(
                found,
                "mcp_server_operation_duration_seconds_sum",
                **op(call_, "crm", "crm__get_customer", "allowed"),
            )
            > 0
        )
        # Denied and refused calls never reach the upstream.
        assert value(found, server_count, **op(call_, "crm", "crm__delete_customer", "policy_denied")) == 1
        assert value(found, client_count, **op(call_, "crm", "crm__delete_customer", "policy_denied")) == 0
        assert value(found, server_count, **op(call_, "", "unknown", "unknown_target")) == 1
        assert value(found, server_count, **op(call_, "crm", "crm__list_tickets", "rate_limited")) == 1
        assert value(found, client_count, **op(call_, "crm", "crm__list_tickets", "allowed")) == 1
        assert value(found, "arbiter_limit_refusals_total", kind="rate_limited", upstream="crm") == 1
        assert value(found, "arbiter_decisions_total", decision="allow", reason="allowed") >= 3
        assert value(found, "arbiter_decisions_total", decision="deny", reason="policy_denied") == 1
        assert value(found, "arbiter_decisions_total", decision="deny", reason="rate_limited") == 1
        assert value(found, "arbiter_decisions_total", decision="deny", reason="unknown_target") == 1
        # The dead upstream: the call failed upstream, and the pool reports it down.
        assert (
            value(found, server_count, **op(call_, "spare", "spare__get_customer", "upstream_unavailable"))
            == 1
        )
        assert (
            value(found, client_count, **op(call_, "spare", "spare__get_customer", "upstream_unavailable"))
            == 1
        )
        assert (
            value(found, "arbiter_upstream_errors_total", upstream="spare", kind="upstream_unavailable") == 1
        )
        assert value(found, "arbiter_upstream_errors_total", upstream="crm", kind="upstream_unavailable") == 0
        assert value(found, "arbiter_upstream_up", upstream="spare") == 0.0
        assert value(found, "arbiter_upstream_up", upstream="crm") == 1.0
        assert value(found, "arbiter_requests_in_flight") == 0
        with server.admin() as admin:
            version = admin.get("/policies").json()["version"]
        assert version >= 1 and value(found, "arbiter_policy_version") == version
        assert ("arbiter_audit_queue_depth", frozenset()) in found
        # Every request's record is stored in batches; the writer reports how long each took.
        wait_for(
            server,
            "an audit batch write",
            lambda s: value(s, "arbiter_audit_write_duration_seconds_count") > 0,
        )

        # Bounded labels: nothing the caller sent or is, and no credential.
        values = label_values(text)
        for secret in (server.agent_key, SECRET_ARG, SENT_NAME, "no-such-tool-4711", "test-agent", "acme"):
            assert not any(secret in v for v in values), secret
        assert server.agent_key not in text
    finally:
        spare.kill()


async def test_the_token_protects_metrics(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(telemetry={"metrics_token": METRICS_TOKEN})
    url = f"{server.base_url}/metrics"
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(url)).status_code == 401
        refused = await http.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN}x"})
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert METRICS_TOKEN not in refused.text
        assert (await http.get(url, headers={"authorization": f"Basic {METRICS_TOKEN}"})).status_code == 401
        # The agent's API key is not the metrics token.
        assert (await http.get(url, headers=server.auth_headers)).status_code == 401
    text = scrape_text(server, METRICS_TOKEN)
    assert METRICS_TOKEN not in text
    assert "mcp_server_operation_duration_seconds" in {f.name for f in text_string_to_metric_families(text)}


async def test_metrics_off_means_no_route_and_no_metrics_steps(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    on = arbiter_factory(telemetry=PUBLIC)
    off = arbiter_factory(telemetry={"metrics": False})
    # On, but neither a token nor metrics_public: metrics would name hidden tools to any agent on the
    # /mcp port, so they are not served, and not recorded either.
    unprotected = arbiter_factory()
    off.register("crm", crm_upstream.url)
    for server in (off, unprotected):
        steps = {type(step) for step in _runtime(server).pipeline.interceptors}
        assert not steps & {ServerMetrics, ClientMetrics}
    assert {ServerMetrics, ClientMetrics} <= {type(step) for step in _runtime(on).pipeline.interceptors}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{off.base_url}/metrics")).status_code == 404
        assert (await http.get(f"{unprotected.base_url}/metrics")).status_code == 404
        assert (await http.get(f"{on.base_url}/metrics")).status_code == 200
        assert (await call(http, off, off.agent_key, "crm__get_customer", {"customer_id": SECRET_ARG})).ok


def _runtime(server: ArbiterServer) -> Runtime:
    runtime: Runtime = server.app.state.runtime
    return runtime


def test_each_app_counts_on_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.request_started()
    a.request_finished("tools/call", "crm", "crm__get_customer", "allowed", "allow", 0.01)
    assert (
        value(samples(a.render().decode()), "arbiter_decisions_total", decision="allow", reason="allowed")
        == 1
    )
    assert (
        value(samples(b.render().decode()), "arbiter_decisions_total", decision="allow", reason="allowed")
        == 0
    )


def test_circuit_states_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    states: dict[str, str] = {"crm": "closed"}

    def current() -> Mapping[str, str]:
        return states

    metrics.read_at_scrape(circuit_states=current)
    metrics.set_circuit_state("kb", "half_open")  # pushed by the breaker itself
    states["crm"] = "open"
    found = samples(metrics.render().decode())
    circuit = "arbiter_upstream_circuit_state"
    assert value(found, circuit, upstream="crm", state="open") == 1
    assert value(found, circuit, upstream="crm", state="closed") == 0
    assert value(found, circuit, upstream="crm", state="half_open") == 0
    assert value(found, circuit, upstream="kb", state="half_open") == 1
    metrics.forget_upstream("kb")
    assert value(samples(metrics.render().decode()), circuit, upstream="kb", state="half_open") == 0


async def test_circuit_state_and_breaker_refusals(arbiter_factory: ArbiterFactory) -> None:
    spare = UpstreamProc("arbiter.demo.crm").start()
    try:
        server = arbiter_factory(upstream={"breaker_threshold": 1, "breaker_open_s": 600}, telemetry=PUBLIC)
        server.register("spare", spare.url)
        circuit = "arbiter_upstream_circuit_state"
        found = samples(scrape_text(server))
        assert value(found, circuit, upstream="spare", state="closed") == 1
        assert value(found, circuit, upstream="spare", state="open") == 0
        key = server.agent_key
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await call(http, server, key, "spare__get_customer", {"customer_id": SECRET_ARG})).ok
            spare.kill()
            failed = await call(http, server, key, "spare__get_customer", {"customer_id": SECRET_ARG})
            assert failed.reason == "upstream_unavailable"
            refused = await call(http, server, key, "spare__get_customer", {"customer_id": SECRET_ARG})
            assert refused.refusal.get("circuit") == "open"
        found = samples(scrape_text(server))
        assert value(found, circuit, upstream="spare", state="open") == 1
        assert value(found, circuit, upstream="spare", state="closed") == 0
        assert value(found, "arbiter_upstream_errors_total", upstream="spare", kind="circuit_open") == 1
        assert (
            value(found, "arbiter_upstream_errors_total", upstream="spare", kind="upstream_unavailable") == 1
        )
    finally:
        spare.kill()


async def test_spellings_of_one_resource_share_one_series() -> None:
    # Dot segments, escapes and a differently cased scheme all resolve to one catalog entry; the agent's
    # spelling must not become a label, or any agent could grow the series (and memory) without bound.
    catalog = Catalog()
    uri = "docs://handbook/intro"
    catalog.put(UpstreamCatalog("docs", resources={uri: {"uri": uri, "name": "intro"}}))
    resolve = Resolve(catalog)

    async def end(ctx: CallContext) -> dict[str, object]:
        return {}

    labels: set[tuple[str, str, str]] = set()
    spellings = ["", "./", "zz/../", "%69"]
    for prefix in spellings:
        sent = f"arbiter://docs/docs://handbook/{prefix}{'ntro' if prefix == '%69' else 'intro'}"
        ctx = CallContext(method="resources/read", params={"uri": sent})
        await resolve(ctx, end)
        assert ctx.definition is not None, sent
        labels.add(labels_of(ctx, None))
    assert labels == {("resources/read", "docs", "arbiter://docs/docs://handbook/intro")}
