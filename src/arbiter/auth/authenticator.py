"""Turn a request's bearer credential into a ``Principal``: Arbiter API keys or OAuth 2.1 JWTs.

Also builds the RFC 6750 / RFC 9728 challenges a refused request gets, so ``/mcp`` and the admin API
answer the same way.
"""

from __future__ import annotations

import hmac
import logging
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from arbiter.auth import apikeys
from arbiter.auth.apikeys import ApiKeys
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError, InsufficientScope, InvalidToken, Unauthorized
from arbiter.settings import Settings

log = logging.getLogger(__name__)

# Query parameters that would carry a credential; RFC 9700 / the MCP spec forbid tokens in URLs.
_QUERY_CREDENTIALS = frozenset({"access_token", "token", "api_key", "apikey", "key"})
WELL_KNOWN = "/.well-known/oauth-protected-resource"


class TokenVerifier(Protocol):
    def accepts(self, token: str) -> bool: ...

    async def verify(self, token: str) -> Principal: ...


class MissingCredentials(Unauthorized):
    code = "missing_credentials"


class CredentialInQuery(ArbiterError):
    code = "invalid_request"
    http_status = 400


def resource_url(settings: Settings) -> str:
    """The canonical URL of /mcp: what tokens must name as their audience (RFC 8707)."""
    return settings.auth.resource_url or f"http://{settings.host}:{settings.port}/mcp"


def metadata_url(resource: str) -> str:
    """RFC 9728: the metadata of ``https://h/mcp`` lives at ``https://h/.well-known/oauth-protected-resource/mcp``."""
    parts = urlsplit(resource)
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}"


class Authenticator:
    def __init__(self, settings: Settings, keys: ApiKeys, jwt: TokenVerifier | None) -> None:
        self._settings = settings
        self._keys = keys
        self._jwt = jwt
        self._required_scopes = frozenset(settings.auth.required_scopes)
        self.resource = resource_url(settings)
        self.metadata = metadata_url(self.resource)

    async def authenticate(self, authorization: str | None, query_string: bytes = b"") -> Principal:
        if query_string and any(k.lower() in _QUERY_CREDENTIALS for k, _ in parse_qsl(query_string.decode())):
            raise CredentialInQuery(
                "credentials in the query string are not accepted; use the Authorization header"
            )
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MissingCredentials("authentication required: send Authorization: Bearer <token>")
        if token.startswith(apikeys.PREFIX):
            return self._keys.verify(token)
        if self._jwt is not None and self._jwt.accepts(token):
            principal = await self._jwt.verify(token)
            missing = self._required_scopes - principal.scopes
            if missing:
                raise InsufficientScope(f"the token lacks required scope(s): {' '.join(sorted(missing))}")
            return principal
        raise InvalidToken("unrecognised credential")

    def break_glass(self, authorization: str | None, where: str) -> Principal | None:
        """The bootstrap admin token, if configured and presented; every use is logged."""
        configured = self._settings.admin_token
        scheme, _, token = (authorization or "").partition(" ")
        if configured is None or scheme.lower() != "bearer" or not token:
            return None
        if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
            return None
        log.warning("break-glass admin token used for %s", where)
        return Principal(
            subject="break-glass",
            issuer=apikeys.ISSUER,
            auth_method="break_glass",
            roles=frozenset(self._settings.auth.admin_roles),
        )

    def challenge(self, exc: ArbiterError) -> str:
        """The ``WWW-Authenticate`` value for a refused request."""
        parts = [f'resource_metadata="{self.metadata}"']
        if self._required_scopes:
            parts.append(f'scope="{" ".join(sorted(self._required_scopes))}"')
        if isinstance(exc, InsufficientScope):
            parts.append('error="insufficient_scope"')
        elif isinstance(exc, CredentialInQuery):
            parts.append('error="invalid_request"')
        elif isinstance(exc, InvalidToken):
            parts.append('error="invalid_token"')
        if not isinstance(exc, MissingCredentials):
            parts.append(f'error_description="{exc.message}"')
        return "Bearer " + ", ".join(parts)
