"""Who approves a call under an ``approve`` rule, and for how long the approval holds.

An ``approve`` rule's effect column can say both, so a rule stays one line of Casbin CSV (and one row of
the policy table):

``approve``
    the end user (the person at the agent's client, asked through MCP) approves; the approval holds
    until the agent retries, at most ``mcp.request_state_ttl_s``.
``approve by role:billing-lead for 4h``
    an approver (someone holding ``role:billing-lead``, or a named ``user:<sub>``) approves through the
    admin API, the CLI or the console; the approved call may run once within 4 hours of the decision.
``approve by user or role:billing-lead``
    either: the end user when the agent can ask them, else an approver.

``for`` takes whole seconds, minutes, hours or days (``90s``, ``30m``, ``4h``, ``1d``), up to 7 days;
without it an approver's approval holds ``approvals.valid_s``. The canonical text (``ApprovalSpec.effect``)
is what the policy stores, so an equal rule is always written the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EFFECT = "approve"
END_USER = "user"  # the approver "user": the person at the agent's client
MAX_VALID_S = 7 * 24 * 3600
_SUBJECT = re.compile(r"^(user:[^\s,]{1,256}|role:[A-Za-z0-9_.:@/-]{1,128})$")
_DURATION = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class ApprovalSpec:
    approvers: tuple[str, ...] = (END_USER,)  # "user" and/or policy subjects (role:…, user:…), in order
    valid_s: int | None = None  # how long an approval holds; None: the deployment's default

    @property
    def by_user(self) -> bool:
        return END_USER in self.approvers

    @property
    def subjects(self) -> tuple[str, ...]:
        """The approvers that are people other than the end user: policy subjects."""
        return tuple(a for a in self.approvers if a != END_USER)

    @property
    def effect(self) -> str:
        """The canonical effect text, as stored."""
        text = EFFECT
        if self.approvers != (END_USER,):
            text += " by " + " or ".join(self.approvers)
        if self.valid_s is not None:
            text += " for " + _duration(self.valid_s)
        return text


def is_approve(effect: str) -> bool:
    return effect == EFFECT or effect.startswith(EFFECT + " ")


def parse(effect: str) -> ApprovalSpec | None:
    """The spec an ``approve`` effect states; None for ``allow``/``deny``. ``ValueError`` says what is
    wrong with a malformed one."""
    if not is_approve(effect):
        return None
    words = effect.split()[1:]
    approvers: list[str] = []
    valid_s: int | None = None
    if words[:1] == ["by"]:
        words = words[1:]
        while True:
            if not words:
                raise ValueError(f"effect {effect!r}: 'by' must name user, role:<name> or user:<subject>")
            who = words.pop(0)
            if who != END_USER and not _SUBJECT.match(who):
                raise ValueError(
                    f"effect {effect!r}: approver {who!r} must be user, role:<name> or user:<subject>"
                )
            if who in approvers:
                raise ValueError(f"effect {effect!r}: approver {who!r} is named twice")
            approvers.append(who)
            if words[:1] != ["or"]:
                break
            words = words[1:]
    if words[:1] == ["for"]:
        if len(words) < 2:
            raise ValueError(f"effect {effect!r}: 'for' must give a duration such as 30m, 4h or 1d")
        valid_s = _seconds(effect, words[1])
        words = words[2:]
    if words:
        raise ValueError(
            f"effect {effect!r}: expected approve [by <approver> [or <approver>]] [for <duration>], "
            f"not {' '.join(words)!r}"
        )
    return ApprovalSpec(tuple(approvers) or (END_USER,), valid_s)


def _seconds(effect: str, text: str) -> int:
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"effect {effect!r}: duration {text!r} must be a whole number of s, m, h or d")
    seconds = int(found.group(1)) * _UNITS[found.group(2)]
    if seconds > MAX_VALID_S:
        raise ValueError(f"effect {effect!r}: an approval holds at most 7 days, not {text}")
    return seconds


def _duration(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"
