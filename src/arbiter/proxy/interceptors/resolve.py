"""Pipeline step 1: find the upstream and target a request addresses, from the JSON-RPC body only."""

from __future__ import annotations

from typing import Any, Literal, cast

from arbiter.errors import UnknownTarget
from arbiter.naming import split_name, split_uri
from arbiter.proxy.catalog import Catalog
from arbiter.proxy.pipeline import COMPLETE, TARGET_KEYS, CallContext, CallNext, Result
from arbiter.proxy.resource_uri import normalise, template_matches
from arbiter.proxy.targets import completed_method, not_found


class Resolve:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        key = TARGET_KEYS.get(ctx.method)
        if key is not None:
            value = ctx.params.get(key)
            if not isinstance(value, str) or not value:
                raise UnknownTarget(f"params.{key} must be a non-empty string")
            ctx.exposed = value
            if ctx.method == "tools/call":
                self._named(ctx, value, "tool")
            elif ctx.method == "prompts/get":
                self._named(ctx, value, "prompt")
            else:
                self._resource(ctx, value)
        elif ctx.method == COMPLETE:
            self._completion(ctx)
        return await call_next(ctx)

    def _completion(self, ctx: CallContext) -> None:
        # The prompt or resource template whose argument is completed: found, and hidden, as prompts/get
        # and resources/read find and hide theirs.
        ref: Any = ctx.params.get("ref")
        ref = cast(dict[str, Any], ref) if isinstance(ref, dict) else {}
        like = completed_method(ctx.params)
        value: Any = ref.get("name" if like == "prompts/get" else "uri")
        if not isinstance(value, str) or not value:
            raise UnknownTarget("params.ref must name a prompt or a resource template")
        ctx.exposed = value
        if like == "prompts/get":
            self._named(ctx, value, "prompt")
        else:
            parts = split_uri(value)
            snap = self._catalog.get(parts[0]) if parts is not None else None
            if parts is None or snap is None:
                raise not_found(like, value)
            ctx.upstream, ctx.target = parts
            ctx.definition = snap.resource_templates.get(parts[1])
            if ctx.definition is None:
                ctx.held = snap.held.get(("resource_template", parts[1]))
                if ctx.held is None:
                    raise not_found(like, value)
        # The policy judges the arguments already chosen, as it judges them on prompts/get.
        context: Any = ctx.params.get("context")
        args: Any = cast(dict[str, Any], context).get("arguments") if isinstance(context, dict) else None
        ctx.arguments = cast(dict[str, Any], args) if isinstance(args, dict) else {}

    def _named(self, ctx: CallContext, exposed: str, kind: Literal["tool", "prompt"]) -> None:
        parts = split_name(exposed)
        snap = self._catalog.get(parts[0]) if parts else None
        entries = (snap.tools if kind == "tool" else snap.prompts) if snap else {}
        definition = entries.get(parts[1]) if parts else None
        if parts is None or snap is None:
            raise not_found(ctx.method, exposed)
        if definition is None:
            # Offered but not approved: found (so authorize decides who may even learn that), refused later.
            ctx.held = snap.held.get((kind, parts[1]))
            if ctx.held is None:
                raise not_found(ctx.method, exposed)
        ctx.upstream, ctx.target, ctx.definition = parts[0], parts[1], definition
        args: Any = ctx.params.get("arguments")
        ctx.arguments = args if isinstance(args, dict) else {}

    def _resource(self, ctx: CallContext, exposed: str) -> None:
        parts = split_uri(exposed)
        if parts is None:
            raise not_found(ctx.method, exposed)
        # Before the catalog is consulted, so a refusal depends on the URI alone and reveals nothing.
        target = normalise(parts[1])
        snap = self._catalog.get(parts[0])
        if snap is None:
            raise not_found(ctx.method, exposed)
        if parts[1] in snap.resources:
            # The upstream's own spelling of a resource it lists: the list filter judged this exact
            # string, and an upstream may look its resources up by exact match.
            target = parts[1]
        # A URI outside the static list may still match one of the upstream's templates; the upstream
        # decides, since template matching is its business. But one only a template waiting for review
        # (or rejected, disabled) makes is held as that template is (docs/integrity.md).
        if target not in snap.resources:
            if not any(template_matches(t, target) for t in snap.resource_templates):
                ctx.held = next(
                    (
                        status
                        for (kind, name), status in snap.held.items()
                        if kind == "resource_template" and template_matches(name, target)
                    ),
                    None,
                )
            if ctx.held is None and not snap.resource_templates:
                raise not_found(ctx.method, exposed)
        # Authorize matches, and forward sends, the normal form: what was allowed is what is read.
        ctx.upstream, ctx.target = parts[0], target
        ctx.definition = snap.resources.get(target)
