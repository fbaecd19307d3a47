"""Pipeline step 2: the policy decides. Lists show only what the caller may use; a call to something the
caller may not see is answered as if it did not exist; a visible but refused call is ``policy_denied``.
A call the policy lets run only once a person approves it goes on to the approval step
(``approval.py``) when the pipeline has one, and is refused (``approval_required``) when it has none.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

from arbiter.auth.principal import Principal
from arbiter.errors import ApprovalRequired, PolicyDenied
from arbiter.naming import split_name, split_uri
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.live import LivePolicy
from arbiter.policies.rules import USE_ACTION
from arbiter.proxy.catalog import UNAVAILABLE_META
from arbiter.proxy.pipeline import COMPLETE, CallContext, CallNext, Result
from arbiter.proxy.targets import completed_method, not_found

# list method -> (result key, the field naming each item, whether it is a URI, the action that uses it)
_LISTS: dict[str, tuple[str, str, bool, str]] = {
    "tools/list": ("tools", "name", False, "call"),
    "prompts/list": ("prompts", "name", False, "get"),
    "resources/list": ("resources", "uri", True, "read"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", True, "read"),
}


class Authorize:
    def __init__(self, live: LivePolicy, *, approvals: bool = False) -> None:
        self._live = live
        self._approvals = approvals  # an approval step follows: it asks the user (else: refused)

    def tool_visible(self, principal: Principal, exposed: str) -> bool:
        """Whether ``principal`` may see the tool named ``exposed`` (``<upstream>__<tool>``)."""
        parts = split_name(exposed)
        obj = f"{parts[0]}/{parts[1]}" if parts is not None else None
        return obj is not None and self._live.engine.visible(Subject.of(principal), obj, "call")

    def may_use(self, principal: Principal, obj: str, action: str) -> bool | None:
        """Whether ``principal`` may ``action`` ``obj`` (``<upstream>/<target>``) with no arguments: None
        when it may not even see it (answered like a missing target), False when it sees it but is
        refused. Used outside the pipeline (notifications and subscriptions, proxy/notifications.py)."""
        engine = self._live.engine
        sub = Subject.of(principal)
        if not engine.visible(sub, obj, action):
            return None
        return engine.decide(sub, obj, action).allowed

    def identity(self, principal: Principal) -> Hashable:
        """The policy identity ``may_use``'s visibility answers depend on (with the policy version):
        principals with equal identities see the same items (list-change fan-out groups by it)."""
        return self._live.engine.visibility_identity(Subject.of(principal))

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        engine = self._live.engine  # one version decides the whole request
        ctx.policy_version = engine.version
        if ctx.principal is None:  # every /mcp request is authenticated first; anything else fails closed
            raise PolicyDenied("no authenticated caller", policy_version=engine.version)
        sub = Subject.of(ctx.principal)
        use = USE_ACTION.get(ctx.method)
        like = ctx.method
        if use is None and like == COMPLETE:  # decided as the get/read of the prompt or template it names
            like = completed_method(ctx.params)
            use = USE_ACTION[like]
        if use is not None:
            assert ctx.upstream is not None and ctx.target is not None and ctx.exposed is not None
            obj = f"{ctx.upstream}/{ctx.target}"
            # The pinned definition's annotations, for conditions on r.tool (a claim: they may narrow).
            found: Any = ctx.definition.get("annotations") if ctx.definition is not None else None
            annotations = cast(dict[str, Any], found) if isinstance(found, dict) else None
            decision = engine.decide(sub, obj, use, ctx.arguments, annotations)
            ctx.decision = decision  # the audit record tells auditors the truth
            if not engine.visible(sub, obj, use):
                raise not_found(like, ctx.exposed, hidden=True)
            if decision.needs_approval:
                if not self._approvals:
                    raise ApprovalRequired(f"{ctx.exposed} runs only once a person approves it")
                return await call_next(ctx)
            if not decision.allowed:
                raise PolicyDenied(
                    f"the policy does not allow you to {use} {ctx.exposed}", policy_version=engine.version
                )
            return await call_next(ctx)
        listing = _LISTS.get(ctx.method)
        result = await call_next(ctx)
        if listing is not None:
            _filter(result, listing, engine, sub)
            if ctx.unavailable:
                _narrow_unavailable(result, ctx.unavailable, engine, sub)
        return result


def _filter(result: Result, listing: tuple[str, str, bool, str], engine: PolicyEngine, sub: Subject) -> None:
    key, field, is_uri, use = listing
    items: Any = result.get(key)
    if not isinstance(items, list):
        return
    kept: list[Any] = []
    for item in items:  # pyright: ignore[reportUnknownVariableType]
        name: Any = item.get(field) if isinstance(item, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        parts = (split_uri(name) if is_uri else split_name(name)) if isinstance(name, str) else None
        if parts is not None and engine.visible(sub, f"{parts[0]}/{parts[1]}", use):
            kept.append(item)
    result[key] = kept


def _narrow_unavailable(
    result: Result, unavailable: Mapping[str, Sequence[str]], engine: PolicyEngine, sub: Subject
) -> None:
    """Name a down upstream only to a caller who could see one of its tools: the list must not reveal an
    upstream the caller has nothing to see on."""
    named = [
        upstream
        for upstream, tools in unavailable.items()
        if any(engine.visible(sub, f"{upstream}/{tool}", "call") for tool in tools)
    ]
    meta: Any = result.get("_meta")
    if not isinstance(meta, dict):
        return
    meta = cast(dict[str, Any], meta)
    if named:
        meta[UNAVAILABLE_META] = sorted(named)
        return
    meta.pop(UNAVAILABLE_META, None)
    if not meta:
        del result["_meta"]
