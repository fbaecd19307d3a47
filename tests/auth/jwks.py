"""Test identity provider: keys the tests generate, a JWKS on a loopback port, and a token minter.

The minter builds JWS compact tokens by hand so tests can produce anything an attacker could:
arbitrary headers, ``alg: none``, HMAC with a public key as the secret, foreign keys under a known kid.
Every minted token is remembered in ``MINTED`` so tests can prove none of them reached the logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from joserfc.jwk import ECKey, KeyParameters, RSAKey
from joserfc.jws import JWSRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import serve_in_thread

ISSUER = "https://idp.test/realms/acme"
RESOURCE = "https://arbiter.test/mcp"
MINTED: list[str] = []


@dataclass
class SigningKey:
    """A private key the test IdP signs with, and what it publishes for it."""

    jwk: RSAKey | ECKey
    kid: str
    alg: str

    def public_jwk(self) -> dict[str, Any]:
        return dict(self.jwk.as_dict(private=False))


def rsa_key(kid: str, alg: str = "RS256", *, use: str | None = "sig", pin_alg: bool = False) -> SigningKey:
    """An RSA key; ``pin_alg`` publishes its ``alg`` in the JWK, restricting it to that algorithm."""
    params: KeyParameters = {"kid": kid}
    if use:
        params["use"] = use
    if pin_alg:
        params["alg"] = alg
    return SigningKey(RSAKey.generate_key(2048, parameters=params), kid, alg)


def ec_key(kid: str, alg: str = "ES256") -> SigningKey:
    return SigningKey(ECKey.generate_key("P-256", parameters={"kid": kid}), kid, alg)


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid access-token claims for ``ISSUER`` and ``RESOURCE``; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": RESOURCE,
        "exp": now + 300,
        "iat": now,
        "jti": "jti-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(
    payload: dict[str, Any],
    key: SigningKey | None = None,
    *,
    alg: str | None = None,
    header: dict[str, Any] | None = None,
    hmac_secret: bytes | None = None,
) -> str:
    """Sign ``payload``; ``header`` entries override the defaults (alg, typ at+jwt, kid); None drops one."""
    alg = alg or (key.alg if key else "none")
    fields: dict[str, Any] = {"alg": alg, "typ": "at+jwt", "kid": key.kid if key else None}
    fields.update(header or {})
    fields = {k: v for k, v in fields.items() if v is not None}
    signing_input = f"{_b64(json.dumps(fields).encode())}.{_b64(json.dumps(payload).encode())}".encode()
    if hmac_secret is not None:
        signature = hmac.new(hmac_secret, signing_input, hashlib.sha256).digest()
    elif alg == "none":
        signature = b""
    else:
        assert key is not None
        signature = JWSRegistry.algorithms[alg].sign(signing_input, key.jwk)
    token = f"{signing_input.decode()}.{_b64(signature)}"
    MINTED.append(token)
    return token


@dataclass
class JwksServer:
    """Serves ``{"keys": [...]}`` at ``/jwks.json``; counts fetches; can fail with a status code."""

    keys: list[SigningKey] = field(default_factory=list[SigningKey])
    # Raw entries served after the keys, malformed ones included: anything JSON.
    extra: list[Any] = field(default_factory=list[Any])
    status: int = 200
    fetches: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def reset(self, *keys: SigningKey) -> None:
        self.keys, self.extra, self.status, self.fetches = list(keys), [], 200, 0

    def publish(self, key: SigningKey) -> None:
        self.keys.append(key)

    async def _jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        if self.status != 200:
            return JSONResponse({"error": "unavailable"}, status_code=self.status)
        return JSONResponse({"keys": [*(k.public_jwk() for k in self.keys), *self.extra]})

    @contextmanager
    def running(self) -> Iterator[JwksServer]:
        app = Starlette(routes=[Route("/jwks.json", self._jwks)])
        with serve_in_thread(app) as port:
            self.port = port
            yield self
