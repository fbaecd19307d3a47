"""Ed25519 signatures over checkpoints: a signed (seq, hash) pins every record up to ``seq``.

Whoever can write the database can rewrite records and recompute their hashes; they cannot sign a
checkpoint without the private key, which lives in Arbiter's settings, not in the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import SecretStr

from arbiter.audit.record import canonical
from arbiter.errors import ConfigError


def checkpoint_payload(seq: int, hash_: str, ts_ms: int, kind: str) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return canonical({"hash": hash_, "kind": kind, "seq": seq, "ts_ms": ts_ms}).encode("utf-8")


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def key_id(public_b64: str) -> str:
    """A short, stable name for a public key (recorded with each checkpoint)."""
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:16]


def load_public_key(public_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise ConfigError("an audit public key must be 32 bytes of Ed25519 public key, base64") from None


def _private_key(secret: SecretStr) -> Ed25519PrivateKey:
    text = secret.get_secret_value().strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("not an Ed25519 key")
            return key
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error):
        # Never echo the value: it is the key.
        raise ConfigError(
            "audit.signing_key must be an Ed25519 private key: 32 bytes base64, or PKCS#8 PEM "
            "(generate one with `arbiter audit keygen`)"
        ) from None


@dataclass(frozen=True)
class Signer:
    """Signs checkpoints; without a configured key, checkpoints are stored unsigned (key id "")."""

    private: Ed25519PrivateKey | None
    public_b64: str
    key_id: str

    @classmethod
    def from_secret(cls, secret: SecretStr | None) -> Signer:
        if secret is None:
            return cls(None, "", "")
        private = _private_key(secret)
        public = public_key_b64(private.public_key())
        return cls(private, public, key_id(public))

    def sign(self, payload: bytes) -> str:
        if self.private is None:
            return ""
        return base64.b64encode(self.private.sign(payload)).decode("ascii")

    def hmac_key(self) -> bytes | None:
        """A key for the arguments' HMAC derived from the signing key (when no hmac_key is set)."""
        if self.private is None:
            return None
        seed = self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return hmac.new(seed, b"arbiter audit arguments hmac v1", hashlib.sha256).digest()


def hmac_key(configured: SecretStr | None, signer: Signer) -> tuple[bytes, bool]:
    """The key for argument HMACs, and whether it is stable across restarts."""
    if configured is not None:
        return configured.get_secret_value().encode("utf-8"), True
    derived = signer.hmac_key()
    if derived is not None:
        return derived, True
    return os.urandom(32), False


class KeyRing:
    """The public keys a verifier trusts, by key id."""

    def __init__(self, public_keys: Iterable[str]) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
        for public in public_keys:
            if public:
                self.keys[key_id(public)] = load_public_key(public)

    def verify(self, kid: str, payload: bytes, signature: str) -> bool:
        key = self.keys.get(kid)
        if key is None or not signature:
            return False
        try:
            key.verify(base64.b64decode(signature), payload)
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True


def generate_key() -> tuple[str, str]:
    """A new signing key: (private seed base64, public key base64)."""
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed).decode("ascii"), public_key_b64(private.public_key())
