"""Pipeline step (after authorize and integrity, before input rounds): a call the policy lets run only once
a person approves it (an ``approve`` rule, docs/policies.md) waits for the end user's yes.

The user is the person at the agent's client, asked through MCP itself with a form elicitation that shows
what would run: the tool, its upstream and the arguments as the audit log's redaction rules let them be
shown (a secret in them is never put in front of the user, nor back on the wire).

- A 2026-07-28 agent gets ``resultType: "input_required"``: the question, and a ``requestState`` sealed
  (``RequestStateSeal``, ``kind="approval"``) to the caller, upstream, tool, a digest of the arguments
  and an expiry (``mcp.request_state_ttl_s``), carrying the policy version that asked. Its retry with the
  user's answer is checked before anything runs: a state for another caller, tool or arguments, expired,
  altered, minted under another policy version, or presented a second time (on any replica:
  ``approval_uses.py``) is ``invalid_request_state``; an acceptance runs the call once, a decline or a
  cancel ends it (``approval_declined``).
- A handshake-era agent is asked during the call, over its own session (``elicitation/create`` through the
  call's downstream channel), for at most ``answer_timeout_s``.
- An agent that declared no form elicitation cannot be asked: ``approval_required``, a tool error result
  saying so; unless the rule names approvers too (``approve by user or role:...``).
- A rule that names approvers (``approve by role:billing-lead``, ``policies/approvers.py``), when the user
  is not to be (or cannot be) asked: the call is recorded as a pending request (``approval_requests.py``)
  and refused at once (``approval_pending``, with the request's id). An approver decides it
  (``approval_desk.py``: the admin API, the CLI, the console); the retry of the same call (same caller,
  upstream, tool, argument digest and rule) after an approval claims it and runs, once; a later step's
  refusal before the upstream saw the call gives the approval back. After a denial the retry is
  ``approval_declined`` until the denial lapses. A caller with ``approvals.max_pending_per_caller``
  requests waiting gets ``approval_queue_full``.

Once approved, the rounds an upstream itself asks for (``input_required`` with its own state) continue
without asking again: this step re-seals each such state (``kind="approved"``) with the policy version
and an id of its own, and takes it back once, like its own (``approval_uses.py``). An upstream state that
was not re-sealed so (issued while the call ran unattended, before an approve rule) is no approval, and
a replayed one would run the call a second time: both are ``invalid_request_state``.

The audit record's ``outcome.approval`` says how the user was asked and what they answered (``accepted``,
``declined``, ``cancelled``, ``unavailable``, ``timeout``; ``earlier`` on an upstream's own round after
it) or why a state was refused; never what the form held.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, cast

import anyio
from mcp_types import CLIENT_CAPABILITIES_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from arbiter.audit.redact import Redactor
from arbiter.errors import ApprovalDeclined, ApprovalPending, ApprovalRequired, InvalidRequestState
from arbiter.integrity.arguments import ArgumentGuard
from arbiter.policies.approvers import ApprovalSpec, parse
from arbiter.policies.engine import Decision
from arbiter.proxy.approval_requests import ApprovalRequest, ApprovalRequests, CallFacts
from arbiter.proxy.approval_uses import ApprovalUses
from arbiter.proxy.pipeline import CallContext, CallNext, Result
from arbiter.proxy.request_state import RequestStateSeal, Round, StateRefused, call_key

log = logging.getLogger(__name__)

APPROVAL = "approval"  # the state's kind, and what the audit record calls the step
APPROVED = "approved"  # the kind of an upstream's own round of a call the user approved (re-sealed here)
ANSWER_KEY = "arbiter_approval"  # the inputRequests key the user's answer comes back under
_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approve": {"type": "boolean", "title": "Run this call once", "default": True},
    },
}
_USE_MARGIN_S = 60.0  # a used id is kept this long past its state's expiry, whatever the clocks' skew
_ANSWERS = {"accept": "accepted", "decline": "declined", "cancel": "cancelled"}


class Approval:
    def __init__(
        self,
        seal: RequestStateSeal,
        uses: ApprovalUses,
        redactor: Redactor,
        *,
        ttl_s: float,
        answer_timeout_s: float = 600.0,
        requests: ApprovalRequests | None = None,
        approver_valid_s: int = 3600,
        on_request: Callable[[ApprovalRequest], None] = lambda _: None,
        guard: ArgumentGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._seal = seal
        self._requests = requests  # None: no approver flow (approve by role:... asks nobody)
        self._approver_valid_s = approver_valid_s  # approvals.valid_s, unless the rule says
        self._on_request = on_request  # a new pending request: the webhook's cue
        self._guard = guard  # the argument guard's verdict before a request is opened (_refuse_early)
        self._uses = uses
        self._redactor = redactor
        self._ttl_s = ttl_s  # the seal's: how long an approval round may wait for the retry
        self._answer_timeout_s = answer_timeout_s  # handshake era: how long the user may take
        self._clock = clock

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        decision = ctx.decision
        if ctx.method != "tools/call" or decision is None or not decision.needs_approval:
            return await call_next(ctx)
        ctx.approval = {"requested": True}
        spec = _spec(decision)
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern and ctx.params.get("requestState") is not None:
            return await self._retry(ctx, spec, call_next)
        if spec.by_user and self._can_ask(ctx, modern):
            if modern:
                return self._input_required(ctx, spec)
            await self._ask_session(ctx)
            return await call_next(ctx)
        if spec.subjects and self._requests is not None:
            return await self._by_approver(ctx, spec, call_next)
        _note(ctx, answer="unavailable")
        raise ApprovalRequired(
            f"{ctx.exposed} runs only once the user approves it, and this client declared no form "
            "elicitation to ask the user with"
        )

    async def _by_approver(self, ctx: CallContext, spec: ApprovalSpec, call_next: CallNext) -> Result:
        """An approver decides (``approval_requests.py``): the first call is recorded as pending and
        answered at once; the retry of the same call after an approval runs it, once."""
        assert self._requests is not None and ctx.decision is not None and ctx.decision.rule is not None
        rule = ctx.decision.rule.csv()
        key = call_key(_round(ctx), rule)
        found = await self._requests.current(key)
        if found is not None and found.status == "approved":
            claimed = await self._requests.claim(found.id)
            if claimed is not None:
                _note(ctx, via="approver", id=found.id, answer="approved", decided_by=found.decided_by)
                return await self._run_claimed(ctx, call_next, found.id, claimed)
            found = await self._requests.current(key)  # another retry spent it just now
        if found is not None and found.status == "denied":
            _note(ctx, via="approver", id=found.id, answer="denied", decided_by=found.decided_by)
            raise ApprovalDeclined(
                f"the call to {ctx.exposed} was denied by {found.decided_by} (approval {found.id})",
                approval_id=found.id,
            )
        if found is None or found.status != "pending":
            assert ctx.principal is not None and ctx.upstream is not None and ctx.target is not None
            self._refuse_early(ctx)
            facts = CallFacts(
                key=key,
                caller=ctx.principal.key,
                subject=ctx.principal.subject,
                tenant=ctx.principal.tenant or "",
                tool=ctx.exposed or ctx.target,
                upstream=ctx.upstream,
                target=ctx.target,
                arguments=self._redactor.arguments(ctx.arguments or {}).value,
                rule=rule,
                approvers=spec.subjects,
                valid_s=spec.valid_s or self._approver_valid_s,
                trace_id=ctx.trace_id,
            )
            found = await self._requests.open(facts)
            self._on_request(found)
            _note(ctx, via="approver", id=found.id, status="requested")
        else:
            _note(ctx, via="approver", id=found.id, status="pending")
        raise ApprovalPending(
            f"{ctx.exposed} runs only once {' or '.join(spec.subjects)} approves it: approval {found.id} "
            "is pending; retry the same call once it is approved",
            approval_id=found.id,
            approvers=list(spec.subjects),
            expires_s=found.expires_s,
        )

    def _refuse_early(self, ctx: CallContext) -> None:
        """A call the argument guard would refuse (a deny finding, a schema violation) is refused now, not
        put before an approver: it could never run, and the request must not hold what a deny rule found
        (as the guard step does, ``ctx.arguments`` becomes the guard's redacted copy for the audit record)."""
        if self._guard is None:
            return
        assert ctx.exposed is not None and ctx.principal is not None
        schema: Any = (ctx.definition or {}).get("inputSchema")
        shape = cast(dict[str, Any], schema) if isinstance(schema, dict) else None
        checked = self._guard.check(ctx.exposed, ctx.principal.roles, ctx.arguments or {}, shape)
        if checked.refusal is not None:
            ctx.guard = {**(ctx.guard or {}), "arguments": checked.found}
            ctx.arguments = checked.arguments
            raise checked.refusal

    async def _run_claimed(
        self, ctx: CallContext, call_next: CallNext, request_id: str, claimed: float
    ) -> Result:
        """Run a call an approver approved; if a later step refuses it before it reaches the upstream (a
        rate limit, a budget, the argument guard, a cancel), the approval is given back: it did not run."""
        assert self._requests is not None
        try:
            return await self._run(ctx, call_next)
        except BaseException:
            if not ctx.sent:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._requests.release(request_id, claimed)
                        _note(ctx, released=True)
                    except Exception:  # noqa: BLE001 - the call's own refusal is what the agent must see
                        log.warning("approval %s: could not be given back after a refusal", request_id)
            raise

    def _input_required(self, ctx: CallContext, spec: ApprovalSpec) -> Result:
        """The first round for a 2026-07-28 agent: the question, and the state its retry must carry."""
        expires = self._clock() + min(self._ttl_s, spec.valid_s or self._ttl_s)
        inner = json.dumps({"id": secrets.token_urlsafe(18), "pv": ctx.policy_version, "exp": expires})
        state = self._seal.seal(_round(ctx), inner, kind=APPROVAL)
        _note(ctx, via="input_required")
        ask = {"method": "elicitation/create", "params": self._form(ctx)}
        return {"resultType": "input_required", "inputRequests": {ANSWER_KEY: ask}, "requestState": state}

    async def _retry(self, ctx: CallContext, spec: ApprovalSpec, call_next: CallNext) -> Result:
        _note(ctx, via="input_required")
        try:
            opened = self._seal.open(_round(ctx), ctx.params.get("requestState"))
        except StateRefused as exc:
            _refuse(ctx, str(exc))
        if opened.kind not in (APPROVAL, APPROVED):  # an upstream's state this step never approved
            _refuse(ctx, "kind")
        if opened.kind == APPROVAL and not spec.by_user:  # the rule that decides now asks only approvers
            _refuse(ctx, "approver")
        inner: Any = json.loads(opened.state)  # sealed by this step: well formed
        if inner.get("pv") != ctx.policy_version:  # the policy changed since the user was asked
            _refuse(ctx, "policy_version")
        if not await self._uses.claim(str(inner["id"]), float(inner["exp"]) + _USE_MARGIN_S):
            _refuse(ctx, "used")
        if opened.kind == APPROVED:  # an upstream's own round of a call the user approved (see above)
            _note(ctx, answer="earlier")
            upstream_state = self._seal.seal(_round(ctx), str(inner["s"]), via=str(inner["v"]))
            ctx.params = {**ctx.params, "requestState": upstream_state}  # for the input rounds step
            return await self._run(ctx, call_next)
        responses: Any = ctx.params.get("inputResponses")
        answer: Any = cast(dict[str, Any], responses).get(ANSWER_KEY) if isinstance(responses, dict) else None
        _decide(ctx, answer)
        # The approval is spent: what goes on is the call itself, without Arbiter's round.
        ctx.params = {k: v for k, v in ctx.params.items() if k not in ("requestState", "inputResponses")}
        return await self._run(ctx, call_next)

    async def _run(self, ctx: CallContext, call_next: CallNext) -> Result:
        """Run the approved call; an upstream's round that follows gets its state re-sealed as approved
        (single use, this policy version), so that neither a replay nor an older state skips the user."""
        result = await call_next(ctx)
        state: Any = result.get("requestState")
        if result.get("resultType") != "input_required" or not isinstance(state, str):
            return result
        opened = self._seal.open(_round(ctx), state)  # sealed by the input rounds step, just now
        inner = {
            "id": secrets.token_urlsafe(18),
            "pv": ctx.policy_version,
            "exp": self._clock() + self._ttl_s,
            "s": opened.state,
            "v": opened.via,
        }
        result["requestState"] = self._seal.seal(_round(ctx), json.dumps(inner), kind=APPROVED)
        return result

    async def _ask_session(self, ctx: CallContext) -> None:
        """A handshake-era agent: asked during the call, on its own session."""
        _note(ctx, via="elicitation")
        assert ctx.downstream is not None  # checked by _can_ask
        message = {
            "jsonrpc": "2.0",
            "id": f"arbiter-approval-{secrets.token_hex(4)}",
            "method": "elicitation/create",
            "params": self._form(ctx),
        }
        try:
            with anyio.fail_after(self._answer_timeout_s):
                reply = await ctx.downstream.message(message)
        except TimeoutError:
            _note(ctx, answer="timeout")
            raise ApprovalDeclined(
                f"{ctx.exposed} needs the user's approval, which did not come within "
                f"{self._answer_timeout_s:g} s"
            ) from None
        answer: Any = reply.get("result") if reply is not None else None
        if not isinstance(answer, dict):  # the client refused the question (e.g. relaying turned off)
            _note(ctx, answer="unavailable")
            raise ApprovalRequired(
                f"{ctx.exposed} runs only once the user approves it, and the user could not be asked"
            )
        _decide(ctx, answer)

    def _can_ask(self, ctx: CallContext, modern: bool) -> bool:
        """Can the end user be asked? The agent declared form elicitation, and (handshake era) the call
        has the agent's session to ask on."""
        caps = _capabilities(ctx) if modern else ctx.client_capabilities or {}
        elicitation: Any = caps.get("elicitation")
        can = isinstance(elicitation, dict) and (
            "form" in elicitation or not elicitation  # empty: form mode, as declared before modes existed
        )
        return can and (modern or ctx.downstream is not None)

    def _form(self, ctx: CallContext) -> dict[str, Any]:
        shown = self._redactor.arguments(ctx.arguments or {}).value
        args = json.dumps(shown, ensure_ascii=False, sort_keys=True, indent=2)
        message = (
            f"Approve this call? The agent wants to run the tool {ctx.exposed} "
            f"({ctx.target} on {ctx.upstream}) with these arguments:\n{args}"
        )
        return {"mode": "form", "message": message, "requestedSchema": _SCHEMA}


def _decide(ctx: CallContext, answer: Any) -> None:
    """Record the user's answer; only an acceptance whose ``approve`` is true (or left out: the form's
    default) lets the call run. Anything else in the form (false, 0, "no", not an object) is no yes."""
    action: Any = cast(dict[str, Any], answer).get("action") if isinstance(answer, dict) else None
    content: Any = cast(dict[str, Any], answer).get("content") if isinstance(answer, dict) else None
    said = _ANSWERS.get(action, "cancelled") if isinstance(action, str) else "cancelled"
    yes = content is None or (
        isinstance(content, dict) and cast(dict[str, Any], content).get("approve", True) is True
    )
    if said == "accepted" and not yes:
        said = "declined"
    _note(ctx, answer=said)
    if said != "accepted":
        raise ApprovalDeclined(f"the user {said} the call to {ctx.exposed}")


def _spec(decision: Decision) -> ApprovalSpec:
    """Who approves, as the deciding approve rule says (the end user when it says nothing)."""
    spec = parse(decision.rule.values[4]) if decision.rule is not None else None
    return spec if spec is not None else ApprovalSpec()


def _refuse(ctx: CallContext, why: str) -> NoReturn:
    _note(ctx, request_state=why)
    raise InvalidRequestState("Invalid or expired requestState")


def _note(ctx: CallContext, **facts: object) -> None:
    found: dict[str, object] = ctx.approval if ctx.approval is not None else {"requested": True}
    found.update(facts)
    ctx.approval = found


def _round(ctx: CallContext) -> Round:
    assert ctx.principal is not None and ctx.upstream is not None and ctx.target is not None
    return Round(ctx.principal, ctx.upstream, ctx.method, ctx.target, ctx.arguments)


def _capabilities(ctx: CallContext) -> Mapping[str, Any]:
    """What the agent declared on this request: the context's, else the 2026-07-28 ``_meta`` envelope."""
    if ctx.client_capabilities is not None:
        return ctx.client_capabilities
    meta: Any = ctx.params.get("_meta")
    caps: Any = cast(dict[str, Any], meta).get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, dict) else {}
    return cast(dict[str, Any], caps) if isinstance(caps, dict) else {}
