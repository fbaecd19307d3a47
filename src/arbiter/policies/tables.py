"""Decision tables: expected decisions that a policy must give, for `arbiter policy test` and dry runs.

A table is YAML (a list of cases, or ``{cases: [...]}``) or CSV with a header row. Each case has
``subject``, ``roles`` (a list; in CSV separated by ``;`` or spaces), ``tenant``, ``object``
(``crm/get_customer``, or the agent-facing ``crm__get_customer``), ``action`` (default ``call``),
``args`` (a mapping; in CSV a JSON object) and ``expected`` (``allow``, ``deny`` or ``approve``: allowed
once a person says yes).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from arbiter.errors import InvalidInput
from arbiter.naming import SEP
from arbiter.policies.engine import Decision, PolicyEngine, Subject
from arbiter.policies.rules import ACTIONS


@dataclass(frozen=True)
class Case:
    subject: str
    object: str
    expected: str
    roles: tuple[str, ...] = ()
    tenant: str = ""
    action: str = "call"
    args: Mapping[str, Any] = field(default_factory=dict[str, Any])
    line: int = 0  # where it came from, for messages

    @property
    def who(self) -> Subject:
        return Subject(self.subject, self.tenant, tuple(sorted(self.roles)))


@dataclass(frozen=True)
class Outcome:
    case: Case
    decision: Decision

    @property
    def ok(self) -> bool:
        return self.decision.outcome == self.case.expected

    def describe(self) -> str:
        c, d = self.case, self.decision
        got = d.outcome
        roles = ",".join(c.roles) or "-"
        args = json.dumps(dict(c.args), sort_keys=True) if c.args else "{}"
        why = d.rule.csv() if d.rule else "no rule matched (default deny)"
        mark = "ok  " if self.ok else "FAIL"
        who = f"{c.subject} [roles {roles}, tenant {c.tenant or '-'}]"
        return (
            f"{mark} case {c.line}: {who} {c.action} {c.object} {args}: "
            f"expected {c.expected}, got {got} ({why})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "line": self.case.line,
            "ok": self.ok,
            "expected": self.case.expected,
            **self.decision.to_json(),
        }


def object_name(value: str) -> str:
    """Accept ``crm/get_customer`` or the agent-facing ``crm__get_customer``."""
    if "/" not in value and SEP in value:
        upstream, _, name = value.partition(SEP)
        return f"{upstream}/{name}"
    return value


def parse_table(text: str, fmt: str) -> list[Case]:
    """Cases from YAML (``fmt`` ``yaml``) or CSV (``csv``); every bad case is reported at once."""
    rows: list[tuple[int, Any]]
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
        rows = [(i, {k.strip(): v for k, v in row.items() if k}) for i, row in enumerate(reader, start=2)]
    else:
        try:
            data: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"the decision table is not valid YAML: {exc}") from None
        return parse_rows(data)
    return _cases(rows)


def parse_rows(data: Any) -> list[Case]:
    """Cases from already-parsed data: a list of mappings, or ``{cases: [...]}``."""
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]  # pyright: ignore[reportUnknownVariableType]
    if not isinstance(data, list):
        raise InvalidInput("a decision table is a list of cases (or {cases: [...]})")
    return _cases([(i, row) for i, row in enumerate(data, start=1)])  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]


def _cases(rows: Sequence[tuple[int, Any]]) -> list[Case]:
    cases: list[Case] = []
    errors: list[dict[str, object]] = []
    for line, row in rows:
        try:
            cases.append(_case(row, line))
        except (ValueError, TypeError) as exc:
            errors.append({"line": line, "message": str(exc)})
    if errors:
        raise InvalidInput(
            f"invalid decision table: case {errors[0]['line']}: {errors[0]['message']}", errors=errors
        )
    return cases


def _case(row: Any, line: int) -> Case:
    if not isinstance(row, Mapping):
        raise ValueError("a case is a mapping of subject, roles, tenant, object, action, args, expected")
    data: Mapping[str, Any] = row  # pyright: ignore[reportUnknownVariableType]
    for required in ("subject", "object", "expected"):
        if not data.get(required):
            raise ValueError(f"{required} is required")
    expected = str(data["expected"]).strip().lower()
    if expected not in ("allow", "deny", "approve"):
        raise ValueError(f"expected must be allow, deny or approve, not {data['expected']!r}")
    action = str(data.get("action") or "call").strip()
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    roles: Any = data.get("roles") or ()
    if isinstance(roles, str):
        roles = roles.replace(";", " ").replace(",", " ").split()
    args: Any = data.get("args") or {}
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, Mapping):
        raise ValueError("args must be a mapping (in CSV, a JSON object)")
    return Case(
        subject=str(data["subject"]).strip(),
        object=object_name(str(data["object"]).strip()),
        expected=expected,
        roles=tuple(str(r) for r in roles),  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        tenant=str(data.get("tenant") or "").strip(),
        action=action,
        args=dict(args),  # pyright: ignore[reportUnknownArgumentType]
        line=line,
    )


def run_table(engine: PolicyEngine, cases: Sequence[Case]) -> list[Outcome]:
    return [Outcome(c, engine.decide(c.who, c.object, c.action, c.args)) for c in cases]
