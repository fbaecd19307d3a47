"""Arbiter's error tree: each error has a stable code, mapped once to HTTP and to JSON-RPC.

JSON-RPC codes for governance errors sit outside the reserved -32768..-32000 range, as MCP asks of
application errors; ``data.reason`` carries the stable code for machines.
"""

from __future__ import annotations

from typing import ClassVar

from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS


class ArbiterError(Exception):
    """Base class: ``code`` is stable and machine-readable; ``message`` is for humans."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    jsonrpc_code: ClassVar[int] = -31000

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_mcp_error(self) -> MCPError:
        return MCPError(self.jsonrpc_code, self.message, {"reason": self.code, **self.details})

    def to_http_body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ConfigError(ArbiterError):
    code = "config_error"


class SchemaOutOfDate(ArbiterError):
    code = "schema_out_of_date"
    http_status = 503


class NotFound(ArbiterError):
    code = "not_found"
    http_status = 404


class Conflict(ArbiterError):
    code = "conflict"
    http_status = 409


class InvalidInput(ArbiterError):
    code = "invalid_input"
    http_status = 422


class Unauthorized(ArbiterError):
    code = "unauthorized"
    http_status = 401


class InvalidToken(Unauthorized):
    """A bearer credential that is missing, malformed, expired, forged or not for us.

    ``description`` goes into ``WWW-Authenticate: error_description`` and must never echo the token.
    """

    code = "invalid_token"


class InsufficientScope(ArbiterError):
    code = "insufficient_scope"
    http_status = 403


class Forbidden(ArbiterError):
    code = "forbidden"
    http_status = 403


class UpstreamUnavailable(ArbiterError):
    """The upstream could not be reached, timed out, or dropped the connection."""

    code = "upstream_unavailable"
    http_status = 502
    jsonrpc_code = -31002

    @classmethod
    def of(cls, upstream: str) -> UpstreamUnavailable:
        return cls(f"upstream {upstream!r} is unavailable", upstream=upstream)


class UpstreamTimeout(UpstreamUnavailable):
    """The call's deadline passed before the upstream answered (the upstream request is cancelled)."""

    code = "upstream_timeout"
    http_status = 504
    jsonrpc_code = -31010

    @classmethod
    def after(cls, upstream: str, deadline_s: float) -> UpstreamTimeout:
        return cls(
            f"upstream {upstream!r} did not answer within {deadline_s:g} s",
            upstream=upstream,
            deadline_s=deadline_s,
        )


class UpstreamProtocolError(ArbiterError):
    """The upstream answered with something that is not valid MCP."""

    code = "upstream_protocol_error"
    http_status = 502
    jsonrpc_code = -31003


class RequestRejected(ArbiterError):
    """An interceptor refused the request; subclasses name the reason (policy, limits, ...)."""

    code = "request_rejected"
    http_status = 403
    jsonrpc_code = -31001


class PolicyDenied(RequestRejected):
    """The policy does not allow this caller this call (no rule allows it, or a deny rule matched)."""

    code = "policy_denied"


class RateLimited(RequestRejected):
    """A rate limit rule refused the call; ``retry_after_s`` says when a token is back."""

    code = "rate_limited"
    http_status = 429
    jsonrpc_code = -31004


class BudgetExceeded(RequestRejected):
    """The call's cost would take a budget over its limit for the current period; nothing was forwarded."""

    code = "budget_exceeded"
    http_status = 402
    jsonrpc_code = -31006


class RepeatedCall(RequestRejected):
    """The loop breaker: the same caller made the same call with the same arguments too often."""

    code = "repeated_call"
    http_status = 429
    jsonrpc_code = -31007


class DuplicateRequest(RequestRejected):
    """The call's request key (idempotency key, or session + JSON-RPC id) belongs to a request that was
    already executed or is still running: it is not run or charged again."""

    code = "duplicate_request"
    http_status = 409
    jsonrpc_code = -31009


class LimitsUnavailable(RequestRejected):
    """The shared limits store (Redis) is unreachable and limits fail closed: the call is refused."""

    code = "limits_unavailable"
    http_status = 503
    jsonrpc_code = -31008


class AuditUnavailable(ArbiterError):
    """Records cannot be stored (or queued) right now, and the audit log fails closed: nothing runs
    unaudited."""

    code = "audit_unavailable"
    http_status = 503
    jsonrpc_code = -31005


class Overloaded(ArbiterError):
    """More requests are being answered than ``mcp.max_in_flight``: refused at once rather than queued."""

    code = "overloaded"
    http_status = 503
    jsonrpc_code = -31020


class ShuttingDown(ArbiterError):
    """This replica is stopping (SIGTERM): new requests are refused so they go to another one."""

    code = "shutting_down"
    http_status = 503
    jsonrpc_code = -31021


class AuditChainBroken(ArbiterError):
    """A purge was refused: the records it would remove do not verify, and a purge must never turn a
    tampered record into a signed anchor."""

    code = "audit_chain_broken"
    http_status = 409


class UnknownTarget(ArbiterError):
    """An unknown (or invisible) tool, prompt or resource: answered as an MCP server answers it."""

    code = "unknown_target"
    http_status = 404

    def __init__(self, message: str, jsonrpc_code: int = INVALID_PARAMS, *, hidden: bool = False) -> None:
        super().__init__(message)
        self._jsonrpc_code = jsonrpc_code
        # The target exists but the policy hides it from the caller: a denial, so the audit log and the
        # metrics record it as policy_denied; the caller's answer stays that of a missing target.
        self.audit_reason = "policy_denied" if hidden else self.code

    def to_mcp_error(self) -> MCPError:
        # Exactly what an MCP server says, with no Arbiter-specific data that would reveal a hidden tool.
        return MCPError(self._jsonrpc_code, self.message)


class AmbiguousResourceUri(RequestRejected):
    """A resource URI with no single normal form (an encoded or backslash-separated dot segment, a
    ``..`` above its start): refused before policy or upstream see it. It depends on the URI alone, so
    answering it as invalid params reveals nothing about what exists."""

    code = "ambiguous_resource_uri"
    http_status = 400
    jsonrpc_code = INVALID_PARAMS


class InvalidRequestState(RequestRejected):
    """A multi-round-trip retry's ``requestState`` is not one Arbiter minted for this caller, upstream,
    target and arguments, or it expired: refused as invalid params before the upstream sees it. The wire
    message is the same whatever failed (the audit record says which), so it is no oracle."""

    code = "invalid_request_state"
    http_status = 400
    jsonrpc_code = INVALID_PARAMS


class InputUnavailable(RequestRejected):
    """The upstream needs input (``input_required``) the calling client cannot give: it declared none of
    the kinds asked for, or it speaks the handshake era."""

    code = "input_unavailable"
    http_status = 422
    jsonrpc_code = -31030


class ApprovalRequired(RequestRejected):
    """The policy lets this call run only once the user approves it, and this client cannot be asked (it
    declared no form elicitation, or no answer came in time): refused, saying how to get it run."""

    code = "approval_required"
    jsonrpc_code = -31050


class ApprovalDeclined(RequestRejected):
    """The user was asked to approve this call and declined or cancelled: it does not run."""

    code = "approval_declined"
    jsonrpc_code = -31051


class ApprovalPending(RequestRejected):
    """The policy lets this call run only once an approver approves it: the request is recorded
    (``approval_id``) and the agent is told to retry the same call later, when it runs once."""

    code = "approval_pending"
    jsonrpc_code = -31052


class ApprovalQueueFull(RequestRejected):
    """The caller already has ``approvals.max_pending_per_caller`` approval requests waiting: no more are
    opened (each is a row, an audit record and a webhook notice) until some are decided or lapse."""

    code = "approval_queue_full"
    jsonrpc_code = -31053


class ToolQuarantined(RequestRejected):
    """The upstream offers this tool, prompt or resource template, but not a definition a security admin
    approved: new and pending review, changed since it was approved (quarantined), rejected, or disabled.
    Refused before anything is forwarded; ``status`` says which (docs/integrity.md)."""

    code = "tool_quarantined"
    jsonrpc_code = -31045


class InvalidArguments(RequestRejected):
    """A tool call's arguments do not validate against the tool's pinned input schema, or exceed the
    argument guard's depth or size caps; ``errors`` name the path and the failed keyword, never a value."""

    code = "invalid_arguments"
    http_status = 400
    jsonrpc_code = -31040


class SensitiveArgument(RequestRejected):
    """A deny rule of the argument guard found a secret (or other data it names) in the arguments;
    ``detectors`` and ``paths`` say which and where, never what."""

    code = "sensitive_argument"
    http_status = 403
    jsonrpc_code = -31041


class InvalidToolSchema(RequestRejected):
    """The tool's own input (or output) schema is not a valid JSON Schema, or refers to a document
    Arbiter will not fetch (a remote ``$ref``): the call is refused rather than forwarded unchecked."""

    code = "invalid_tool_schema"
    http_status = 502
    jsonrpc_code = -31042


class ResultTooLarge(RequestRejected):
    """The upstream's answer exceeds ``integrity.results.max_bytes``; Arbiter stopped reading it.
    ``partial`` (never on the wire) holds what was read, for truncation."""

    code = "result_too_large"
    http_status = 502
    jsonrpc_code = -31043

    def __init__(self, message: str, partial: bytes | bytearray = b"", **details: object) -> None:
        super().__init__(message, **details)
        self.partial = partial


class InvalidResult(RequestRejected):
    """The upstream's ``structuredContent`` does not validate against the tool's pinned output schema."""

    code = "invalid_result"
    http_status = 502
    jsonrpc_code = -31044


class SettingsInvalid(ConfigError):
    """``ARBITER_*`` variables or the config file name no setting, or give one a value it cannot take."""

    code = "settings_invalid"


class StartupFailed(ArbiterError):
    """Something Arbiter needs before it can serve is not there; the CLI says what in one line."""

    code = "startup_failed"
    http_status = 503


class DatabaseUnreachable(StartupFailed):
    code = "database_unreachable"


class PortInUse(StartupFailed):
    code = "port_in_use"


class RedisUnreachable(StartupFailed):
    code = "redis_unreachable"


class JwksUnreachable(StartupFailed):
    code = "jwks_unreachable"


class AdminApiRefused(ArbiterError):
    """The CLI's call to a running Arbiter's admin API was answered with an error; the message is
    the server's own (``error.code`` and ``message``), on one line."""

    code = "admin_api_refused"


class AdminApiUnreachable(ArbiterError):
    """The CLI could not reach the admin API (nothing listens at ``--url``, TLS, a timeout)."""

    code = "admin_api_unreachable"


class LoginRefused(Unauthorized):
    """A console login through an identity provider did not complete: its answer was refused, or its ID
    token (the message says why, never with a claim's value)."""

    code = "login_refused"


class BadLoginCallback(LoginRefused):
    """The browser came back to the console's OpenID Connect callback with no login of ours to finish
    (no or a stale pending login, a wrong state, no code)."""

    code = "bad_login_callback"
    http_status = 400


class IdentityProviderUnavailable(ArbiterError):
    """The identity provider's discovery document or token endpoint could not be had."""

    code = "identity_provider_unavailable"
    http_status = 502
