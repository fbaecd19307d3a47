"""The role links (``g`` rules) of one policy version, followed without a node per caller.

pycasbin's role manager would make every caller a node of its role graph and scan them all on each
decision; here links are held per tenant, closures memoised per (member, tenant scope) (as many as the
policy has members), and callers' role sets in a capped map.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachetools import FIFOCache

from arbiter.policies.rules import Rule

_REACH_CACHE_MAX = 4096  # distinct (roles, tenant scope) combinations, not callers


class RoleGraph:
    """The ``g`` links of one policy, followed the way Casbin follows them, with no state per caller.

    A link applies in its own tenant, and a ``*`` link in every tenant. A member reaches itself and
    every role within ``hops`` links of it. Closures are memoised per (member, tenant scope);
    both come from the policy, so that memo is as small as the policy. Callers' role sets (from their
    credentials) are memoised in a capped map.
    """

    def __init__(self, rules: Sequence[Rule], hops: int) -> None:
        self._hops = hops
        self._links: dict[str, dict[str, list[str]]] = {}  # tenant -> member -> roles, in rule order
        for rule in rules:
            if rule.ptype == "g":
                member, role, dom = rule.values[:3]
                roles = self._links.setdefault(dom, {}).setdefault(member, [])
                if role not in roles:
                    roles.append(role)
        self._members = frozenset(m for by_member in self._links.values() for m in by_member)
        # The subjects `p` rules name: the only identities a decision can turn on.
        self.named = frozenset(r.values[0] for r in rules if r.ptype == "p" and r.values[0] != "*")
        self._closures: dict[tuple[str, str], frozenset[str]] = {}
        self._by_roles: FIFOCache[tuple[tuple[str, ...], str], frozenset[str]] = FIFOCache(_REACH_CACHE_MAX)

    def direct(self, member: str, tenant: str) -> list[str]:
        """The roles ``member`` is linked to by links of ``tenant`` or of ``*``."""
        roles = list(self._links.get(tenant, {}).get(member, ()))
        if tenant != "*":
            roles += (r for r in self._links.get("*", {}).get(member, ()) if r not in roles)
        return roles

    def reach(self, member: str, tenant: str) -> frozenset[str]:
        """``member`` and every role it inherits in ``tenant``."""
        if member not in self._members:
            return frozenset((member,))
        scope = self._scope(tenant)
        found = self._closures.get((member, scope))
        if found is None:
            seen, frontier = {member}, [member]
            for _ in range(self._hops):
                frontier = [r for m in frontier for r in self.direct(m, scope) if r not in seen]
                seen.update(frontier)
                if not frontier:
                    break
            found = self._closures[(member, scope)] = frozenset(seen)
        return found

    def named_reach(self, subject: str, roles: tuple[str, ...], tenant: str) -> frozenset[str]:
        """Which of the subjects the policy names the caller (``subject`` with ``roles``) is in
        ``tenant``, itself or by its roles."""
        named = self.named
        scope = self._scope(tenant)
        key = (roles, scope)
        try:
            by_roles = self._by_roles[key]
        except KeyError:
            reached: set[str] = set()
            for role in roles:
                reached |= self.reach(f"role:{role}", scope)
            by_roles = self._by_roles[key] = frozenset(reached & named)
        user = f"user:{subject}"
        if user in named or user in self._members:  # a caller the policy names by itself
            return by_roles | (self.reach(user, scope) & named)
        return by_roles

    def cache_sizes(self) -> dict[str, int]:
        return {"role_closures": len(self._closures), "role_sets": len(self._by_roles)}

    def _scope(self, tenant: str) -> str:
        # A tenant no link names sees only the `*` links: all such tenants share one scope.
        return tenant if tenant in self._links else "*"
