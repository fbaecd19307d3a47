"""Who is calling: the identity every later step (policy, limits, audit) decides on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AuthMethod = Literal["jwt", "api_key", "break_glass"]


@dataclass(frozen=True)
class Principal:
    subject: str
    issuer: str  # the token's `iss`, or "arbiter" for Arbiter's own API keys
    auth_method: AuthMethod
    tenant: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset[str])
    scopes: frozenset[str] = field(default_factory=frozenset[str])
    client_id: str | None = None
    api_key_id: str | None = None

    @property
    def key(self) -> str:
        """A stable identity for binding sessions and keying limits: issuer + subject."""
        return f"{self.issuer}|{self.subject}"
