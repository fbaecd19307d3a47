"""The console's OpenID Connect client: authorization code with PKCE (S256), through Authlib.

One provider per issuer of ``auth.issuers`` with a ``console`` block: the same issuers ``/mcp`` trusts,
whose ID tokens are verified with the same JWKS and whose claims map to roles the same way
(``JwtVerifier.verify_id_token``). The redirect URI comes from configuration (``console.public_url``),
never from the request's Host header. Everything a browser sends back is checked against what this
login started with (state, nonce, PKCE verifier), which the server keeps (console/oidc_pending.py) and
the browser names with a short-lived cookie: any replica can finish a login another one started.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from arbiter.auth.authenticator import resource_url
from arbiter.auth.jwt import JwtVerifier
from arbiter.auth.principal import Principal
from arbiter.errors import BadLoginCallback, IdentityProviderUnavailable, InvalidToken, LoginRefused
from arbiter.settings import ConsoleLoginConfig, IssuerConfig, Settings

CALLBACK = "/console/oidc/callback"
PENDING_MAX_AGE_S = 600  # a login not finished within this is started again
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Provider:
    index: int  # its place among the console's providers: what the login link and the cookie name
    issuer: IssuerConfig
    login: ConsoleLoginConfig

    @property
    def label(self) -> str:
        return self.login.label or urlsplit(self.issuer.issuer).hostname or self.issuer.issuer


@dataclass(frozen=True)
class Pending:
    """A login under way: what the callback must match. Kept server-side (console/oidc_pending.py); the
    browser holds only a random id for it."""

    provider: int
    state: str
    nonce: str
    verifier: str
    started: float


@dataclass(frozen=True)
class LoggedIn:
    principal: Principal
    expires_at: float  # the ID token's exp: the session ends then at the latest


def redirect_uri(settings: Settings) -> str:
    """``<origin>/console/oidc/callback``: console.public_url, else auth.resource_url's origin, else
    http://host:port."""
    origin = settings.console.public_url
    if origin is None and settings.auth.resource_url:
        parts = urlsplit(resource_url(settings))
        origin = f"{parts.scheme}://{parts.netloc}"
    return f"{origin or f'http://{settings.host}:{settings.port}'}{CALLBACK}"


class OidcClient:
    def __init__(
        self,
        settings: Settings,
        verifier: JwtVerifier,
        transport: httpx2.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        with_login = [i for i in settings.auth.issuers if i.console is not None]
        self.providers = [
            Provider(n, i, cast(ConsoleLoginConfig, i.console)) for n, i in enumerate(with_login)
        ]
        self.redirect_uri = redirect_uri(settings)
        self._verifier = verifier
        self._transport = transport
        self._clock = clock
        self._endpoints: dict[int, tuple[str, str]] = {}  # provider -> (authorization, token); successes only

    def provider(self, index: int) -> Provider:
        if not 0 <= index < len(self.providers):
            raise BadLoginCallback("no such identity provider; start the login again")
        return self.providers[index]

    async def start(self, provider: Provider) -> tuple[str, Pending]:
        """Where to send the browser, and what the callback must match."""
        authorize, _ = await self._discover(provider)
        pending = Pending(
            provider.index,
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),  # PKCE: 43 to 128 characters (RFC 7636)
            self._clock(),
        )
        async with self._client(provider) as client:
            url, _ = client.create_authorization_url(
                authorize, state=pending.state, code_verifier=pending.verifier, nonce=pending.nonce
            )
        return cast(str, url), pending

    async def finish(self, pending: Pending | None, params: dict[str, str]) -> LoggedIn:
        """Check the callback against the pending login, redeem the code, and verify the ID token."""
        if pending is None or self._clock() - pending.started > PENDING_MAX_AGE_S:
            raise BadLoginCallback("this login was not started here, or took too long; start it again")
        provider = self.provider(pending.provider)
        state = params.get("state", "")
        if not hmac.compare_digest(state.encode(), pending.state.encode()):
            raise BadLoginCallback(
                "the login's state does not match (a forged or stale answer); start it again"
            )
        error = params.get("error")
        if error is not None:
            raise LoginRefused(f"the identity provider refused the login ({_error_code(error)})")
        code = params.get("code")
        if not code:
            raise BadLoginCallback("the identity provider's answer holds no authorization code")
        _, token_endpoint = await self._discover(provider)
        id_token = await self._redeem(provider, token_endpoint, code, pending.verifier)
        try:
            principal, claims = await self._verifier.verify_id_token(
                id_token, provider.issuer.issuer, provider.login.client_id
            )
        except InvalidToken as exc:
            raise LoginRefused(f"the identity provider's ID token was not accepted: {exc.message}") from None
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), pending.nonce.encode()):
            raise LoginRefused("the identity provider's ID token was not accepted: wrong nonce")
        return LoggedIn(principal, float(cast(float, claims["exp"])))

    def _client(self, provider: Provider) -> Any:
        # Authlib is untyped. Without a secret, a public client: PKCE alone proves the code is ours.
        secret = provider.login.client_secret
        return AsyncOAuth2Client(
            client_id=provider.login.client_id,
            client_secret=secret.get_secret_value() if secret is not None else None,
            token_endpoint_auth_method="client_secret_basic" if secret is not None else "none",
            scope=" ".join(provider.login.scopes),
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            timeout=_TIMEOUT_S,
            follow_redirects=False,
            transport=self._transport,
        )

    async def _redeem(self, provider: Provider, token_endpoint: str, code: str, verifier: str) -> str:
        try:
            async with self._client(provider) as client:
                token: Any = await client.fetch_token(
                    token_endpoint, grant_type="authorization_code", code=code, code_verifier=verifier
                )
        except OAuthError as exc:
            error = _error_code(str(cast(Any, exc).error))
            raise LoginRefused(f"the identity provider refused the authorization code ({error})") from None
        except httpx2.HTTPStatusError as exc:
            raise IdentityProviderUnavailable(
                f"the token endpoint answered HTTP {exc.response.status_code}"
            ) from None
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            raise IdentityProviderUnavailable(
                f"the token endpoint could not be reached ({type(exc).__name__})"
            ) from None
        id_token = cast(dict[str, object], token).get("id_token") if isinstance(token, dict) else None
        if not isinstance(id_token, str) or not id_token:
            raise LoginRefused("the identity provider's answer holds no ID token (is `openid` a scope?)")
        return id_token

    async def _discover(self, provider: Provider) -> tuple[str, str]:
        """The provider's authorization and token endpoints, from its discovery document (cached)."""
        found = self._endpoints.get(provider.index)
        if found is not None:
            return found
        url = provider.login.discovery_url or (
            provider.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        try:
            async with httpx2.AsyncClient(
                timeout=_TIMEOUT_S, follow_redirects=False, transport=self._transport
            ) as http:
                resp = await http.get(url, headers={"accept": "application/json"})
            doc: object = resp.json() if resp.status_code == 200 else None
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            raise IdentityProviderUnavailable(
                f"the discovery document could not be read ({type(exc).__name__})"
            ) from None
        if not isinstance(doc, dict):
            raise IdentityProviderUnavailable(
                f"the discovery document could not be read (HTTP {resp.status_code})"
            )
        meta = cast(dict[str, object], doc)
        authorize, token = meta.get("authorization_endpoint"), meta.get("token_endpoint")
        # OIDC Discovery 4.3: the document must name the very issuer it was asked for.
        if meta.get("issuer") != provider.issuer.issuer:
            raise IdentityProviderUnavailable("the discovery document names another issuer")
        if not (
            isinstance(authorize, str)
            and isinstance(token, str)
            and _http_url(authorize)
            and _http_url(token)
        ):
            raise IdentityProviderUnavailable(
                "the discovery document lacks its authorization or token endpoint"
            )
        self._endpoints[provider.index] = (authorize, token)
        return authorize, token


def _error_code(text: str) -> str:
    """An OAuth error code as a page may show it: the code's characters only, never free text."""
    return "".join(c for c in text[:64] if c.isalnum() or c in "_-.")


def _http_url(url: str) -> bool:
    return urlsplit(url).scheme in ("https", "http") and bool(urlsplit(url).netloc)
