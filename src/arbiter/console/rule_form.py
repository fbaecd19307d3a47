"""The console's rule form: one rule as the person typed it, read from the posted fields and checked
by ``policies/rules.py`` as the admin API checks it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form

from arbiter.policies.rules import PolicyInvalid, Rule, canonical_effect, check

Text = Annotated[str, Form(max_length=1100)]


@dataclass(frozen=True)
class RuleForm:
    """One rule as the form holds it (what the person typed, kept to show again with an error)."""

    type: str = "p"
    subject: str = ""
    tenant: str = "*"
    object: str = ""
    action: str = "call"
    effect: str = "allow"
    condition: str = ""
    member: str = ""
    role: str = ""
    approval: str = ""  # approve rules: who approves and for how long, e.g. "by role:billing-lead for 4h"

    @classmethod
    def of(cls, rule: Rule) -> RuleForm:
        if rule.ptype == "g":
            member, role, dom = rule.values
            return cls(type="g", member=member, role=role, tenant=dom)
        sub, dom, obj, act, eft, cond = rule.values
        approval = eft.removeprefix(rule.effect).strip()  # what follows "approve", if anything
        return cls("p", sub, dom, obj, act, rule.effect, cond, approval=approval)

    def rule(self) -> Rule:
        """The validated rule; ``PolicyInvalid`` names what is wrong, as the admin API would."""
        tenant = self.tenant.strip() or "*"
        if self.type == "g":
            rule = Rule("g", (self.member.strip(), self.role.strip(), tenant))
        elif self.type == "p":
            effect = self.effect
            if self.approval.strip():  # check() refuses it on an allow or deny rule, naming the effect
                effect = f"{effect} {self.approval.strip()}"
            try:
                effect = canonical_effect(effect)
            except ValueError as exc:
                raise PolicyInvalid([{"message": str(exc)}]) from None
            values = (self.subject.strip(), tenant, self.object.strip(), self.action, effect)
            rule = Rule("p", (*values, self.condition.strip()))
        else:
            raise PolicyInvalid(
                [{"message": f"unknown rule type {self.type!r}: p (a rule) or g (a role link)"}]
            )
        try:
            check(rule)
        except ValueError as exc:
            raise PolicyInvalid([{"message": str(exc)}]) from None
        return rule


def _form(
    type: Annotated[str, Form(max_length=1)] = "p",
    subject: Text = "",
    tenant: Text = "*",
    object: Text = "",
    action: Text = "call",
    effect: Text = "allow",
    condition: Text = "",
    member: Text = "",
    role: Text = "",
    approval: Text = "",
) -> RuleForm:
    return RuleForm(type, subject, tenant, object, action, effect, condition, member, role, approval)


Fields = Annotated[RuleForm, Depends(_form)]
