"""Upstream definitions as the registry takes them, whoever gives them (the admin API converts to these).

The registry validates them (URL, network policy, credential rules) and turns them into stored rows; these
carry only what a caller asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import SecretStr

from arbiter.auth.outbound import CredentialSpec


@dataclass(frozen=True)
class CredentialInput:
    """A credential as given: where it goes (``spec``, without a secret) and its secret, if given.

    The secret is either the value itself (stored sealed) or the name of an environment variable of the
    Arbiter process; neither means "keep the stored secret" (see ``proxy/credentials.py``).
    """

    spec: CredentialSpec = field(default_factory=CredentialSpec)
    secret: SecretStr | None = None
    secret_env: str | None = None


@dataclass(frozen=True)
class UpstreamDefinition:
    """A new upstream to register."""

    name: str
    url: str
    transport: str = "streamable_http"
    connect_timeout_s: float = 10.0
    call_timeout_s: float = 30.0
    enabled: bool = True
    credential: CredentialInput | None = None
    max_concurrency: int | None = None
    fallback: str | None = None
    auto_approve: bool = False


@dataclass(frozen=True)
class UpstreamChanges:
    """A change to a registered upstream; ``None`` leaves a field as it is."""

    transport: str | None = None
    url: str | None = None
    connect_timeout_s: float | None = None
    call_timeout_s: float | None = None
    enabled: bool | None = None
    credential: CredentialInput | None = None
    # Resilience; ``clear`` names those of them set back to none (no own bulkhead size, no fallback).
    max_concurrency: int | None = None
    fallback: str | None = None
    auto_approve: bool | None = None
    clear: frozenset[str] = frozenset()

    def fields(self) -> dict[str, str | float | bool | None]:
        """The changed columns of the upstream's row (the credential aside)."""
        values = {
            "transport": self.transport,
            "url": self.url,
            "connect_timeout_s": self.connect_timeout_s,
            "call_timeout_s": self.call_timeout_s,
            "enabled": self.enabled,
            "max_concurrency": self.max_concurrency,
            "fallback": self.fallback,
            "auto_approve": self.auto_approve,
        }
        changed: dict[str, str | float | bool | None] = {k: v for k, v in values.items() if v is not None}
        changed.update(dict.fromkeys(self.clear & {"max_concurrency", "fallback"}))
        return changed


async def widens_auto_approve(changes: UpstreamChanges, currently: Callable[[], Awaitable[bool]]) -> bool:
    """Would ``changes`` approve definitions nobody reviewed? Turning auto-approve on, or pointing an
    auto-approving upstream at another server (its new names would be approved unreviewed): only
    security admins may. ``currently`` (the upstream's present setting) is read only when it matters."""
    if changes.auto_approve:
        return True
    moves = changes.url is not None or changes.transport is not None
    return moves and changes.auto_approve is None and await currently()
