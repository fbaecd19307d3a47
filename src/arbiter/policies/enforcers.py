"""Casbin enforcers for Arbiter's model: its rules loaded as Casbin policy, each matcher parsed once.

pycasbin's ``enforce_ex`` hands the matcher's text to ``_get_expression`` on every call, which parses it
with ``ast.parse`` into a fresh ``SimpleEval`` (copying its operator and function tables) before a
single rule is looked at: about a third of an uncached decision's CPU with Arbiter's model. These
subclasses keep one evaluator per matcher text and thread, and refresh its functions on each call
(Casbin rebuilds the ``g`` functions per call; everything else is the same objects). Casbin still
decides: the same evaluator class evaluates the same tree against the same parameters, rule by rule.

An evaluator holds the names of the rule it is evaluating while it runs, so one must never serve two
evaluations at once: one per thread (the impact preview decides on worker threads), and an evaluation
never re-enters the enforcer (the matcher's functions are Arbiter's own and decide nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import casbin  # pyright: ignore[reportMissingTypeStubs]
from casbin.core_enforcer import CoreEnforcer  # pyright: ignore[reportMissingTypeStubs]
from casbin.model import Model  # pyright: ignore[reportMissingTypeStubs]
from casbin.persist.adapter import Adapter  # pyright: ignore[reportMissingTypeStubs]

from arbiter.policies.approvers import is_approve
from arbiter.policies.rules import Rule

MODEL_TEXT = (files("arbiter.policies") / "model.conf").read_text(encoding="utf-8")

# The model's matchers (m, m2, m3, m4) are the only texts; a model using eval() would make one per
# rule, so the map is cleared rather than let grow past this.
_MAX_TEXTS = 64


class _Parsed(threading.local):
    def __init__(self) -> None:
        self.by_text: dict[str, Any] = {}


class _ParsedOnce:
    """Mixed into an enforcer class ahead of Casbin's: ``_get_expression`` from a per-thread cache."""

    _parsed: _Parsed

    def _get_expression(self, expr: str, functions: dict[str, Any] | None = None) -> Any:
        try:
            parsed = self.__dict__["_parsed"]
        except KeyError:
            parsed = self.__dict__["_parsed"] = _Parsed()
        by_text: dict[str, Any] = parsed.by_text
        try:
            found = by_text[expr]
        except KeyError:
            if len(by_text) >= _MAX_TEXTS:
                by_text.clear()
            found = by_text[expr] = CoreEnforcer._get_expression(expr, functions)  # pyright: ignore[reportUnknownMemberType, reportPrivateUsage]
            return found
        if functions:
            found.functions.update(functions)
        return found

    def enforce_ex(self, *rvals: Any) -> Any:
        try:
            return super().enforce_ex(*rvals)  # pyright: ignore[reportUnknownMemberType, reportAttributeAccessIssue, reportUnknownVariableType]
        finally:
            # Casbin leaves the last rule's parameters (the request's arguments among them) on the
            # evaluator; a reused one must not keep them alive until the next decision.
            parsed: _Parsed | None = self.__dict__.get("_parsed")
            if parsed is not None:
                for found in parsed.by_text.values():
                    found.names = {}


class Enforcer(_ParsedOnce, casbin.Enforcer):  # pyright: ignore[reportUntypedBaseClass, reportIncompatibleMethodOverride]
    """``casbin.Enforcer`` with its matchers parsed once per thread."""


class AsyncEnforcer(_ParsedOnce, casbin.AsyncEnforcer):  # pyright: ignore[reportUntypedBaseClass, reportIncompatibleMethodOverride]
    """``casbin.AsyncEnforcer`` with its matchers parsed once per thread."""


class RulesAdapter(Adapter):  # pyright: ignore[reportUntypedBaseClass]
    """Loads validated rules held in memory (a policy file, a dry-run candidate, or the database's)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = rules

    def load_policy(self, model: Model) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        for rule in self._rules:
            model.add_policy(rule.ptype, casbin_ptype(rule), list(rule.values))  # pyright: ignore[reportUnknownMemberType]


def casbin_ptype(rule: Rule) -> str:
    """The Casbin policy type a rule is loaded as: ``p2`` for approve rules (model.conf), else its own."""
    return "p2" if rule.ptype == "p" and is_approve(rule.values[4]) else rule.ptype
