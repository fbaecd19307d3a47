"""Who may do what in the admin surfaces (``/admin/v1`` and ``/console``): one decision for both.

The policy decides, except for two built-in grants that a bad policy cannot take away (so nobody locks
themselves out): roles in ``auth.admin_roles`` (and the break-glass token) may do everything, roles in
``auth.auditor_roles`` may read the audit log (and the API's description).
"""

from __future__ import annotations

from arbiter.auth.principal import Principal
from arbiter.policies.engine import PolicyEngine
from arbiter.settings import AuthSettings

AUDITOR_AREAS = frozenset({"audit", "openapi"})


def is_security_admin(caller: Principal, auth: AuthSettings) -> bool:
    """A role in ``auth.admin_roles``, or the break-glass token: for what no policy may delegate."""
    return caller.auth_method == "break_glass" or bool(caller.roles & set(auth.admin_roles))


def may_admin(caller: Principal, area: str, action: str, auth: AuthSettings, engine: PolicyEngine) -> bool:
    """May ``caller`` do ``action`` (``admin:read``/``admin:write``) on ``admin/<area>``?"""
    if is_security_admin(caller, auth):
        return True
    if area in AUDITOR_AREAS and action == "admin:read" and caller.roles & set(auth.auditor_roles):
        return True
    return engine.decide(caller, f"admin/{area}", action).allowed


def escalating_roles(caller: Principal, roles: set[str], auth: AuthSettings) -> set[str]:
    """Built-in admin/auditor roles a new key would get that ``caller`` may not hand out: a policy may
    delegate key management, but it must not become a way to mint built-in roles."""
    if is_security_admin(caller, auth):
        return set()
    built_in = set(auth.admin_roles) | set(auth.auditor_roles)
    return (roles & built_in) - set(caller.roles)
