"""Arbiter's own credential towards an upstream: none, a static header, OAuth 2.0 client credentials, or
RFC 8693 token exchange of the caller's access token.

The caller's credential never goes upstream: upstream requests are built by Arbiter's own HTTP client,
and the only caller-derived thing that can leave is a token the authorization server minted for the
upstream in exchange for the caller's. Secrets and tokens live in memory only as long as the upstream
client using them; no message this module produces contains one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import anyio
import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from pydantic import SecretStr

from arbiter.auth.secrets import CredentialUnavailable, SecretBox, SecretRef
from arbiter.errors import ArbiterError, RequestRejected, UpstreamUnavailable
from arbiter.net.egress import Egress, EgressRefused
from arbiter.settings import TOKEN_TYPE_ACCESS, CredentialConfig

log = logging.getLogger(__name__)

CredentialKind = Literal["none", "header", "client_credentials", "token_exchange"]
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
# A token without expires_in is used until the upstream refuses it, but never longer than this.
_MAX_TOKEN_LIFETIME_S = 3600.0
_INVALID_HEADER_CHARS = frozenset(chr(c) for c in (*range(0x20), 0x7F))
# Token-endpoint errors that are about the caller's token, not Arbiter's set-up (RFC 6749, RFC 8693).
_CALLER_REFUSALS = frozenset({"invalid_grant", "invalid_target", "access_denied", "invalid_scope"})


class UpstreamAuthFailed(UpstreamUnavailable):
    """Arbiter could not obtain its credential for an upstream (token endpoint down or refusing it)."""

    code = "upstream_auth_failed"


class CallerTokenRequired(RequestRejected):
    """A token-exchange upstream was called by a principal without an OAuth access token (an API key)."""

    code = "caller_token_required"


class TokenExchangeRefused(RequestRejected):
    """The authorization server would not exchange this caller's token for the upstream."""

    code = "token_exchange_refused"


def header_safe(value: str) -> bool:
    """Whether ``value`` can be sent as an HTTP header value (latin-1, no control characters)."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not _INVALID_HEADER_CHARS.intersection(value)


@dataclass(frozen=True)
class CredentialSpec:
    """One upstream's credential as stored: non-secret settings plus where its one secret comes from."""

    kind: CredentialKind = "none"
    secret: SecretRef | None = None  # the header value, or the OAuth client secret
    header: str = "Authorization"
    token_url: str | None = None
    client_id: str | None = None
    scope: str | None = None
    audience: str | None = None
    resource: str | None = None
    auth_method: str = "client_secret_basic"
    subject_token_type: str = TOKEN_TYPE_ACCESS
    requested_token_type: str | None = TOKEN_TYPE_ACCESS

    @property
    def secret_field(self) -> str:
        return "value" if self.kind == "header" else "client_secret"

    @property
    def per_caller(self) -> bool:
        return self.kind == "token_exchange"

    @property
    def oauth(self) -> bool:
        return self.kind in ("client_credentials", "token_exchange")

    def public(self) -> dict[str, str | None]:
        """What an admin may see: kind, non-secret fields, and where the secret comes from (not its value)."""
        out: dict[str, str | None] = {"kind": self.kind}
        if self.kind == "header":
            out["header"] = self.header
        if self.oauth:
            out.update(
                token_url=self.token_url,
                client_id=self.client_id,
                scope=self.scope,
                audience=self.audience,
                resource=self.resource,
                auth_method=self.auth_method,
            )
        if self.kind == "token_exchange":
            out.update(
                subject_token_type=self.subject_token_type, requested_token_type=self.requested_token_type
            )
        if self.secret is not None:
            out["secret_source"] = self.secret.source
            if self.secret.env is not None:
                out[f"{self.secret_field}_env"] = self.secret.env
        return out

    def to_json(self) -> dict[str, str | None] | None:
        """The ``upstreams.credential`` column: only a Fernet token or a variable name for the secret."""
        if self.kind == "none":
            return None
        data = {
            k: v
            for k, v in self.public().items()
            if k != "secret_source" and (v is not None or k == "requested_token_type")
        }
        if self.secret is not None and self.secret.sealed is not None:
            data[f"{self.secret_field}_sealed"] = self.secret.sealed
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> CredentialSpec:
        if not data or data.get("kind", "none") == "none":
            return cls()
        kind = cast(CredentialKind, data["kind"])
        name = "value" if kind == "header" else "client_secret"
        env, sealed = data.get(f"{name}_env"), data.get(f"{name}_sealed")
        fields = {k: v for k, v in data.items() if k in _PLAIN_FIELDS}
        secret = SecretRef(env=env, sealed=sealed) if env or sealed else None
        return cls(kind=kind, secret=secret, **fields)

    @classmethod
    def from_config(cls, cfg: CredentialConfig) -> CredentialSpec:
        if cfg.kind == "none":
            return cls()
        if cfg.kind == "header":
            return cls(kind="header", header=cfg.header, secret=SecretRef(env=cfg.value_env))
        fields = cfg.model_dump(exclude={"kind", "client_secret_env"})
        return cls(kind=cfg.kind, secret=SecretRef(env=cfg.client_secret_env), **fields)


_PLAIN_FIELDS = frozenset(
    {
        "header",
        "token_url",
        "client_id",
        "scope",
        "audience",
        "resource",
        "auth_method",
        "subject_token_type",
        "requested_token_type",
    }
)


@dataclass
class _Token:
    value: str = field(repr=False)
    refresh_at: float  # on the source's clock


@dataclass
class TokenSource:
    """Gets an access token from the token endpoint and keeps it until shortly before it expires.

    Concurrent requests that find no fresh token share one fetch (the lock); a token the upstream
    refused is replaced once, however many requests saw the refusal.
    """

    upstream: str
    spec: CredentialSpec
    box: SecretBox
    timeout_s: float
    clock: Callable[[], float] = time.monotonic
    subject: SecretStr | None = None  # token exchange: the caller's token
    egress: Egress | None = None  # checks the token endpoint's addresses on every connection
    _token: _Token | None = field(default=None, init=False, repr=False)
    _lock: anyio.Lock = field(default_factory=anyio.Lock, init=False, repr=False)

    def current(self) -> str | None:
        token = self._token
        return token.value if token is not None and self.clock() < token.refresh_at else None

    def latest(self) -> str | None:
        """The token last fetched, fresh or not (``get`` checked it just before the request)."""
        return self._token.value if self._token is not None else None

    async def get(self) -> str:
        fresh = self.current()
        if fresh is not None:
            return fresh
        async with self._lock:
            fresh = self.current()
            if fresh is None:
                self._token = await self._fetch()
                fresh = self._token.value
            return fresh

    async def renew(self, refused: str) -> str:
        async with self._lock:
            if self._token is not None and self._token.value == refused:
                self._token = None
        return await self.get()

    async def _fetch(self) -> _Token:
        spec = self.spec
        assert spec.token_url is not None and spec.secret is not None
        params: dict[str, str] = {
            k: v
            for k, v in (("audience", spec.audience), ("resource", spec.resource), ("scope", spec.scope))
            if v
        }
        grant = "client_credentials"
        if self.subject is not None:
            grant = GRANT_TOKEN_EXCHANGE
            params["subject_token"] = self.subject.get_secret_value()
            params["subject_token_type"] = spec.subject_token_type
            if spec.requested_token_type:
                params["requested_token_type"] = spec.requested_token_type
        started = self.clock()
        try:
            secret = spec.secret.reveal(self.box)
            # Authlib is untyped; this client only ever posts to the token endpoint. One per fetch: the
            # secret is held no longer than the request, and fetches are rare (once per token lifetime).
            client: Any = AsyncOAuth2Client(
                client_id=spec.client_id,
                client_secret=secret,
                token_endpoint_auth_method=spec.auth_method,
                timeout=self.timeout_s,
                follow_redirects=False,
                transport=self._transport(),
            )
            try:
                with anyio.fail_after(self.timeout_s):
                    fetched: Any = await client.fetch_token(spec.token_url, grant_type=grant, **params)
            finally:
                await client.aclose()
        except CredentialUnavailable as exc:
            raise self._failed(exc.message) from None
        except OAuthError as exc:
            error = str(cast(Any, exc).error)[:64]  # the code only: descriptions may quote the request
            if self.subject is not None and error in _CALLER_REFUSALS:
                raise TokenExchangeRefused(
                    f"the authorization server refused to exchange the caller's token for upstream "
                    f"{self.upstream!r} ({error})",
                    upstream=self.upstream,
                ) from None
            raise self._failed(f"the token endpoint answered {error}") from None
        except httpx2.HTTPStatusError as exc:
            raise self._failed(f"the token endpoint answered HTTP {exc.response.status_code}") from None
        except TimeoutError:
            raise self._failed(f"the token endpoint did not answer within {self.timeout_s:g}s") from None
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            if isinstance(exc.__cause__, EgressRefused):  # httpx2 keeps the connect hook's error as cause
                raise self._failed(f"the token endpoint's address is refused: {exc.__cause__}") from None
            raise self._failed(f"the token endpoint could not be reached ({type(exc).__name__})") from None
        return self._parse(fetched, started)

    def _transport(self) -> httpx2.AsyncBaseTransport | None:
        if self.egress is None:
            return None
        return self.egress.backend(f"upstream {self.upstream} token endpoint").transport()

    def _parse(self, fetched: Any, started: float) -> _Token:
        token: Mapping[str, Any] = cast(Mapping[str, Any], fetched) if isinstance(fetched, Mapping) else {}
        value = token.get("access_token")
        if not isinstance(value, str) or not value or not header_safe(value):
            raise self._failed("the token endpoint's answer holds no usable access_token")
        expires_in = token.get("expires_in")
        lifetime = _MAX_TOKEN_LIFETIME_S
        if isinstance(expires_in, int | float | str):
            with contextlib.suppress(ValueError):
                lifetime = min(max(float(expires_in), 0.0), _MAX_TOKEN_LIFETIME_S)
        # Renew a little early, so a token does not expire between our check and the upstream's.
        margin = min(30.0, lifetime * 0.1)
        log.info(
            "upstream %s: got an access token (%s, valid %gs)",
            self.upstream,
            "token exchange" if self.subject is not None else "client credentials",
            lifetime,
        )
        return _Token(value, started + lifetime - margin)

    def _failed(self, why: str) -> UpstreamAuthFailed:
        return UpstreamAuthFailed(
            f"Arbiter could not get its credential for upstream {self.upstream!r}: {why}",
            upstream=self.upstream,
        )


class OutboundAuth(httpx2.Auth):
    """Adds Arbiter's credential to every request of one upstream client; retries once on a 401.

    ``ready()`` runs in the caller's task before each request, so a token endpoint failure reaches the
    caller as a clean error. The auth flow itself runs inside the MCP transport's task, where an
    exception would tear the connection down: there a failure only leaves the request unauthenticated,
    and the upstream's refusal becomes that one request's error.
    """

    def __init__(
        self, upstream: str, spec: CredentialSpec, box: SecretBox, tokens: TokenSource | None = None
    ) -> None:
        self.upstream = upstream
        self._spec = spec
        self._box = box
        self._tokens = tokens
        self._value: str | None = None
        self.last_status: int | None = None  # the upstream's last answer, so 401/403 can be reported

    async def ready(self) -> None:
        if self._tokens is not None:
            await self._tokens.get()
        elif self._value is None and self._spec.secret is not None:
            try:
                value = self._spec.secret.reveal(self._box)
            except CredentialUnavailable as exc:
                raise UpstreamAuthFailed(
                    f"Arbiter's credential for upstream {self.upstream!r} is unavailable: {exc.message}",
                    upstream=self.upstream,
                ) from None
            if not header_safe(value):
                raise UpstreamAuthFailed(
                    f"Arbiter's credential for upstream {self.upstream!r} is not a valid header value",
                    upstream=self.upstream,
                )
            self._value = value

    def headers(self) -> dict[str, str]:
        """The credential's header for a request sent without httpx2 (the relay); ``ready()`` ran first."""
        if self._tokens is None:
            return {self._spec.header: self._value} if self._value is not None else {}
        token = self._tokens.latest()
        return {"Authorization": f"Bearer {token}"} if token is not None else {}

    async def renewed(self, sent: dict[str, str]) -> dict[str, str] | None:
        """After a 401 to a request sent with ``sent``: a new token's header to retry with once, or None."""
        token = sent.get("Authorization", "").removeprefix("Bearer ")
        if self._tokens is None or not token:
            return None
        tokens = self._tokens
        fresh = await self._quietly(lambda: tokens.renew(token))
        if fresh is None or fresh == token:
            return None
        log.info("upstream %s refused Arbiter's token; retrying once with a new one", self.upstream)
        return {"Authorization": f"Bearer {fresh}"}

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response]:
        raise RuntimeError("upstream clients are asynchronous")

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        tokens = self._tokens
        if tokens is None:
            if self._value is not None:
                request.headers[self._spec.header] = self._value
            response = yield request
            self.last_status = response.status_code
            return
        token = tokens.latest() or await self._quietly(tokens.get)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and token is not None:
            # The upstream may have revoked the token or hold a shorter lifetime than the IdP said.
            fresh = await self._quietly(lambda: tokens.renew(token))
            if fresh is not None and fresh != token:
                log.info("upstream %s refused Arbiter's token; retrying once with a new one", self.upstream)
                request.headers["Authorization"] = f"Bearer {fresh}"
                response = yield request
        self.last_status = response.status_code

    async def _quietly(self, get: Callable[[], Awaitable[str]]) -> str | None:
        try:
            return await get()
        except ArbiterError as exc:
            log.warning("upstream %s: %s", self.upstream, exc.message)
            return None


class Outbound:
    """Builds the credential of each upstream client from its spec."""

    def __init__(
        self,
        box: SecretBox,
        *,
        token_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        egress: Egress | None = None,
    ) -> None:
        self.box = box
        self._timeout = token_timeout_s
        self._clock = clock
        self.egress = egress  # the connect hook of token endpoint requests (None: httpx2's own)

    def shared(self, upstream: str, spec: CredentialSpec) -> OutboundAuth | None:
        """The credential of the pooled client. A token-exchange upstream's pooled client serves only
        discovery, which has no caller: it uses Arbiter's own client-credentials token instead."""
        if spec.kind == "none":
            return None
        if spec.kind == "header":
            return OutboundAuth(upstream, spec, self.box)
        return OutboundAuth(upstream, spec, self.box, self._source(upstream, spec, None))

    def for_caller(self, upstream: str, spec: CredentialSpec, subject: SecretStr) -> OutboundAuth:
        """A token-exchange credential for one caller's session."""
        return OutboundAuth(upstream, spec, self.box, self._source(upstream, spec, subject))

    def _source(self, upstream: str, spec: CredentialSpec, subject: SecretStr | None) -> TokenSource:
        return TokenSource(upstream, spec, self.box, self._timeout, self._clock, subject, self.egress)
