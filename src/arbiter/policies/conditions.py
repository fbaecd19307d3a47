"""How a rule's condition sees a request: ``r.args`` (the call's arguments, a missing one ``MISSING``),
``r.sub`` (the caller) and ``r.tool`` (the tool's pinned annotations), evaluated by simpleeval.

A condition that cannot be evaluated (a string compared with a number, a non-finite number) fails
closed: deny and approve rules match, allow rules do not. docs/policies.md describes the language.
"""

from __future__ import annotations

import ast
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any, cast

from simpleeval import EvalWithCompoundTypes  # pyright: ignore[reportMissingTypeStubs]

from arbiter.policies.approvers import is_approve
from arbiter.policies.rules import compile_condition

log = logging.getLogger(__name__)


class _Missing:
    """An argument the call did not pass: equal to nothing, ordered against nothing, falsy."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    def __lt__(self, other: object) -> bool:
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __bool__(self) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __contains__(self, item: object) -> bool:
        return False

    def __getattr__(self, name: str) -> _Missing:
        return self

    def __getitem__(self, key: object) -> _Missing:
        return self


MISSING = _Missing()


class _View:
    """Arguments as a condition sees them: ``r.args.a.b`` and ``r.args['a-b']`` reach into the JSON;
    a missing key is ``MISSING`` rather than an error, so ``r.args.force == True`` is simply false
    for a call without ``force``. Anything else that fails (comparing a string with a number) still
    fails, and fails closed."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name in self._data:
            return _wrap(self._data[name])
        return MISSING

    def __getitem__(self, key: object) -> Any:
        if isinstance(key, str) and key in self._data:
            return _wrap(self._data[key])
        return MISSING

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        return self._data == (other._data if isinstance(other, _View) else other)

    __hash__ = None  # type: ignore[assignment]


class NonFiniteArgument(ValueError):
    """A condition read NaN or an infinity: every comparison with one is false (NaN) or meaningless, so
    the condition cannot be evaluated and fails closed. The /mcp endpoint refuses such bodies; this guards
    any other path that produces them."""


def _wrap(value: Any) -> Any:
    # Not a method: any public attribute of _View would shadow an argument of the same name.
    if isinstance(value, Mapping):
        return _View(cast(Mapping[str, Any], value))
    # Strings, ints and booleans pay two type checks; only floats and lists (whose items a condition may
    # compare) are looked at further.
    if type(value) is float:
        if not math.isfinite(value):
            raise NonFiniteArgument(repr(value))
    elif type(value) is list:
        items = cast(list[Any], value)
        if any(type(v) is float and not math.isfinite(v) for v in items):
            raise NonFiniteArgument("a list holding a non-finite number")
        return items
    return value


class CallArgs(dict[str, Any]):
    """A call's arguments with its tool's pinned annotations beside them: Casbin hands the request's
    ``args`` to the condition function whole, so this is how ``r.tool`` reaches it."""

    def __init__(self, args: Mapping[str, Any], annotations: Mapping[str, Any]) -> None:
        super().__init__(args)
        self.annotations = annotations


class _RequestView:
    """What a condition sees as ``r``: ``r.args`` (the call's arguments), ``r.sub`` (the caller) and
    ``r.tool`` (the tool's pinned annotations, e.g. ``r.tool.readOnlyHint``; missing ones are MISSING)."""

    __slots__ = ("args", "sub", "tool")

    def __init__(self, sub: object, args: Mapping[str, Any]) -> None:
        self.sub = sub
        self.args = _View(args)
        self.tool = _View(args.annotations if isinstance(args, CallArgs) else {})


class _Evaluators(threading.local):
    # simpleeval copies its operator and function tables into every new evaluator, which cost as much
    # as the condition itself; one per thread, its names set per evaluation (which never nests).
    def __init__(self) -> None:
        self.evaluator = EvalWithCompoundTypes()


_EVALUATORS = _Evaluators()


def _evaluator() -> Any:
    return _EVALUATORS.evaluator


def holds(cond: str, eft: str, subject: object, args: Mapping[str, Any]) -> bool:
    """Whether the condition ``cond`` of a rule with effect ``eft`` holds for ``subject`` (``r.sub``)
    calling with ``args``; one that cannot be evaluated holds for deny and approve rules only."""
    if not cond:
        return True
    try:
        tree: ast.Expression = compile_condition(cond)
        evaluator = _evaluator()
        evaluator.names = {"r": _RequestView(subject, args)}
        try:
            outcome: object = evaluator.eval(cond, previously_parsed=tree.body)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        finally:
            evaluator.names = {}  # the reused evaluator must not keep this call's arguments alive
        return bool(outcome)  # pyright: ignore[reportUnknownArgumentType]
    except Exception as exc:  # noqa: BLE001 - a condition that cannot be evaluated must fail closed
        # E.g. comparing a string with a number: an allow rule then does not match, a deny rule does, and
        # so does an approve rule (the call is not run unattended; a person sees it first).
        log.debug("policy condition %r could not be evaluated: %s", cond, type(exc).__name__)
        return eft == "deny" or is_approve(eft)
