"""Prometheus metrics: one registry per app, instruments the request path feeds, readings taken at scrape.

Names follow the OpenTelemetry ones in Prometheus style (``mcp.server.operation.duration`` ->
``mcp_server_operation_duration_seconds``). Every label set is bounded: methods, upstreams and tools come
from the catalog, outcomes from Arbiter's stable reason codes; never a subject, tenant, argument or id.

The registry belongs to the app (never prometheus_client's global one), so several apps in one process
(tests, replicas in a benchmark) keep their own counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CIRCUIT_STATES", "CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The states a circuit breaker reports; each upstream has one series per state, 1 for the current one.
CIRCUIT_STATES = ("closed", "open", "half_open")

# Arbiter's own work is sub-millisecond, a tool call may take minutes: the MCP semantic conventions'
# buckets with finer ones below 10 ms.
_OPERATION_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    *(1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OPERATION_LABELS = ("method", "upstream", "tool", "outcome")

_Child = TypeVar("_Child", Counter, Histogram)


class Metrics:
    """The instruments of one app. Request-path methods are cheap: a dict lookup for the labelled child
    (cached, since ``labels()`` validates and locks each time) and the observation itself."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._server = Histogram(
            "mcp_server_operation_duration_seconds",
            "MCP requests Arbiter served, from arrival in the pipeline to the answer; outcome is the audit "
            "record's reason (tool_error: the tool answered isError)",
            _OPERATION_LABELS,
            registry=r,
            buckets=_OPERATION_BUCKETS,
        )
        self._client = Histogram(
            "mcp_client_operation_duration_seconds",
            "MCP requests Arbiter sent to an upstream, from hand-off to the upstream's answer",
            _OPERATION_LABELS,
            registry=r,
            buckets=_OPERATION_BUCKETS,
        )
        self._decisions = Counter(
            "arbiter_decisions",
            "Governance decisions, by decision and reason",
            ("decision", "reason"),
            registry=r,
        )
        self._refusals = Counter(
            "arbiter_limit_refusals",
            "Calls refused by rate limits, budgets, the loop breaker or the limits store, by kind (the "
            "reason) and upstream",
            ("kind", "upstream"),
            registry=r,
        )
        self._upstream_errors = Counter(
            "arbiter_upstream_errors",
            "Failed upstream requests, by upstream and kind (the error's reason; circuit_open: refused by "
            "an open circuit breaker without a request)",
            ("upstream", "kind"),
            registry=r,
        )
        # A plain int read at scrape time: the request path and the scrape share the event loop, so this
        # needs none of the lock a Gauge takes on every change.
        self._in_flight = 0
        self._audit_write = Histogram(
            "arbiter_audit_write_duration_seconds",
            "Time to store one batch of audit records",
            registry=r,
            buckets=_WRITE_BUCKETS,
        )
        self._children: dict[tuple[object, ...], Counter | Histogram] = {}
        self._circuits: dict[str, str] = {}
        self._audit_queue: Callable[[], int] | None = None
        self._policy_version: Callable[[], int] | None = None
        self._upstreams_up: Callable[[], Mapping[str, bool]] | None = None
        self._circuit_states: Callable[[], Mapping[str, str]] | None = None
        r.register(_Readings(self))

    # --- the request path ---------------------------------------------------------------------------

    def _child(self, parent: _Child, values: tuple[str, ...]) -> _Child:
        key = (id(parent), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = parent.labels(*values)
        return child  # pyright: ignore[reportReturnType] - keyed by parent, so of the parent's type

    def request_started(self) -> None:
        self._in_flight += 1

    def request_finished(
        self, method: str, upstream: str, tool: str, outcome: str, decision: str, seconds: float
    ) -> None:
        self._in_flight -= 1
        self._child(self._server, (method, upstream, tool, outcome)).observe(seconds)
        self._child(self._decisions, (decision, outcome)).inc()

    def limit_refused(self, kind: str, upstream: str) -> None:
        self._child(self._refusals, (kind, upstream)).inc()

    def upstream_call(self, method: str, upstream: str, tool: str, outcome: str, seconds: float) -> None:
        self._child(self._client, (method, upstream, tool, outcome)).observe(seconds)

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._child(self._upstream_errors, (upstream, kind)).inc()

    # --- background work ----------------------------------------------------------------------------

    def audit_write(self, seconds: float) -> None:
        self._audit_write.observe(seconds)

    def set_circuit_state(self, upstream: str, state: str) -> None:
        """Report an upstream's breaker state (one of ``CIRCUIT_STATES``); a scrape-time reader
        (``read_at_scrape(circuit_states=...)``) overrides what is pushed here for the upstreams it names."""
        self._circuits[upstream] = state

    def forget_upstream(self, upstream: str) -> None:
        self._circuits.pop(upstream, None)

    # --- readings taken at scrape time ---------------------------------------------------------------

    def read_at_scrape(
        self,
        *,
        audit_queue: Callable[[], int] | None = None,
        policy_version: Callable[[], int] | None = None,
        upstreams_up: Callable[[], Mapping[str, bool]] | None = None,
        circuit_states: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """Sources read on each scrape (on the event loop, so they may read the app's state freely)."""
        self._audit_queue = audit_queue or self._audit_queue
        self._policy_version = policy_version or self._policy_version
        self._upstreams_up = upstreams_up or self._upstreams_up
        self._circuit_states = circuit_states or self._circuit_states

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this app."""
        return generate_latest(self.registry)

    def _readings(self) -> Iterable[Metric]:
        yield _gauge("arbiter_requests_in_flight", "MCP requests in the pipeline now", self._in_flight)
        if self._audit_queue is not None:
            yield _gauge(
                "arbiter_audit_queue_depth",
                "Audit records reserved or waiting to be stored",
                self._audit_queue(),
            )
        if self._policy_version is not None:
            yield _gauge(
                "arbiter_policy_version", "The policy version this replica enforces", self._policy_version()
            )
        if self._upstreams_up is not None:
            up = GaugeMetricFamily(
                "arbiter_upstream_up",
                "Whether the upstream's connection is healthy (1) or down (0)",
                labels=["upstream"],
            )
            for name, healthy in sorted(self._upstreams_up().items()):
                up.add_metric([name], 1.0 if healthy else 0.0)
            yield up
        states = dict(self._circuits)
        if self._circuit_states is not None:
            states.update(self._circuit_states())
        if states:
            circuit = GaugeMetricFamily(
                "arbiter_upstream_circuit_state",
                "Circuit breaker state per upstream: 1 for the current state, 0 for the others",
                labels=["upstream", "state"],
            )
            for name, current in sorted(states.items()):
                for state in CIRCUIT_STATES:
                    circuit.add_metric([name, state], 1.0 if state == current else 0.0)
            yield circuit


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Readings(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # names vary with what is registered; nothing to clash with in a registry of our own

    def collect(self) -> Iterable[Metric]:
        return self._metrics._readings()  # pyright: ignore[reportPrivateUsage]
