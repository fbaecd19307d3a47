"""``tools/call`` refusals the model can act on, as an ``isError`` tool result instead of a JSON-RPC error.

Agent frameworks hand an ``isError`` result to the model as a failed tool message, but a JSON-RPC error
ends the whole run. So a refusal the model can do something about (use another tool, wait, answer
without it) becomes a result holding a short sentence for the model, and the reason for machines in
``structuredContent`` and ``_meta["arbiter/error"]``. Everything else stays a JSON-RPC error: a tool the
caller may not see (it must answer exactly like a missing one), malformed requests, a duplicate request
(a client's retry, not the model's doing), internal errors, and the upstream's own JSON-RPC errors.

The sentence never holds the call's arguments or a credential: only the exposed tool name, the upstream's
name and a wait in seconds.
"""

from __future__ import annotations

import math
from typing import Any

from arbiter.errors import ArbiterError
from arbiter.proxy.pipeline import CallContext, Result

ERROR_META = "arbiter/error"

# reason -> how the model is told; "{tool}", "{upstream}" and "{wait}" are filled in.
_UNAVAILABLE = "{upstream} is unavailable right now; {wait} or answer without it"
_OUT = "{tool} cannot be used right now ({why}); {wait} or answer without it"
_SENTENCES: dict[str, str] = {
    "upstream_unavailable": _UNAVAILABLE,
    "upstream_timeout": "{upstream} did not answer in time; {wait} or answer without it",
    "upstream_auth_failed": _UNAVAILABLE,
    "upstream_protocol_error": "{upstream} sent an answer Arbiter could not read; "
    "{wait} or answer without it",
    "credential_unavailable": _UNAVAILABLE,
    "policy_denied": "you are not allowed to use {tool} (policy); do not retry it, answer without it",
    "token_exchange_refused": "you are not allowed to use {tool} (your sign-in was refused for it); "
    "answer without it",
    "caller_token_required": "{tool} needs a signed-in user's token, which this caller has not; "
    "answer without it",
    "rate_limited": "you are calling {tool} too often (rate limit); {wait} or answer without it",
    "budget_exceeded": "the budget for {tool} is used up for now (budget); answer without it",
    "repeated_call": "you have already made this exact call to {tool} several times (loop breaker); "
    "use the results you have instead of repeating it",
    "limits_unavailable": _OUT.replace("{why}", "limits unavailable"),
    "audit_unavailable": _OUT.replace("{why}", "audit log unavailable"),
    "input_unavailable": "{tool} needs input from the user that this client cannot ask for; "
    "answer without it",
    # Approval as a policy outcome (docs/policies.md): the user must say yes, and could not, or did not.
    "approval_required": "{tool} runs only once the user approves it, and this client cannot ask the user "
    "(it declared no form elicitation); use a client that can, or answer without it",
    "approval_declined": "this call to {tool} was not approved; do not retry it unless the user asks you to",
    "approval_queue_full": "{tool} needs an approver's approval, and you already have the most approval "
    "requests waiting; wait until they are decided, or answer without it",
    "approval_pending": "{tool} needs an approver's approval for this call: approval {approval} was "
    "requested; tell the user, and retry exactly the same call later (it runs once approved)",
    # Pinned definitions (docs/integrity.md): structuredContent's status says pending, quarantined, ...
    "tool_quarantined": "{tool} cannot be used right now (a security admin has not approved its definition); "
    "answer without it",
    # The guards (docs/integrity.md): structuredContent says which path and keyword, or which detector.
    "invalid_arguments": "the arguments for {tool} do not match its input schema (see the errors in "
    "structuredContent); correct them and call it again",
    "sensitive_argument": "the arguments for {tool} contain a secret or credential, which Arbiter does "
    "not forward; call it again without it, or answer without it",
    "invalid_tool_schema": "{tool} cannot be used right now (its schema cannot be checked); "
    "answer without it",
    "result_too_large": "the result of {tool} is too large to pass on; ask for less (a narrower request) "
    "or answer without it",
    "invalid_result": "{tool} answered with a result that does not match its output schema; "
    "answer without it",
}
# The reasons converted to a result: documented in docs/resilience.md ("Answers agents can act on").
RESULT_REASONS = frozenset(_SENTENCES)


def as_tool_result(exc: ArbiterError, call: CallContext) -> Result | None:
    """The ``isError`` result for ``exc`` on a ``tools/call``, or None if it stays a JSON-RPC error."""
    template = _SENTENCES.get(exc.code)
    if template is None:
        return None
    details: dict[str, Any] = {"reason": exc.code, "message": exc.message, **exc.details}
    upstream = details.get("upstream") or call.upstream or "the tool's server"
    text = template.format(
        tool=call.exposed or "this tool",
        upstream=upstream,
        wait=_wait(details),
        approval=details.get("approval_id", ""),
    )
    return {
        "content": [{"type": "text", "text": text}],
        "isError": True,
        "structuredContent": details,
        "_meta": {ERROR_META: dict(details)},
    }


def _wait(details: dict[str, Any]) -> str:
    after: Any = details.get("retry_after_s")
    if isinstance(after, int | float) and not isinstance(after, bool) and after > 0:
        return f"try again in {max(math.ceil(after), 1)} s"
    return "try again later"
