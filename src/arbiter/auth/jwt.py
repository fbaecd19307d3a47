"""OAuth 2.1 JWT access tokens (RFC 9068), verified with joserfc against each issuer's own JWKS.

Hardening follows RFC 8725: keys come only from the configured ``jwks_uri`` (never from token headers),
algorithms come from a per-issuer allowlist of asymmetric algorithms, and ``exp`` and ``aud`` are required.
Rejections carry a short reason; neither the token nor claim values ever reach a message or a log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httpx
from cachetools import FIFOCache
from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError, MissingClaimError
from joserfc.jwk import DictKey, JWKRegistry, Key

from arbiter.auth.principal import Principal
from arbiter.errors import InvalidToken
from arbiter.settings import AuthSettings, IssuerConfig

log = logging.getLogger(__name__)

# A token naming its own key (by value or by URL) could pick the key that verifies it (RFC 8725 §3.10).
_KEY_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c"})
# JWTs never use unencoded payloads (RFC 7797), and we implement no critical header extension.
_UNSUPPORTED_HEADERS = frozenset({"b64", "crit"})
_MAX_TOKEN_CHARS = 64 * 1024
_CLAIM_REASONS = {"aud": "wrong audience", "nbf": "token not yet valid", "iat": "token issued in the future"}
# Only well-known header names are checked for type; IdPs add their own (e.g. Entra's x5t, nonce).
_PARSER = jws.JWSRegistry(strict_check_header=False)
# joserfc's 512-byte header cap would hide *why* a header with an embedded key is refused.
_PARSER.max_header_length = 4096


# Tokens whose signature was checked, remembered by digest (see ``JwtVerifier.verify``): agents in use at
# once, not tokens ever seen; each entry holds the token's claims, about a kilobyte.
_VERIFIED_MAX = 4096


class _JwksUnavailable(Exception):
    """A JWKS fetch failed; the message is safe to log (no response body)."""


@dataclass
class _Issuer:
    """One trusted issuer with its key cache; ``generation`` counts finished fetch attempts."""

    config: IssuerConfig
    keys: dict[str, Key] = field(default_factory=dict[str, Key])
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = 0
    last_attempt: float | None = None
    last_failed: bool = False

    def __post_init__(self) -> None:
        self.registry = jws.JWSRegistry(algorithms=self.config.algorithms, strict_check_header=False)
        self.types = frozenset(t.lower() for t in self.config.access_token_types)

    def find(self, kid: str | None) -> Key | None:
        if kid is None:
            # Without a kid only an unambiguous key set can answer.
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)


@dataclass(frozen=True)
class _Verified:
    """A token whose signature ``key`` of ``issuer`` verified, and what it said."""

    issuer: _Issuer
    kid: str | None
    key: Key
    claims: dict[str, object]
    principal: Principal


class JwtVerifier:
    """Turns a JWT access token from a configured issuer into a :class:`Principal`."""

    def __init__(
        self,
        auth: AuthSettings,
        resource_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._resource_url = resource_url
        self._clock = clock
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=auth.jwks_timeout_s, follow_redirects=False)
        self._issuers = {c.issuer: _Issuer(c) for c in auth.issuers}
        self._verified: FIFOCache[bytes, _Verified] = FIFOCache(_VERIFIED_MAX)

    def accepts(self, token: str) -> bool:
        """Whether ``token`` looks like a JWS whose (unverified) ``iss`` is a configured issuer."""
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2:
            return False
        segment = token.split(".")[1]
        try:
            claims: object = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except ValueError:
            return False
        if not isinstance(claims, dict):
            return False
        # Untrusted input: `iss` may be any JSON value, and a list or object is not even hashable.
        iss = cast(dict[str, object], claims).get("iss")
        return isinstance(iss, str) and iss in self._issuers

    async def verify(self, token: str) -> Principal:
        """Verify signature and claims; raise :class:`InvalidToken` with a short reason on any failure.

        An agent sends the same token with every call until it expires, and checking its signature
        (ES256: about 0.2 ms) was a sixth of a governed call's CPU. A token whose signature was checked is
        remembered by its SHA-256, with the key that checked it: while that issuer still holds that very
        key (a JWKS refresh makes new key objects, so a rotated or removed key never vouches again) only
        the claims are checked again, against the clock (expiry, not-before, audience).
        """
        digest = hashlib.sha256(token.encode()).digest()
        seen = self._verified.get(digest)
        if seen is not None and seen.issuer.find(seen.kid) is seen.key:
            config = seen.issuer.config
            self._check_claims(seen.claims, config, config.audiences or [self._resource_url])
            return seen.principal
        obj, header, claims = _parse(token)
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("unknown issuer")
        alg = header["alg"]
        if alg not in issuer.config.algorithms:
            raise InvalidToken("algorithm not allowed")
        typ = header.get("typ")
        if typ is not None and typ.lower() not in issuer.types:
            raise InvalidToken("wrong token type")
        key = await self._check_signature(issuer, obj, header)
        self._check_claims(claims, issuer.config, issuer.config.audiences or [self._resource_url])
        principal = _principal(claims, issuer.config)
        self._verified[digest] = _Verified(issuer, header.get("kid"), key, claims, principal)
        return principal

    async def verify_id_token(
        self, token: str, issuer_name: str, client_id: str
    ) -> tuple[Principal, dict[str, object]]:
        """An OpenID Connect ID token for the console (OIDC Core 3.1.3.7): from ``issuer_name``, signed with a
        key of that issuer's JWKS, for ``client_id``, unexpired. Returns the principal its claims map to (the
        mapping access tokens use) and the claims: the caller checks the ``nonce``, which it alone knows."""
        obj, header, claims = _parse(token)
        issuer = self._issuers.get(issuer_name)
        if issuer is None or claims.get("iss") != issuer_name:
            raise InvalidToken("wrong issuer")
        if header["alg"] not in issuer.config.algorithms:
            raise InvalidToken("algorithm not allowed")
        typ = header.get("typ")
        if typ is not None and typ.lower() in issuer.types:  # an access token is not an ID token
            raise InvalidToken("wrong token type")
        await self._check_signature(issuer, obj, header)
        self._check_claims(claims, issuer.config, [client_id])
        aud, azp = claims.get("aud"), claims.get("azp")
        if isinstance(aud, list) and len(cast(list[object], aud)) > 1 and azp != client_id:
            raise InvalidToken("wrong authorized party")
        return _principal(claims, issuer.config), claims

    async def _check_signature(
        self, issuer: _Issuer, obj: jws.CompactSignature, header: dict[str, str]
    ) -> Key:
        """The key that verified the token's signature."""
        key = await self._key(issuer, header.get("kid"))
        try:
            valid = jws.validate_compact(obj, key, registry=issuer.registry)
        except JoseError:
            # The key's kty, curve, `alg` or `use` does not fit the token's algorithm.
            raise InvalidToken("signing key does not match algorithm") from None
        if not valid:
            raise InvalidToken("bad signature")
        return key

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _check_claims(self, claims: dict[str, object], config: IssuerConfig, audiences: list[str]) -> None:
        for name in ("exp", "aud"):
            if claims.get(name) is None:
                raise InvalidToken(f"missing {name} claim")
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and not _is_numeric_date(value):
                raise InvalidToken(f"invalid {name} claim")
        registry = jwt.JWTClaimsRegistry(
            now=int(self._clock()),
            leeway=self._auth.leeway_s,
            iss={"essential": True, "value": config.issuer},
            aud={"essential": True, "values": audiences},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise InvalidToken("token expired") from None
        except MissingClaimError as exc:
            raise InvalidToken(f"missing {exc.claim} claim") from None
        except ClaimError as exc:
            # `exc.claim` is a registered claim name, never a value.
            raise InvalidToken(_CLAIM_REASONS.get(exc.claim, f"invalid {exc.claim} claim")) from None

    async def _key(self, issuer: _Issuer, kid: str | None) -> Key:
        key = issuer.find(kid)
        if key is not None:
            return key
        seen = issuer.generation
        try:
            # Queued requests wait for the one fetch in flight (bounded by its own timeout) and then reuse it.
            async with asyncio.timeout(2 * self._auth.jwks_timeout_s + 1), issuer.lock:
                if issuer.generation == seen and self._may_refresh(issuer):
                    await self._refresh(issuer)
        except TimeoutError:
            raise InvalidToken("signing keys unavailable") from None
        key = issuer.find(kid)
        if key is None:
            raise InvalidToken("signing keys unavailable" if issuer.last_failed else "unknown signing key")
        return key

    def _may_refresh(self, issuer: _Issuer) -> bool:
        last = issuer.last_attempt
        return last is None or self._clock() - last >= self._auth.jwks_refresh_cooldown_s

    async def _refresh(self, issuer: _Issuer) -> None:
        issuer.last_attempt, uri = self._clock(), issuer.config.jwks_uri
        try:
            issuer.keys = await self._fetch(uri)
            issuer.last_failed = False
            log.info("loaded %d signing keys for issuer %s", len(issuer.keys), issuer.config.issuer)
        except _JwksUnavailable as exc:
            # Cached keys stay in use; only tokens needing a new key are refused until a fetch succeeds.
            issuer.last_failed = True
            log.warning("JWKS fetch from %s failed (%s); keeping %d cached keys", uri, exc, len(issuer.keys))
        finally:
            issuer.generation += 1

    async def _fetch(self, uri: str) -> dict[str, Key]:
        timeout = self._auth.jwks_timeout_s
        try:
            async with asyncio.timeout(timeout):
                resp = await self._http.get(uri, timeout=timeout, headers={"accept": "application/json"})
        except TimeoutError:
            raise _JwksUnavailable(f"timed out after {timeout}s") from None
        except httpx.HTTPError as exc:
            raise _JwksUnavailable(type(exc).__name__) from None
        if resp.status_code != 200:
            raise _JwksUnavailable(f"HTTP {resp.status_code}")
        try:
            doc: object = resp.json()
        except ValueError:
            raise _JwksUnavailable("response is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(cast(dict[str, object], doc).get("keys"), list):
            raise _JwksUnavailable("response is not a JWK set")
        return _signing_keys(cast(list[object], cast(dict[str, object], doc)["keys"]))


def _parse(token: str) -> tuple[jws.CompactSignature, dict[str, str], dict[str, object]]:
    if not token or len(token) > _MAX_TOKEN_CHARS:
        raise InvalidToken("malformed token")
    try:
        obj = jws.extract_compact(token.encode(), registry=_PARSER)
        header = cast(object, obj.headers())
        # joserfc accepts any JSON value with "alg" in it as a header; only an object is one.
        if not isinstance(header, dict):
            raise InvalidToken("malformed token")
        names = cast(dict[str, object], header).keys()
        if names & _KEY_HEADERS:
            raise InvalidToken("key headers not accepted")
        if names & _UNSUPPORTED_HEADERS:
            raise InvalidToken("unsupported token header")
        _PARSER.check_header(cast(dict[str, object], header))
        claims: object = json.loads(obj.payload)
    except (JoseError, ValueError, TypeError):
        raise InvalidToken("malformed token") from None
    if not isinstance(claims, dict):
        raise InvalidToken("malformed token")
    # check_header proved alg, kid and typ (when present) are strings.
    return obj, cast(dict[str, str], header), cast(dict[str, object], claims)


def _signing_keys(items: list[object]) -> dict[str, Key]:
    keys: dict[str, Key] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        data = cast(dict[str, object], item)
        ops = data.get("key_ops")
        if data.get("use", "sig") != "sig" or (isinstance(ops, list) and "verify" not in ops):
            continue
        if data.get("kty") == "oct":  # a shared secret is never a verification key here
            continue
        try:
            key = JWKRegistry.import_key(cast(DictKey, data))
            key.ensure_kid()
        except (JoseError, ValueError, TypeError, KeyError):
            log.warning("ignoring a JWKS entry that is not a valid key (kty=%s)", data.get("kty"))
            continue
        keys[cast(str, key.kid)] = key
    return keys


def _is_numeric_date(value: object) -> bool:
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    )


def _lookup(claims: dict[str, object], path: str) -> object:
    """A claim by exact name (e.g. a namespaced URL claim), else by dotted path into nested objects."""
    if path in claims:
        return claims[path]
    node: object = claims
    for part in path.split("."):
        node = _child(node, part)
    return node


def _child(node: object, name: str) -> object:
    return cast(dict[str, object], node).get(name) if isinstance(node, dict) else None


def _names(value: object, what: str, *, commas: bool) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset((value.replace(",", " ") if commas else value).split())
    if isinstance(value, list) and all(isinstance(v, str) for v in cast(list[object], value)):
        return frozenset(v.strip() for v in cast(list[str], value) if v.strip())
    raise InvalidToken(f"invalid {what} claim")


def _principal(claims: dict[str, object], config: IssuerConfig) -> Principal:
    subject = _lookup(claims, config.subject_claim)
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("missing subject claim")
    tenant = _lookup(claims, config.tenant_claim) if config.tenant_claim else None
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidToken("invalid tenant claim")
    client_ids = (_lookup(claims, name) for name in (config.client_id_claim, "azp", "client_id"))
    return Principal(
        subject=subject,
        issuer=config.issuer,
        auth_method="jwt",
        tenant=tenant or None,
        roles=_names(_lookup(claims, config.roles_claim), "roles", commas=True),
        scopes=_names(_lookup(claims, config.scope_claim), "scope", commas=False),
        client_id=next((c for c in client_ids if isinstance(c, str) and c), None),
    )
