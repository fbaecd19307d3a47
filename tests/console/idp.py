"""A small OpenID Connect provider on loopback for the console's login tests.

Discovery document, an authorization endpoint that approves its one test user at once, a token endpoint
that checks the PKCE verifier (S256, with Authlib's own challenge function) and the redirect URI, and a
JWKS. Its ID tokens are signed with the test keys of tests/auth/jwks.py. Knobs make it misbehave the
ways a forged or confused answer would: other claims, another signing key, an error instead of a code.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from authlib.oauth2.rfc7636 import create_s256_code_challenge
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.auth.jwks import SigningKey, mint, rsa_key
from tests.conftest import serve_in_thread

CLIENT_ID = "arbiter-console"


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None


@dataclass
class TestIdp:
    """The provider. ``claims`` go into every ID token (the user's roles, say); ``id_token_claims``
    override or drop (None) any claim, ``error`` answers the authorization request with that error."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    key: SigningKey = field(default_factory=lambda: rsa_key("idp-1"))
    sign_with: SigningKey | None = None  # another key than the published one
    subject: str = "dana@example.com"
    claims: dict[str, Any] = field(default_factory=dict[str, Any])
    id_token_claims: dict[str, Any] = field(default_factory=dict[str, Any])
    id_token_header: dict[str, Any] = field(default_factory=dict[str, Any])
    error: str | None = None
    port: int = 0
    authorize_requests: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    token_requests: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    _grants: dict[str, _Grant] = field(default_factory=dict[str, _Grant])

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    def issuer_config(self, **console: Any) -> dict[str, Any]:
        """Arbiter's `auth.issuers` entry for this provider, with console login."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "console": {"client_id": CLIENT_ID, "label": "Test IdP", **console},
        }

    async def _discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": self.jwks_uri,
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _jwks(self, request: Request) -> Response:
        return JSONResponse({"keys": [self.key.public_jwk()]})

    async def _authorize(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.authorize_requests.append(params)
        if (
            params.get("response_type") != "code"
            or params.get("client_id") != CLIENT_ID
            or params.get("code_challenge_method") != "S256"
            or not params.get("code_challenge")
            or not params.get("redirect_uri")
        ):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        back = {"state": params.get("state", "")}
        if self.error is not None:
            back["error"] = self.error
        else:
            code = secrets.token_urlsafe(16)
            self._grants[code] = _Grant(
                CLIENT_ID, params["redirect_uri"], params["code_challenge"], params.get("nonce")
            )
            back["code"] = code
        return RedirectResponse(f"{params['redirect_uri']}?{urlencode(back)}", status_code=302)

    async def _token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        grant = self._grants.pop(form.get("code", ""), None)  # a code is good once
        if (
            grant is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != grant.client_id
            or form.get("redirect_uri") != grant.redirect_uri
            or create_s256_code_challenge(form.get("code_verifier", "")) != grant.challenge
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": CLIENT_ID,
            "exp": now + 600,
            "iat": now,
            "nonce": grant.nonce,
            **self.claims,
            **self.id_token_claims,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"typ": "JWT", **self.id_token_header}
        id_token = mint(claims, self.sign_with or self.key, header=header)
        return JSONResponse(
            {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "id_token": id_token}
        )

    @contextmanager
    def running(self) -> Iterator[TestIdp]:
        app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks.json", self._jwks),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
            ]
        )
        with serve_in_thread(app) as port:
            self.port = port
            yield self
