"""Arbiter's own seal around an upstream's multi-round-trip ``requestState`` (MCP 2026-07-28).

An upstream answering ``input_required`` hands the agent an opaque ``requestState`` to echo on its retry.
Upstreams see Arbiter's credential, not the caller's, so they cannot tell two of Arbiter's callers apart:
Arbiter binds each round itself. The upstream's state is sealed (AES-256-GCM) together with the caller
(issuer, subject, tenant, API key id, OAuth client id), the tool's upstream, the method, the target, a
digest of the arguments, an expiry, and the upstream that answered (the tool's own or its fallback: the
state is that upstream's, so the retry goes there and nowhere else); the retry's state is opened and
every claim checked before anything is forwarded, so a state presented by another caller, for another
tool or other arguments, expired or altered, never reaches the upstream. The token is encrypted, so the
agent cannot read the upstream's state either.
The same caller may present one state again while it is fresh: whether a state is single use is the
upstream's to decide (Arbiter keeps no record of the states it opened). Arbiter's own approval rounds
(``interceptors/approval.py``) seal their state with ``kind="approval"``, a claim no upstream state can
carry, and are single use: that step records each one it accepts.

Keys: derived (HKDF-SHA256, an info string of its own) from ``secret_key``, the first key sealing and
every key opening, so rotation works as for upstream secrets; without ``secret_key`` a key made at start
and held only by this process (a retry must then reach the same process, within its lifetime).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from arbiter.auth.principal import Principal

_PREFIX = "arb1."
_INFO = b"arbiter/request-state/v1"
_KID_LEN = 4
_NONCE_LEN = 12


@dataclass(frozen=True, slots=True)
class Round:
    """What one round is bound to: who asks, where, for what."""

    principal: Principal
    upstream: str
    method: str
    target: str
    arguments: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Opened:
    """An opened state: the upstream's own ``state``, and the upstream that issued it (``via``)."""

    state: str
    via: str
    kind: str | None = None  # "approval": Arbiter's own approval round, not an upstream's state


class StateRefused(Exception):
    """A presented state does not open, or does not belong to this round; ``str()`` says which (for the
    audit record, never the wire): malformed, seal, expired, principal, target, arguments."""


class RequestStateSeal:
    """Seals and opens ``requestState`` tokens; ``ttl_s`` bounds how long a round may wait for input."""

    def __init__(
        self, secrets: Sequence[bytes], *, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        if not secrets:
            raise ValueError("a request-state seal needs at least one key")
        self._ring: dict[bytes, AESGCM] = {}
        self._kid = b""
        for secret in secrets:
            key = HKDF(algorithm=SHA256(), length=32, salt=None, info=_INFO).derive(secret)
            kid = hashlib.sha256(b"kid:" + key).digest()[:_KID_LEN]
            self._ring.setdefault(kid, AESGCM(key))
            self._kid = self._kid or kid
        self._ttl_s = ttl_s
        self._clock = clock

    @classmethod
    def of(cls, secret_key: str | None, *, ttl_s: float) -> RequestStateSeal:
        """From ``settings.secret_key`` (comma-separated keys), or a key of this process's own."""
        keys = [k.strip().encode() for k in secret_key.split(",") if k.strip()] if secret_key else []
        return cls(keys or [os.urandom(32)], ttl_s=ttl_s)

    def seal(self, round_: Round, state: str, *, via: str | None = None, kind: str | None = None) -> str:
        """Seal ``state`` to ``round_``; ``via``: the upstream that answered, when not the tool's own (its
        fallback), which then alone gets the retry; ``kind``: a round of Arbiter's own (``approval``)."""
        claims: dict[str, Any] = {"exp": self._clock() + self._ttl_s, "b": _binding(round_), "s": state}
        if via is not None and via != round_.upstream:
            claims["v"] = via
        if kind is not None:
            claims["k"] = kind
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._ring[self._kid].encrypt(nonce, orjson.dumps(claims), _PREFIX.encode() + self._kid)
        return _PREFIX + base64.urlsafe_b64encode(self._kid + nonce + sealed).decode().rstrip("=")

    def open(self, round_: Round, token: object) -> Opened:
        """The upstream's state inside ``token`` (and where it came from), if it was sealed for exactly this
        round and is fresh."""
        if not isinstance(token, str) or not token.startswith(_PREFIX):
            raise StateRefused("malformed")
        body = token[len(_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise StateRefused("malformed") from None
        kid, nonce, sealed = raw[:_KID_LEN], raw[_KID_LEN:][:_NONCE_LEN], raw[_KID_LEN + _NONCE_LEN :]
        aead = self._ring.get(kid)
        if aead is None or len(sealed) < 16:
            raise StateRefused("seal")
        try:
            claims: Any = orjson.loads(aead.decrypt(nonce, sealed, _PREFIX.encode() + kid))
        except (InvalidTag, orjson.JSONDecodeError):
            raise StateRefused("seal") from None
        if not isinstance(claims, dict):
            raise StateRefused("malformed")
        claims = cast(dict[str, Any], claims)
        exp: Any = claims.get("exp")
        if not isinstance(exp, float | int) or not self._clock() < exp:
            raise StateRefused("expired")
        bound: Any = claims.get("b")
        expected = _binding(round_)
        if not isinstance(bound, dict):
            raise StateRefused("malformed")
        bound = cast(dict[str, Any], bound)
        for claim in ("p", "u", "m", "t", "a"):  # the first that differs names the refusal
            # As UTF-8 bytes: compare_digest refuses str with anything beyond ASCII (a tool named "vérifier").
            if not hmac.compare_digest(_utf8(str(bound.get(claim))), _utf8(expected[claim])):
                raise StateRefused(_CLAIMS[claim])
        state: Any = claims.get("s")
        via: Any = claims.get("v", round_.upstream)
        kind: Any = claims.get("k")
        if not isinstance(state, str) or not isinstance(via, str) or not isinstance(kind, str | None):
            raise StateRefused("malformed")
        return Opened(state, via, kind)


_CLAIMS = {"p": "principal", "u": "target", "m": "target", "t": "target", "a": "arguments"}


def _binding(round_: Round) -> dict[str, str]:
    p = round_.principal
    who = orjson.dumps([p.issuer, p.subject, p.tenant, p.api_key_id, p.client_id])
    try:
        args = orjson.dumps(dict(round_.arguments or {}), option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson does not encode (an integer beyond 64 bits): the standard library
        args = json.dumps(round_.arguments or {}, sort_keys=True, separators=(",", ":")).encode()
    return {
        "p": _digest(who),
        "u": round_.upstream,
        "m": round_.method,
        "t": round_.target,
        "a": _digest(args),
    }


def call_key(round_: Round, *parts: str) -> str:
    """One call's identity (caller, upstream, method, target, arguments digest, and ``parts``), e.g. to
    find an approver's decision when the agent retries the same call (``approval_requests.py``)."""
    bound = orjson.dumps([*_binding(round_).values(), *parts])
    return hashlib.sha256(bound).hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()[:16]).decode().rstrip("=")
