"""One audit record: what the request path hands over (``Event``), what is stored (the rendered body),
and the canonical form whose SHA-256 chains each record to the one before it.

The request path only builds an ``Event`` (references, no copying or hashing); redaction, the HMAC of
the arguments and the tool-definition hash are computed by the writer, off the request's latency,
before anything is queued for the store or written to disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal, cast

import uuid_utils

from arbiter.audit.redact import Redactor
from arbiter.auth.principal import Principal
from arbiter.settings import RedactSettings

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FORMAT_VERSION = 1

Kind = Literal["mcp", "auth", "admin", "audit", "integrity"]
Decision = Literal["allow", "deny", "error"]
# Columns copied out of the body so auditors' filters can use indexes; verify checks they agree.
INDEXED = (
    "ts_ms",
    "kind",
    "subject",
    "tenant",
    "method",
    "tool",
    "upstream",
    "decision",
    "reason",
    "trace_id",
)


# ``json.dumps`` with these options builds an encoder per call; one shared (stateless) encoder is the
# same serialisation without that cost, which the writer pays once per stored record.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, UTF-8 as is."""
    return _CANONICAL.encode(value)


def record_hash(body_text: str) -> str:
    return hashlib.sha256(body_text.encode("utf-8")).hexdigest()


def uuid7(ms: int | None = None) -> str:
    """An RFC 9562 version 7 UUID: 48-bit Unix milliseconds (exactly ``ms``, the record's ``ts_ms``),
    then random bits (time-ordered ids). Python 3.11 has no ``uuid.uuid7``; uuid-utils makes them."""
    ms = time.time_ns() // 1_000_000 if ms is None else ms & 0xFFFF_FFFF_FFFF
    return str(uuid_utils.uuid7(ms // 1000, ms % 1000 * 1_000_000))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@lru_cache(maxsize=4096)  # per principal: the same caller makes many calls
def _actor(principal: Principal) -> tuple[tuple[str, Any], ...]:
    return (
        ("subject", principal.subject),
        ("issuer", principal.issuer),
        ("tenant", principal.tenant),
        ("client_id", principal.client_id),
        ("api_key_id", principal.api_key_id),
        ("auth_method", principal.auth_method),
        ("roles", sorted(principal.roles)),
    )


def actor_of(principal: Principal | None, source_ip: str | None) -> dict[str, Any]:
    """Who acted, never with their credential: identity claims, key id (not the key) and source IP."""
    actor: dict[str, Any] = dict(_actor(principal)) if principal is not None else {}
    actor["source_ip"] = source_ip
    return actor


@dataclass(slots=True)
class Event:
    """What happened, as the request path saw it; rendered into a stored record by the writer.

    ``arguments`` are the caller's original arguments and are never stored as such: the writer keeps
    a redacted copy, an HMAC and their size. ``admin`` holds an admin change's before/after (already
    without secrets; redacted again on the way in, as free-form data).
    """

    kind: Kind
    decision: Decision
    reason: str
    actor: dict[str, Any]
    ts_ms: int = field(default_factory=now_ms)
    id: str = ""
    method: str | None = None
    tool: str | None = None  # the exposed name (or URI) the agent used; for admin events, the target
    upstream: str | None = None
    target: str | None = None  # the upstream's own name or URI
    definition: Mapping[str, Any] | None = None
    policy: Mapping[str, Any] | None = None  # {decision, reason, rule, version}
    policy_version: int | None = None
    outcome: dict[str, Any] = field(default_factory=dict[str, Any])
    latency_ms: float | None = None
    cost: float | None = None
    trace_id: str | None = None
    request_id: str | int | None = None
    protocol_version: str | None = None
    client_info: Mapping[str, Any] | None = None
    arguments: Mapping[str, Any] | None = None
    admin: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.id:
            self.id = uuid7(self.ts_ms)


# Rendering a record (redaction, an HMAC, a few dicts) costs about 15 µs for small arguments, less than
# handing it to a worker thread and back; above this many characters of arguments and messages in a
# batch, the worker thread does it, off the event loop (see ``light``).
LIGHT_CHARS = 4096


def light(events: Sequence[Event], budget: int = LIGHT_CHARS) -> bool:
    """Whether ``events`` are cheap enough to render on the event loop: no admin change, and at most
    ``budget`` characters of arguments and messages in all. Stops counting as soon as it is over."""
    left = budget
    stack: list[Any] = []
    for event in events:
        if event.admin is not None:
            return False
        # Everything the renderer redacts: the arguments, the message, and what the client says it is.
        # (A definition is hashed once per catalog entry, whatever its size, and is not counted.)
        stack.append(event.outcome.get("message"))
        if event.arguments is not None:
            stack.append(event.arguments)
        if event.client_info is not None:
            stack.append(event.client_info)
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                left -= len(node)
            elif isinstance(node, Mapping):
                items = cast(Mapping[Any, Any], node)
                left -= 2 * len(items)
                if left < 0:  # before walking a huge mapping's keys
                    return False
                for key, value in items.items():
                    if isinstance(key, str):
                        left -= len(key)
                    stack.append(value)
            elif isinstance(node, list | tuple):
                seq = cast(Sequence[Any], node)
                left -= len(seq)
                if left < 0:
                    return False
                stack.extend(seq)
            elif node is not None:
                left -= 8
            if left < 0:
                return False
    return True


class Renderer:
    """Turns events into the records that are stored: redacted, with an HMAC of the arguments."""

    def __init__(self, redactor: Redactor, hmac_key: bytes, admin_redactor: Redactor | None = None) -> None:
        self._redactor = redactor
        # Admin changes name people and rules (e.g. user:jane@example.com): only credentials come out.
        self._admin_redactor = admin_redactor or redactor
        self._hmac_key = hmac_key
        self._def_hashes: dict[int, tuple[Mapping[str, Any], str]] = {}

    def render(self, event: Event) -> dict[str, Any]:
        args_hmac: str | None = None
        args_bytes: int | None = None
        redacted: Any = None
        redactions = 0
        truncated = False
        if event.arguments is not None:
            original = canonical(event.arguments).encode("utf-8")
            args_bytes = len(original)
            args_hmac = hmac.new(self._hmac_key, original, hashlib.sha256).hexdigest()
            result = self._redactor.arguments(event.arguments)
            redacted, redactions, truncated = result.value, result.redactions, result.truncated
        outcome = dict(event.outcome)
        message = outcome.get("message")
        if isinstance(message, str):
            outcome["message"] = self._redactor.text(message)
        admin: Any = None
        if event.admin is not None:
            admin = self._admin_redactor.arguments(event.admin).value
        client_info: dict[str, Any] | None = None
        if event.client_info is not None:
            info = self._redactor.arguments(
                {k: event.client_info.get(k) for k in ("name", "version", "title")}
            ).value
            client_info = {**info, "untrusted": True}  # reported by the client; nothing vouches for it
        actor = event.actor
        return {
            "v": FORMAT_VERSION,
            "id": event.id,
            "ts": iso_ms(event.ts_ms),
            "ts_ms": event.ts_ms,
            "kind": event.kind,
            "actor": actor,
            "subject": actor.get("subject"),
            "tenant": actor.get("tenant"),
            "client_info": client_info,
            "method": event.method,
            "tool": _cap(event.tool, 1100),
            "upstream": event.upstream,
            "target": _cap(event.target, 2048),
            "tool_hash": self._definition_hash(event.definition),
            "decision": event.decision,
            "reason": event.reason,
            "policy": dict(event.policy) if event.policy is not None else None,
            "policy_version": event.policy_version,
            "outcome": outcome,
            "latency_ms": event.latency_ms,
            "cost": event.cost,
            "trace_id": event.trace_id,
            "request_id": _cap(event.request_id, 200)
            if isinstance(event.request_id, str)
            else event.request_id,
            "protocol_version": event.protocol_version,
            "args": redacted,
            "args_hmac": args_hmac,
            "args_bytes": args_bytes,
            "args_redactions": redactions,
            "args_truncated": truncated,
            "admin": admin,
        }

    def _definition_hash(self, definition: Mapping[str, Any] | None) -> str | None:
        if definition is None:
            return None
        # Catalog entries are immutable and shared: hash each one once (keyed by identity, kept alive).
        cached = self._def_hashes.get(id(definition))
        if cached is not None and cached[0] is definition:
            return cached[1]
        digest = hashlib.sha256(canonical(definition).encode("utf-8")).hexdigest()
        if len(self._def_hashes) > 10_000:
            self._def_hashes.clear()
        self._def_hashes[id(definition)] = (definition, digest)
        return digest


# Admin changes keep these readable (a rule naming user:jane@example.com must say so); credentials never.
_PERSONAL_DATA_DETECTORS = frozenset({"email", "ssn", "card", "iban"})


def renderer_for(settings: RedactSettings, hmac_key: bytes) -> Renderer:
    """The renderer Arbiter uses: ``settings`` for arguments and messages, its credential detectors
    alone for admin changes."""
    credentials_only = [d for d in settings.detectors if d not in _PERSONAL_DATA_DETECTORS]
    admin = Redactor(settings.model_copy(update={"detectors": credentials_only}))
    return Renderer(Redactor(settings), hmac_key, admin)


def seal(body: dict[str, Any], seq: int, prev_hash: str) -> tuple[str, str]:
    """Place a rendered record in the chain: returns its canonical text and hash."""
    body["seq"] = seq
    body["prev_hash"] = prev_hash
    text = canonical(body)
    return text, record_hash(text)


def scrub(value: Any) -> Any:
    """``value`` with every lone UTF-16 surrogate in its strings (which no UTF-8 text can hold, but
    Python's JSON decoder lets through from ``"\\ud800"``) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    if isinstance(value, list):
        return [scrub(v) for v in value]  # pyright: ignore[reportUnknownVariableType]
    return value


# A sealed row: the audit_events columns in this order (see seal_rows).
ROW_COLUMNS = ("seq", "id", *INDEXED, "body", "prev_hash", "hash")
Row = tuple[Any, ...]


def seal_rows(bodies: Iterable[dict[str, Any]], seq: int, prev_hash: str) -> tuple[list[Row], int, str]:
    """Number and link a batch of rendered records after the chain head ``(seq, prev_hash)``.

    Returns the rows to insert (values in ``ROW_COLUMNS`` order) and the new head's seq and hash."""
    rows: list[Row] = []
    for body in bodies:
        seq += 1
        try:
            text, digest = seal(body, seq, prev_hash)
        except UnicodeEncodeError:
            body = scrub(body)  # a lone surrogate from a client: stored as U+FFFD, never lost
            text, digest = seal(body, seq, prev_hash)
        rows.append((seq, body["id"], *_indexed(body), text, prev_hash, digest))
        prev_hash = digest
    return rows, seq, prev_hash


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SIZES = {"subject": 300, "tenant": 200, "tool": 1100, "upstream": 64, "method": 64, "reason": 64}
_INDEXED_SIZES = tuple((name, _SIZES.get(name)) for name in INDEXED)


def _indexed(body: Mapping[str, Any]) -> Row:
    values: list[Any] = []
    for name, size in _INDEXED_SIZES:
        value = body.get(name)
        # Most values are short and printable (which excludes every control character): kept as is.
        if size is not None and isinstance(value, str) and (len(value) > size or not value.isprintable()):
            value = _CONTROL.sub("?", value[:size])
        values.append(value)
    return tuple(values)


def columns(body: Mapping[str, Any]) -> dict[str, Any]:
    """The indexed columns of a record: control characters replaced (PostgreSQL refuses NUL in text,
    and a caller chooses the tool name), cut to their column sizes. The body keeps the exact value."""
    return dict(zip(INDEXED, _indexed(body), strict=True))


def _cap(value: str | None, size: int) -> str | None:
    # Names and ids come from the caller: bounded, so a queued record's size is too.
    return value if value is None or len(value) <= size else value[:size] + f"…[+{len(value) - size} chars]"


def render_all(render: Callable[[Event], dict[str, Any]], events: list[Event]) -> list[dict[str, Any]]:
    """Every event rendered; one whose rendering fails is stored without its arguments, never lost."""
    return [_render_one(render, event) for event in events]


def _render_one(render: Callable[[Event], dict[str, Any]], event: Event) -> dict[str, Any]:
    try:
        return render(event)
    except Exception as exc:  # noqa: BLE001 - a record is never dropped for a rendering bug
        # The exception's text could quote an argument: log its type only, and store the record
        # without its arguments or admin details rather than lose it.
        log.error(
            "audit: rendering record %s failed (%s); stored without arguments", event.id, type(exc).__name__
        )
        safe = Event(
            kind=event.kind,
            decision=event.decision,
            reason=event.reason,
            actor=event.actor,
            ts_ms=event.ts_ms,
            id=event.id,
            method=event.method,
            upstream=event.upstream,
            policy_version=event.policy_version,
            outcome={"status": event.outcome.get("status"), "render_error": type(exc).__name__},
            latency_ms=event.latency_ms,
            cost=event.cost,
            request_id=event.request_id if isinstance(event.request_id, int) else None,
        )
        return render(safe)
