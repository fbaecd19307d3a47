"""Upstream secrets at rest: encrypted with Arbiter's Fernet key(s), or referenced from the environment.

A secret is never kept in clear outside the outbound credential that uses it: the database holds a Fernet
token, the admin API shows only where a secret comes from, and nothing here puts a value in a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from arbiter.errors import ArbiterError, InvalidInput
from arbiter.settings import env_secret


class SecretKeyMissing(InvalidInput):
    """An inline secret was given but no ``ARBITER_SECRET_KEY`` is configured to encrypt it."""

    code = "secret_key_missing"


class CredentialUnavailable(ArbiterError):
    """A configured secret cannot be produced (unset variable, undecryptable token)."""

    code = "credential_unavailable"
    http_status = 502


class SecretBox:
    """Encrypts and decrypts upstream secrets; the first key encrypts, every key decrypts (rotation)."""

    def __init__(self, keys: SecretStr | None) -> None:
        raw = [k.strip() for k in keys.get_secret_value().split(",")] if keys is not None else []
        self._fernet = MultiFernet([Fernet(k) for k in raw if k]) if any(raw) else None

    @property
    def configured(self) -> bool:
        return self._fernet is not None

    def seal(self, plaintext: str, field: str) -> str:
        if self._fernet is None:
            raise SecretKeyMissing(
                f"{field}: inline secrets are stored encrypted, and no encryption key is configured. "
                "Set ARBITER_SECRET_KEY (a Fernet key), or reference an environment variable instead "
                f"({field}_env).",
                field=field,
            )
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, token: str) -> str:
        if self._fernet is None:
            raise CredentialUnavailable(
                "a stored upstream secret cannot be decrypted: ARBITER_SECRET_KEY is not configured"
            )
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise CredentialUnavailable(
                "a stored upstream secret cannot be decrypted with ARBITER_SECRET_KEY (was the key "
                "replaced rather than rotated?)"
            ) from None


@dataclass(frozen=True)
class SecretRef:
    """Where one secret comes from: an environment variable, or a Fernet token stored in the database."""

    env: str | None = None
    sealed: str | None = field(default=None, repr=False)  # useless without the key, but kept out of logs

    def reveal(self, box: SecretBox) -> str:
        if self.sealed is not None:
            return box.open(self.sealed)
        if self.env is None:
            raise CredentialUnavailable("the credential has no secret configured")
        value = env_secret(self.env)
        if value is None:
            raise CredentialUnavailable(f"environment variable {self.env} is not set")
        return value

    @property
    def source(self) -> str:
        return "stored" if self.sealed is not None else "env"
