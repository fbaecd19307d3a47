"""The app factory: ``create_app(settings)`` builds every service; the lifespan starts and stops them."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from mcp.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

from arbiter import probes, wellknown
from arbiter.admin import access as admin_access
from arbiter.admin import api_keys as admin_keys
from arbiter.admin import approvals as admin_approvals
from arbiter.admin import audit as admin_audit
from arbiter.admin import definitions as admin_definitions
from arbiter.admin import errors as admin_errors
from arbiter.admin import limits as admin_limits
from arbiter.admin import openapi as admin_openapi
from arbiter.admin import policies as admin_policies
from arbiter.admin import upstreams as admin_upstreams
from arbiter.admin.nul import refuse_nul
from arbiter.admission import Admission
from arbiter.audit.events import record_policy_change
from arbiter.audit.record import Event, renderer_for
from arbiter.audit.redact import Redactor
from arbiter.audit.retention import run_retention
from arbiter.audit.signing import Signer, hmac_key
from arbiter.audit.store import AuditStore
from arbiter.audit.writer import AuditWriter
from arbiter.auth.apikeys import ApiKeys
from arbiter.auth.authenticator import Authenticator, resource_url
from arbiter.auth.jwt import JwtVerifier
from arbiter.auth.key_feed import KeyFeed
from arbiter.auth.outbound import Outbound
from arbiter.auth.secrets import SecretBox
from arbiter.console.router import install as install_console
from arbiter.errors import ArbiterError, AuditUnavailable
from arbiter.integrity.arguments import ArgumentGuard
from arbiter.integrity.results import ResultGuard
from arbiter.integrity.scan import load_rules
from arbiter.limits.factory import build_limiter, build_redis
from arbiter.limits.store import LimitStore
from arbiter.metrics_route import metrics_router
from arbiter.net.egress import Egress
from arbiter.policies.live import LivePolicy
from arbiter.policies.store import PolicyStore
from arbiter.proxy.approval_desk import ApprovalDesk
from arbiter.proxy.approval_requests import ApprovalRequests
from arbiter.proxy.approval_uses import ApprovalUses
from arbiter.proxy.approval_webhook import ApprovalWebhook
from arbiter.proxy.catalog import Catalog
from arbiter.proxy.endpoint import McpEndpoint
from arbiter.proxy.front import ModernFront
from arbiter.proxy.handshake_front import HandshakeFront, SdkSessions
from arbiter.proxy.interceptors.approval import Approval
from arbiter.proxy.interceptors.audit import Audit
from arbiter.proxy.interceptors.authorize import Authorize
from arbiter.proxy.interceptors.forward import Forward
from arbiter.proxy.interceptors.guard_arguments import GuardArguments
from arbiter.proxy.interceptors.guard_result import GuardResult
from arbiter.proxy.interceptors.input_rounds import InputRounds
from arbiter.proxy.interceptors.integrity import Integrity
from arbiter.proxy.interceptors.limits import Limits
from arbiter.proxy.interceptors.metrics import ClientMetrics, ServerMetrics
from arbiter.proxy.interceptors.resolve import Resolve
from arbiter.proxy.interceptors.tracing import traced
from arbiter.proxy.judge import DefinitionScan
from arbiter.proxy.listeners import install as install_listeners
from arbiter.proxy.notifications import NotificationHub
from arbiter.proxy.pipeline import Interceptor, Pipeline
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.registry import UpstreamRegistry
from arbiter.proxy.request_state import RequestStateSeal
from arbiter.proxy.reviews import arrival_events
from arbiter.proxy.server import build_mcp_server
from arbiter.proxy.upstream_watch import UpstreamWatch
from arbiter.runtime import Runtime
from arbiter.settings import Settings, load_settings
from arbiter.store.db import create_engine, session_factory
from arbiter.store.schema import require_head
from arbiter.telemetry.metrics import Metrics
from arbiter.telemetry.tracing import TRACER_NAME, build_tracer_provider
from arbiter.ticks import Every, ticks

log = logging.getLogger(__name__)

_BACKGROUND_STOP_S = 10.0  # how long shutdown waits for background work in flight before cancelling it


def arbiter_version() -> str:
    try:
        return version("arbiter")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0"


class ArbiterApp(FastAPI):
    """FastAPI for the admin API and probes; ``/mcp`` goes straight to the MCP endpoint.

    The agent endpoint is the hot path: skipping FastAPI's middleware and route matching for it saves
    measurable CPU per call (see bench/), and it needs neither.
    """

    mcp_endpoint: McpEndpoint | None = None
    # Draining (SIGTERM) and the /mcp in-flight limit: refused with 503 + Retry-After (admission.py).
    admission: Admission  # set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        admission = self.admission
        if admission.draining and admission.refuses(scope):
            await admission.refuse_draining(scope, receive, send)
            return
        if scope["path"] == "/mcp" and self.mcp_endpoint is not None:
            await admission.serve_mcp(self.mcp_endpoint, scope, receive, send)  # answers its own errors
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
        except Exception:
            # Starlette answers an unhandled error (through admin/errors.py) and then re-raises it
            # for the server, which would close the connection: the client's next request on it would
            # fail. The error is answered and logged; the connection stays usable.
            if not started:
                log.exception("internal error while serving %s %s", scope["method"], scope["path"])
                await admin_errors.internal_error_response()(scope, receive, send)


def _argument_guard(settings: Settings) -> ArgumentGuard:
    guard = settings.integrity.arguments
    return ArgumentGuard(guard, settings.audit.redact.patterns)


def _result_guard(settings: Settings) -> ResultGuard:
    integrity = settings.integrity
    return ResultGuard(integrity.results, settings.audit.redact.patterns, integrity.arguments.validator_cache)


def create_app(
    settings: Settings | None = None,
    *,
    interceptors: Sequence[Interceptor] = (),
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build an Arbiter app. ``interceptors`` run between the limits and forward steps, in order.

    ``clock`` (epoch seconds) drives the in-process limits backend (the Redis one uses Redis's clock) and
    approvals' expiries.
    ``monotonic`` (seconds, only differences count) drives the expiry of upstream OAuth tokens.
    ``tracer_provider`` turns traces on with that provider (tests pass one with an in-memory exporter);
    without it, ``telemetry.traces`` decides, and the app builds and shuts down its own.
    """
    settings = settings or load_settings()
    _quiet_sdk_logging()
    secret_box = SecretBox(settings.secret_key)  # upstream secrets given through the admin API
    egress = Egress(settings.upstream)  # the address check of every outbound connection
    pool = UpstreamPool(
        max_connections=settings.upstream.max_connections,
        idle_connection_s=settings.upstream.idle_connection_s,
        reconnect_backoff_s=settings.upstream.reconnect_backoff_s,
        outbound=Outbound(
            secret_box, token_timeout_s=settings.upstream.token_timeout_s, clock=monotonic, egress=egress
        ),
        caller_sessions_max=settings.upstream.caller_sessions_max,
        caller_session_idle_s=settings.upstream.caller_session_idle_s,
        egress=egress,
        policy=settings.upstream,  # deadlines, breakers, bulkheads, retries (docs/resilience.md)
        ask_agents=settings.mcp.relay_server_requests,  # elicitation, sampling, roots (docs/protocol.md)
    )
    catalog = Catalog(pool.health)  # reads which upstreams are down; only the pool writes it
    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    audit = _audit_writer(settings, engine)
    registry = UpstreamRegistry(
        sessions,
        pool,
        catalog,
        settings.upstream,
        settings.upstreams,
        box=secret_box,
        judge=DefinitionScan(load_rules(settings.integrity.scan_rules_files)),
        on_arrivals=lambda upstream, arrivals: _record(audit, arrival_events(upstream, arrivals)),
        auto_approve_default=settings.integrity.auto_approve_default,
    )
    keys = ApiKeys(sessions)
    jwt = _jwt_verifier(settings)
    authenticator = Authenticator(settings, keys, jwt)
    # One Redis client (one connection pool) for the limits and the policy change feed; the lifespan
    # closes it. Built only with a URL: without Redis everything runs in process.
    redis = build_redis(settings.redis_url, settings.limits.redis_timeout_s) if settings.redis_url else None
    policy = LivePolicy(PolicyStore(sessions, record_policy_change), settings.policy, redis)
    # Key creations and revocations reach the other replicas at once through Redis (auth/key_feed.py).
    key_feed = KeyFeed(keys, redis, f"{settings.policy.redis_channel}:api-keys") if redis else None
    if key_feed is not None:
        keys.on_change = key_feed.changed
    limiter = build_limiter(settings.limits, LimitStore(sessions), redis, clock)
    authorize = Authorize(policy, approvals=True)  # the pipeline below has the approval step
    argument_guard = _argument_guard(settings)
    approval_requests = ApprovalRequests(
        engine,
        pending_ttl_s=settings.approvals.pending_ttl_s,
        max_pending=settings.approvals.max_pending_per_caller,
        clock=clock,
        webhook=settings.approvals.webhook_url is not None,
    )
    webhook = (
        ApprovalWebhook(approval_requests, settings.approvals) if settings.approvals.webhook_url else None
    )
    seal = _request_state_seal(settings)  # input rounds and approvals (docs/protocol.md)
    metrics = _metrics(settings, audit, policy, pool)  # None: telemetry.metrics is off
    # Traces: an injected provider (tests) or the one telemetry.traces asks for; None when off.
    owned_provider = (
        None if tracer_provider is not None else build_tracer_provider(settings.telemetry, arbiter_version())
    )
    provider = tracer_provider or owned_provider
    tracer = provider.get_tracer(TRACER_NAME, arbiter_version()) if provider is not None else None
    pipeline = _pipeline(
        tracer,
        pool,
        settings,
        [
            *([ServerMetrics(metrics)] if metrics is not None else []),
            Audit(audit),
            Resolve(catalog),
            authorize,
            Integrity(),
            Approval(
                seal,
                ApprovalUses(engine),
                Redactor(settings.audit.redact),  # the arguments the user sees, as the audit log shows them
                ttl_s=settings.mcp.request_state_ttl_s,
                answer_timeout_s=settings.mcp.request_state_ttl_s,
                requests=approval_requests,
                approver_valid_s=settings.approvals.valid_s,
                on_request=webhook.kick if webhook is not None else lambda _: None,
                guard=argument_guard,
                clock=clock,
            ),
            InputRounds(
                seal,
                max_rounds=settings.mcp.input_rounds_max,
                answer_timeout_s=settings.mcp.request_state_ttl_s,  # each question put to the agent
            ),
            GuardArguments(argument_guard),
            Limits(limiter),
            *interceptors,
            GuardResult(_result_guard(settings)),
            *([ClientMetrics(metrics)] if metrics is not None else []),
            Forward(catalog, pool),
        ],
    )
    mcp_cfg = settings.mcp
    error_results = mcp_cfg.tool_errors == "result"
    mcp_server = build_mcp_server(
        pipeline,
        catalog,
        arbiter_version(),
        authorize.tool_visible,
        error_results=error_results,
        relay_requests=mcp_cfg.relay_server_requests,
        max_requests=mcp_cfg.input_requests_max,
    )
    manager = StreamableHTTPSessionManager(
        app=mcp_server,
        json_response=mcp_cfg.json_response,
        stateless=mcp_cfg.stateless_legacy,
        # Host/Origin are checked by McpEndpoint before authentication; the SDK still checks content types.
        security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        session_idle_timeout=mcp_cfg.session_idle_timeout_s,
        max_sessions=mcp_cfg.max_sessions,
        max_request_body_size=mcp_cfg.max_body_bytes,
    )
    # List changes and resource subscriptions, relayed (docs/protocol.md). Off: no handlers, none advertised.
    notifications = _notifications(settings, catalog, authorize, registry, pool, mcp_server, keys, audit)
    direct = mcp_cfg.direct_path and mcp_cfg.json_response
    handshake: HandshakeFront | None = None
    if direct:
        sdk_sessions: SdkSessions | None = None  # stateless_legacy: each POST on its own
        if not mcp_cfg.stateless_legacy:
            # After the change notifications' handlers: it keeps theirs on notifications/initialized.
            sdk_sessions = SdkSessions(manager)
            sdk_sessions.install(mcp_server)
        handshake = HandshakeFront(
            pipeline,
            sdk_sessions,
            error_results=error_results,
            relay_requests=mcp_cfg.relay_server_requests,
            max_requests=mcp_cfg.input_requests_max,
        )
    runtime = Runtime(
        settings,
        engine,
        sessions,
        catalog,
        pool,
        registry,
        pipeline,
        manager,
        keys,
        authenticator,
        policy,
        audit=audit,
        limits=limiter,
        approvals=ApprovalDesk(approval_requests),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncGenerator[None]:
        try:
            if settings.check_schema:
                await require_head(engine)
            stopping = anyio.Event()
            audit_stopping = anyio.Event()
            async with anyio.create_task_group() as audit_tg:
                # The audit writer outlives the MCP endpoint: it drains once requests have stopped.
                audit_tg.start_soon(audit.run, audit_stopping)
                audit_tg.start_soon(run_retention, audit.store, settings.audit, audit_stopping)
                try:
                    async with pool, manager.run(), anyio.create_task_group() as tg:
                        await registry.load()
                        await keys.reload()
                        await policy.reload()
                        await limiter.start()
                        if notifications is not None:
                            tg.start_soon(notifications[0].run, stopping)
                            tg.start_soon(notifications[1].run, stopping)
                        tg.start_soon(_guarded, registry.discover_new, "start-up discovery")
                        tg.start_soon(policy.run, stopping)
                        if key_feed is not None:
                            tg.start_soon(key_feed.run, stopping)
                        tg.start_soon(limiter.run, stopping)
                        tg.start_soon(_maintain, runtime, stopping)
                        if webhook is not None:
                            tg.start_soon(webhook.run, stopping)
                        yield
                        # Let a maintenance pass in flight finish rather than cancel it mid-query: a
                        # cancelled database call makes SQLAlchemy terminate the connection, which can
                        # leave a task behind that the event loop then waits for. Cancel only what
                        # overstays.
                        stopping.set()
                        tg.cancel_scope.deadline = anyio.current_time() + _BACKGROUND_STOP_S
                    await _guarded(keys.flush_usage, "recording API key use")
                finally:
                    audit_stopping.set()
                    cfg = settings.audit
                    audit_tg.cancel_scope.deadline = (
                        anyio.current_time() + cfg.drain_timeout_s + 2 * cfg.write_timeout_s + 5
                    )
        finally:
            if jwt is not None:
                await jwt.aclose()
            await limiter.aclose()
            if webhook is not None:
                await webhook.aclose()
            if redis is not None:
                await redis.aclose()
            await engine.dispose()
            if owned_provider is not None:  # exports what is still batched (bounded by its own timeouts)
                await anyio.to_thread.run_sync(owned_provider.shutdown)

    app = ArbiterApp(
        title="Arbiter admin API",
        version=arbiter_version(),
        lifespan=lifespan,
        # The API description is part of /admin/v1, so it needs a credential too (see admin/openapi.py).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # No redirect from `/x/` to `/x`: it would answer before authentication, and clients that follow
        # it drop the Authorization header on the way.
        redirect_slashes=False,
        # Before every route's own dependencies: no NUL character reaches the database (admin/nul.py).
        dependencies=[Depends(refuse_nul)],
    )
    app.state.runtime = runtime
    app.admission = app.state.admission = Admission(max_in_flight=mcp_cfg.max_in_flight)
    app.admission.listen_streams = notifications is not None
    app.include_router(admin_upstreams.router, prefix="/admin/v1", tags=["upstreams"])
    app.include_router(admin_definitions.router, prefix="/admin/v1", tags=["definitions"])
    app.include_router(admin_keys.router, prefix="/admin/v1", tags=["api-keys"])
    app.include_router(admin_policies.router, prefix="/admin/v1", tags=["policies"])
    app.include_router(admin_access.router, prefix="/admin/v1", tags=["access"])
    app.include_router(admin_audit.router, prefix="/admin/v1", tags=["audit"])
    app.include_router(admin_limits.router, prefix="/admin/v1", tags=["limits"])
    app.include_router(admin_approvals.router, prefix="/admin/v1", tags=["approvals"])
    app.include_router(admin_openapi.router, prefix="/admin/v1")
    app.include_router(probes.router)
    if metrics is not None:
        app.include_router(metrics_router(metrics, settings.telemetry.metrics_token))
    app.include_router(wellknown.router)
    if settings.console.enabled:
        install_console(app, settings, engine, jwt)  # /console (docs/console.md)
    app.mcp_endpoint = McpEndpoint(
        manager,
        max_body_bytes=mcp_cfg.max_body_bytes,
        body_timeout_s=mcp_cfg.body_timeout_s,
        authenticator=authenticator,
        time_authentication=tracer is not None and settings.telemetry.trace_steps,
        security=TransportSecuritySettings(
            enable_dns_rebinding_protection=mcp_cfg.dns_rebinding_protection,
            allowed_hosts=mcp_cfg.allowed_hosts,
            allowed_origins=mcp_cfg.allowed_origins,
        ),
        audit=audit,
        front=ModernFront(
            pipeline,
            catalog,
            authorize.tool_visible,
            json_response=direct,
            server_info=lambda: mcp_server.server_info_stamp,
            error_results=error_results,
        ),
        handshake=handshake,
    )

    admin_errors.install(app, authenticator, audit)
    return app


def _audit_writer(settings: Settings, engine: AsyncEngine) -> AuditWriter:
    cfg = settings.audit
    signer = Signer.from_secret(cfg.signing_key)
    key, stable = hmac_key(cfg.hmac_key, signer)
    if not stable:
        log.warning("audit.hmac_key and audit.signing_key are unset: argument HMACs use a per-process key")
    if signer.private is None:
        log.warning("audit.signing_key is unset: audit checkpoints are not signed")
    renderer = renderer_for(cfg.redact, key)
    return AuditWriter(AuditStore(engine, signer, cfg, renderer.render), renderer.render, cfg)


def _request_state_seal(settings: Settings) -> RequestStateSeal:
    # Keyed from secret_key, so every replica opens what another sealed; unset: this process's own key.
    key = settings.secret_key.get_secret_value() if settings.secret_key is not None else None
    return RequestStateSeal.of(key, ttl_s=settings.mcp.request_state_ttl_s)


def _metrics(
    settings: Settings, audit: AuditWriter, policy: LivePolicy, pool: UpstreamPool
) -> Metrics | None:
    telemetry = settings.telemetry
    if not telemetry.metrics:
        return None
    if telemetry.metrics_token is None and not telemetry.metrics_public:
        log.warning(
            "metrics are not served: set telemetry.metrics_token (ARBITER_TELEMETRY__METRICS_TOKEN), or "
            "telemetry.metrics_public=true if only the scraper can reach this port"
        )
        return None
    metrics = Metrics()  # a registry of this app's own
    audit.on_write = metrics.audit_write
    # The circuit breakers' states, where the pool reports them: {upstream: "closed"|"open"|"half_open"}.
    circuit_states: Callable[[], Mapping[str, str]] | None = getattr(pool, "circuit_states", None)
    metrics.read_at_scrape(
        audit_queue=lambda: audit.queued,
        policy_version=lambda: policy.engine.version,
        upstreams_up=lambda: {name: pool.healthy(name) for name in pool.names()},
        circuit_states=circuit_states,
    )
    return metrics


def _pipeline(
    tracer: Tracer | None, pool: UpstreamPool, settings: Settings, steps: list[Interceptor]
) -> Pipeline:
    """The governance pipeline; with traces on, a tracing step first and spans around the steps."""
    if tracer is None:
        return Pipeline(steps)  # traces off: not one tracing step, no tracing work per call

    def upstream_url(name: str) -> str | None:
        client = pool.current(name)
        return client.spec.url if client is not None else None

    redactor = Redactor(settings.audit.redact) if settings.telemetry.trace_arguments else None
    step_spans = settings.telemetry.trace_steps
    return Pipeline(traced(steps, tracer, upstream_url, redactor, step_spans=step_spans))


def _notifications(
    settings: Settings,
    catalog: Catalog,
    authorize: Authorize,
    registry: UpstreamRegistry,
    pool: UpstreamPool,
    server: Server[Any],
    keys: ApiKeys,
    audit: AuditWriter,
) -> tuple[NotificationHub, UpstreamWatch] | None:
    """The hub fanning upstream changes out to agents and the watchers hearing the upstreams, installed
    on ``server``; None when ``notifications.enabled`` is off."""
    cfg = settings.notifications
    if not cfg.enabled:
        return None
    hub = NotificationHub(
        catalog,
        authorize.may_use,
        registry.refresh_one,
        cfg,
        identity=authorize.identity,
        current=keys.current,
    )
    install_listeners(server, hub, send_timeout_s=cfg.send_timeout_s, audit=audit)
    return hub, UpstreamWatch(pool, hub, cfg)


def _jwt_verifier(settings: Settings) -> JwtVerifier | None:
    if not settings.auth.issuers:
        return None
    return JwtVerifier(settings.auth, resource_url(settings))


async def _maintain(runtime: Runtime, stopping: anyio.Event) -> None:
    """Follow other replicas' changes and bring recovered upstreams back quickly (every few seconds);
    re-discover every catalog at the refresh interval. Returns once ``stopping`` is set."""
    registry, policy, keys = runtime.registry, runtime.settings.upstream, runtime.keys
    refresh = Every(policy.catalog_refresh_interval_s, policy.maintain_interval_s)
    async for _ in ticks(policy.maintain_interval_s, stopping):
        await _guarded(registry.reconcile, "reconcile")
        await _guarded(registry.heal, "recovery")
        await _guarded(keys.reload, "reloading API keys")
        await _guarded(keys.flush_usage, "recording API key use")
        if refresh.due() and policy.catalog_refresh_interval_s:  # 0: never
            await _guarded(registry.refresh_all, "catalog refresh")


def _record(audit: AuditWriter, events: Sequence[Event]) -> None:
    """Background findings (a definition quarantined, pending or flagged): recorded when the log has
    room; the definition is held all the same when it has not, so nothing unsafe follows from a loss."""
    for event in events:
        try:
            audit.reserve()
        except AuditUnavailable:
            log.warning("audit: could not record %s of %s", event.method, event.tool)
            continue
        audit.submit(event)


async def _guarded(work: Callable[[], Awaitable[None]], what: str) -> None:
    # Background work shares the lifespan's task group with the MCP session manager: an exception
    # escaping here would take /mcp down while /healthz still answers. Log it; the next pass retries.
    try:
        await work()
    except (ArbiterError, SQLAlchemyError, OSError):
        log.exception("%s failed", what)


def _quiet_sdk_logging() -> None:
    # The SDK logs per request at INFO (through rich); that costs ~0.7 ms a call on the hot path.
    for name in ("mcp", "mcp.server", "mcp.client", "httpx2", "httpx", "casbin"):
        logging.getLogger(name).setLevel(logging.WARNING)
