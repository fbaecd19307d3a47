"""The one settings object. Only this module reads the environment (prefix ``ARBITER_``, nested ``__``)."""

from __future__ import annotations

import os
import re
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from cryptography.fernet import Fernet
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

UPSTREAM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./arbiter.db"

Transport = Literal["streamable_http", "sse", "stdio"]

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# RFC 9110 field-name token; the names below belong to HTTP itself or to the MCP transport.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "accept",
        "last-event-id",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
    }
)
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def env_secret(name: str) -> str | None:
    """The value of the environment variable an upstream credential references (None when unset/empty).

    Upstream secrets may live in the environment rather than in Arbiter's database; this is the one
    place that reads them, and the value is handed straight to the outbound credential.
    """
    return os.environ.get(name) or None


def _env_name(v: str) -> str:
    if not ENV_NAME_RE.match(v):
        raise ValueError("must be an environment variable name (letters, digits, '_')")
    return v


def _header_name(v: str) -> str:
    if not _HEADER_NAME_RE.match(v) or v.lower() in _RESERVED_HEADERS or v.lower().startswith("mcp-"):
        raise ValueError("must be an HTTP header name that neither HTTP nor the MCP transport uses itself")
    return v


def _token_url(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return v


EnvName = Annotated[str, Field(examples=["CRM_TOKEN"]), AfterValidator(_env_name)]
HeaderName = Annotated[str, Field(max_length=100, examples=["Authorization"]), AfterValidator(_header_name)]
TokenUrl = Annotated[
    str, Field(max_length=2048, examples=["https://idp.example.com/oauth2/token"]), AfterValidator(_token_url)
]


class NoCredential(BaseModel):
    """Arbiter sends no credential of its own (the upstream is open, or protected by the network)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["none"] = "none"


class HeaderCredentialFields(BaseModel):
    """A static header: ``Authorization: Bearer …`` or an API key header such as ``X-Api-Key``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["header"]
    header: HeaderName = "Authorization"


class OAuthClientFields(BaseModel):
    """Arbiter's own OAuth client at the upstream's authorization server."""

    model_config = ConfigDict(extra="forbid")
    token_url: TokenUrl
    client_id: str = Field(min_length=1, max_length=500)
    scope: str | None = Field(default=None, max_length=2000)
    audience: str | None = Field(default=None, max_length=2048)
    resource: str | None = Field(default=None, max_length=2048, description="RFC 8707 resource indicator")
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


class ClientCredentialsFields(OAuthClientFields):
    kind: Literal["client_credentials"]


class TokenExchangeFields(OAuthClientFields):
    """RFC 8693: the caller's access token is exchanged for one the upstream accepts."""

    kind: Literal["token_exchange"]
    subject_token_type: str = TOKEN_TYPE_ACCESS
    requested_token_type: str | None = TOKEN_TYPE_ACCESS


class HeaderCredentialConfig(HeaderCredentialFields):
    value_env: EnvName = Field(description="Environment variable holding the header's value")


class ClientCredentialsConfig(ClientCredentialsFields):
    client_secret_env: EnvName


class TokenExchangeConfig(TokenExchangeFields):
    client_secret_env: EnvName


# The operator's configuration references secrets in the environment; only the admin API stores them
# (encrypted), since a config file is no place for a secret in clear.
CredentialConfig = Annotated[
    NoCredential | HeaderCredentialConfig | ClientCredentialsConfig | TokenExchangeConfig,
    Field(discriminator="kind"),
]


class UpstreamFields(BaseModel):
    """What every upstream definition has, whether from the operator's configuration or the admin API."""

    name: str = Field(description="Unique name; tools are exposed as <name>__<tool>", examples=["crm"])
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    call_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    enabled: bool = True
    # Calls in flight to this upstream at once (its bulkhead); unset: upstream.max_concurrency.
    max_concurrency: int | None = Field(default=None, gt=0, le=100_000)
    # Another upstream serving the same tools (a replica, a second region): calls go there while this
    # one's circuit is open or when a call fails before it reached this upstream (docs/resilience.md).
    fallback: str | None = Field(default=None, examples=["crm-replica"])
    # Integrity (docs/integrity.md): approve this upstream's new definitions without a review, unless a
    # scan flags them (a changed definition is quarantined all the same). Unset: the setting
    # integrity.auto_approve_default.
    auto_approve: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not UPSTREAM_NAME_RE.match(v):
            raise ValueError("must match ^[a-z][a-z0-9-]{0,31}$ (lowercase letters, digits, '-')")
        return v

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str | None) -> str | None:
        if v is not None and not UPSTREAM_NAME_RE.match(v):
            raise ValueError("must name an upstream (^[a-z][a-z0-9-]{0,31}$)")
        return v

    @model_validator(mode="after")
    def _not_own_fallback(self) -> UpstreamFields:
        if self.fallback == self.name:
            raise ValueError("an upstream cannot be its own fallback")
        return self


class UpstreamConfig(UpstreamFields):
    """An operator-defined upstream (the only way to define a stdio upstream)."""

    transport: Transport = "streamable_http"
    url: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict[str, str])
    cwd: str | None = None
    credential: CredentialConfig = Field(default_factory=NoCredential)

    @model_validator(mode="after")
    def _target(self) -> UpstreamConfig:
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("a stdio upstream needs 'command'")
            if self.credential.kind != "none":
                raise ValueError("a stdio upstream takes no credential; pass secrets to it through 'env'")
        elif not self.url:
            raise ValueError(f"a {self.transport} upstream needs 'url'")
        return self


class McpSettings(BaseModel):
    """The agent-facing ``/mcp`` endpoint."""

    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # A body must arrive whole within this long; a client trickling bytes holds nothing open for longer.
    body_timeout_s: float = Field(default=30.0, gt=0)
    json_response: bool = True
    # Answer the pipeline's methods (calls, reads, lists, completions) in JSON response mode without the
    # SDK's server transport, with its checks (proxy/front.py, proxy/handshake_front.py); off: everything
    # through the SDK, as a fallback and a benchmark baseline. See docs/architecture.md.
    direct_path: bool = True
    # How tools/call refusals the model can act on (upstream down, policy, limits) reach the agent: a tool
    # result with isError (agent frameworks hand it to the model), or a JSON-RPC error (which ends most
    # agents' runs). See docs/resilience.md.
    tool_errors: Literal["result", "jsonrpc"] = "result"
    # Put an upstream's requests during a call (elicitation, sampling, roots; handshake era) to the agent
    # whose call it is, when that agent declared the capability; off: the upstream is told they are not
    # relayed, and Arbiter declares none of them to upstreams. See docs/protocol.md.
    relay_server_requests: bool = True
    # How long an upstream's input_required round may wait for the agent's retry: the lifetime of the
    # requestState Arbiter seals around the upstream's (keyed from secret_key; see docs/protocol.md).
    request_state_ttl_s: float = Field(default=600.0, gt=0, le=86_400)
    # A handshake-era agent cannot take input_required: Arbiter asks it over its session and retries the
    # upstream itself, at most this many rounds per call. 0: such calls fail with input_unavailable.
    input_rounds_max: int = Field(default=10, ge=0, le=100)
    # Questions an upstream may put to the agent during one call (elicitation, sampling, roots: relayed
    # requests and those of the rounds above alike); beyond it each is refused without asking the agent,
    # and the audit record counts them. Each question Arbiter asks for those rounds waits at most
    # request_state_ttl_s for the agent's answer (docs/protocol.md).
    input_requests_max: int = Field(default=20, ge=0, le=1000)
    # Requests on /mcp being answered at once; more are refused at once (503 + Retry-After), not queued.
    max_in_flight: int = Field(default=1024, gt=0)
    # Handshake-era sessions are cheaper per call; stateless mode suits replicas without sticky routing.
    stateless_legacy: bool = False
    session_idle_timeout_s: float = Field(default=1800.0, gt=0)
    max_sessions: int = Field(default=10_000, gt=0)
    dns_rebinding_protection: bool = True
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1:*", "localhost:*", "[::1]:*"])
    allowed_origins: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    )


class NotificationSettings(BaseModel):
    """List changes and resource subscriptions relayed from upstreams to agents (docs/protocol.md)."""

    # Off: no list_changed, resources/subscribe or subscriptions/listen, and none advertised.
    enabled: bool = True
    # A storm of an upstream's list_changed refreshes its catalog at most once per this interval.
    refresh_interval_s: float = Field(default=1.0, ge=0, le=300)
    # Notifications waiting per agent session or listen stream; beyond it new ones are dropped (logged).
    buffer: int = Field(default=256, gt=0, le=100_000)
    # Agent sessions and listen streams told of changes at once; further listen requests are refused.
    max_listeners: int = Field(default=10_000, gt=0)
    # An agent that does not take a notification within this long misses it (the others do not wait).
    send_timeout_s: float = Field(default=5.0, gt=0)
    # How often the upstream watchers look for new, changed or reconnected upstreams.
    watch_interval_s: float = Field(default=2.0, gt=0)
    # Arbiter's own subscriptions/listen to a 2026-07-28 upstream: retried after this, doubling to the max.
    listen_backoff_s: float = Field(default=1.0, gt=0)
    listen_backoff_max_s: float = Field(default=30.0, gt=0)
    # Fairness and bounds (docs/protocol.md "List changes and subscriptions"): listen streams and
    # handshake sessions told of changes per caller (of max_listeners in all); resources one of them may
    # subscribe to; resource URIs per subscriptions/listen request Arbiter sends an upstream.
    max_listeners_per_principal: int = Field(default=100, gt=0)
    max_subscriptions_per_listener: int = Field(default=100, gt=0, le=10_000)
    listen_max_resources: int = Field(default=100, gt=0, le=10_000)
    # Agents subscribing and leaving: the watcher re-subscribes upstream at most once per this window.
    resubscribe_debounce_s: float = Field(default=0.25, ge=0, le=60)
    # A catalog change naming more entries than this is judged per caller on the upstream as a whole
    # (told if the caller may see any of its entries of that kind), not name by name.
    max_changed_judged: int = Field(default=100, gt=0, le=100_000)


class UpstreamPolicy(BaseModel):
    """Limits on where upstreams may point and how Arbiter talks to them."""

    allow_link_local: bool = False
    allow_metadata_hosts: bool = False
    catalog_refresh_interval_s: float = Field(default=300.0, ge=0)
    # How often to follow other replicas' changes and retry upstreams that are down.
    maintain_interval_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=100, gt=0)
    # Arbiter closes pooled upstream connections idle this long itself: below common servers' keep-alive
    # timeouts (uvicorn and Node.js close after 5 s), so a request rarely meets a connection the upstream
    # is closing; set it below an upstream server's own if that is shorter (gunicorn: 2 s). A request that
    # does meet one is sent once more on a fresh connection if it may run twice, and otherwise fails
    # without marking the upstream down or counting against its circuit (proxy/relay.py).
    idle_connection_s: float = Field(default=4.0, gt=0)
    # A reconnect attempt after a failure waits at least this long, so a dead upstream costs little.
    reconnect_backoff_s: float = Field(default=2.0, ge=0)
    # Resilience (docs/resilience.md). The circuit breaker: this many consecutive transport failures or
    # timeouts of one upstream open its circuit (0: never), refusing calls at once for breaker_open_s;
    # then one probe call decides.
    breaker_threshold: int = Field(default=5, ge=0)
    breaker_open_s: float = Field(default=30.0, gt=0, le=3600)
    # The bulkhead: calls in flight per upstream (an upstream's max_concurrency overrides it); up to
    # max_waiting more wait for a slot, each at most queue_timeout_s; the rest are refused at once.
    max_concurrency: int = Field(default=64, gt=0, le=100_000)
    max_waiting: int = Field(default=64, ge=0)
    queue_timeout_s: float = Field(default=1.0, ge=0)
    # Retries of safe requests (never reached the upstream, reads, tools marked idempotent): at most
    # retry_attempts tries in all, within the call's deadline, and per upstream at most retry_ratio of
    # its requests plus retry_min_per_s.
    retry_attempts: int = Field(default=3, ge=1, le=10)
    retry_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_min_per_s: float = Field(default=3.0, ge=0)
    # Environment variables the admin API may name as an upstream secret (glob patterns). ARBITER_*
    # never: that would let an admin send Arbiter's own secrets to an upstream of their choosing.
    secret_env_allowlist: list[str] = Field(default_factory=lambda: ["*"])
    # Token-exchange upstreams get one session per caller token: at most this many per upstream
    # (least recently used closed first), each closed after this long unused.
    caller_sessions_max: int = Field(default=256, gt=0)
    caller_session_idle_s: float = Field(default=300.0, gt=0)
    # Timeout of each request to an OAuth token endpoint.
    token_timeout_s: float = Field(default=10.0, gt=0)
    # Where upstreams and their token endpoints may live (CIDRs, IPv4 and IPv6): every address a host
    # resolves to, at registration and on every new connection. Empty: any address (but link-local and
    # metadata, above). A denied network wins over an allowed one.
    allowed_networks: list[str] = Field(default_factory=list[str])
    denied_networks: list[str] = Field(default_factory=list[str])

    @field_validator("allowed_networks")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        return cls._cidrs(v, "upstream.allowed_networks")

    @field_validator("denied_networks")
    @classmethod
    def _denied(cls, v: list[str]) -> list[str]:
        return cls._cidrs(v, "upstream.denied_networks")

    @staticmethod
    def _cidrs(v: list[str], setting: str) -> list[str]:
        import ipaddress

        out: list[str] = []
        for cidr in v:
            try:
                out.append(str(ipaddress.ip_network(cidr.strip())))
            except ValueError as exc:
                # The value is a network, not a secret: naming it is what makes the error useful.
                raise ValueError(f"{setting}: {cidr!r} is not a CIDR network ({exc})") from None
        return out


class ConsoleLoginConfig(BaseModel):
    """How people log in to the console through this issuer: OpenID Connect, authorization code + PKCE
    (docs/console.md). The redirect URI to register is ``<console.public_url>/console/oidc/callback``."""

    client_id: str = Field(min_length=1, max_length=500)
    # Only for a confidential client (sent with client_secret_basic); a public client relies on PKCE alone.
    client_secret: SecretStr | None = None
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"])
    # Unset: <issuer>/.well-known/openid-configuration. Its `issuer` must equal this issuer's.
    discovery_url: str | None = None
    # The login button's label; unset: the issuer's host name.
    label: str | None = Field(default=None, max_length=100)

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: list[str]) -> list[str]:
        return v if "openid" in v else ["openid", *v]


class IssuerConfig(BaseModel):
    """A trusted OAuth 2.1 authorization server whose JWT access tokens Arbiter accepts."""

    issuer: str = Field(description="The exact `iss` value, e.g. https://idp.example.com/realms/acme")
    jwks_uri: str = Field(description="Where the issuer publishes its signing keys (JWKS)")
    # Accepted `aud` values; empty means the canonical resource URL of /mcp (RFC 8707).
    audiences: list[str] = Field(default_factory=list[str])
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    # Claim mapping; dotted paths reach into nested claims (e.g. Keycloak's realm_access.roles).
    subject_claim: str = "sub"
    tenant_claim: str | None = "tenant"
    roles_claim: str = "roles"
    scope_claim: str = "scope"  # a space-separated string (scope) or a list (scp)
    client_id_claim: str = "client_id"  # Entra ID: azp / appid
    # When a token carries a `typ` header it must be one of these (RFC 9068).
    access_token_types: list[str] = Field(default_factory=lambda: ["at+jwt", "application/at+jwt"])
    # Console login through this issuer (OpenID Connect); unset: its tokens are for /mcp only.
    console: ConsoleLoginConfig | None = None

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
        bad = [a for a in v if a not in allowed]
        if bad or not v:
            raise ValueError(f"only asymmetric algorithms are accepted ({sorted(allowed)}); got {bad or v}")
        return v


class AuthSettings(BaseModel):
    """Who may call /mcp and /admin/v1."""

    # The canonical URL of the /mcp endpoint as agents reach it (the token audience, RFC 8707).
    # Unset: http://<host>:<port>/mcp.
    resource_url: str | None = None
    issuers: list[IssuerConfig] = Field(default_factory=list[IssuerConfig])
    required_scopes: list[str] = Field(default_factory=list[str])
    leeway_s: int = Field(default=60, ge=0, le=60)
    jwks_refresh_cooldown_s: float = Field(default=30.0, ge=0)
    jwks_timeout_s: float = Field(default=5.0, gt=0)
    admin_roles: list[str] = Field(default_factory=lambda: ["security-admin"])
    auditor_roles: list[str] = Field(default_factory=lambda: ["auditor"])


class PolicySettings(BaseModel):
    """How a replica follows policy changes made anywhere (see docs/policies.md)."""

    # Without Redis, every replica checks the policy version this often (one small query).
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    # With Redis, changes arrive by pub/sub at once; the version is still checked this often.
    poll_interval_with_redis_s: float = Field(default=10.0, gt=0, le=600)
    redis_channel: str = "arbiter:policy"


# Value detectors known to the audit redactor (arbiter.audit.redact); see RedactSettings.detectors.
REDACT_DETECTORS = (
    "private_key",
    "jwt",
    "bearer",
    "url_password",
    "api_key",
    "credential",
    "email",
    "ssn",
    "card",
    "iban",
)


class RedactSettings(BaseModel):
    """What the audit log never stores in clear (see docs/audit.md). Applied before anything is queued."""

    # Argument paths whose values are replaced whole: dotted paths with globs, matched case-insensitively
    # against every key path in the arguments (``password`` matches a key named password at any depth;
    # ``payment.card.*`` everything under payment.card; list items are ``[]``, e.g. ``users.[].ssn``).
    # Globs are fnmatch-style without character classes ("*" also crosses dots). The defaults name keys
    # that hold credentials or identifiers outright; "*token" rather than "*token*" so that token,
    # access_token, id_token, x-auth-token match but max_tokens and token_count (LLM parameters) do not.
    # Over-matching elsewhere (e.g. "secretary") is accepted: a lost value costs less than a stored one.
    paths: list[str] = Field(
        default_factory=lambda: [
            "*password*",
            "*passwd*",
            "*passphrase*",
            "*secret*",
            "*token",
            "*api_key*",
            "*apikey*",
            "*api-key*",
            "*authorization*",
            "*credential*",
            "*private_key*",
            "*privatekey*",
            "*private-key*",
            "*cookie*",
            "auth",
            "session",
            "*session_id",
            "*session-id",
            "*sessionid",
            "ssn",
            "*_ssn",
            "cvv",
            "cvc",
            "otp",
            "dsn",
            "*connection_string*",
        ]
    )
    # Built-in value detectors applied inside every string value (and key): jwt, bearer (Authorization
    # values), api_key (Arbiter's and common providers' key shapes, "api_key=…"), private_key (PEM),
    # card (Luhn-checked), email, url_password (scheme://user:PASSWORD@host), credential ("password=…",
    # "secret: …", "access_token=…" in free text); iban (mod-97 checked) and ssn (US, dashed) are off by
    # default, as their shapes are common in ordinary identifiers: turn them on where that data is handled.
    detectors: list[str] = Field(
        default_factory=lambda: [
            "jwt",
            "bearer",
            "api_key",
            "private_key",
            "card",
            "email",
            "url_password",
            "credential",
        ]
    )
    # Extra value patterns (name -> regular expression); a match is replaced by [REDACTED:<name>].
    patterns: dict[str, str] = Field(default_factory=dict[str, str])
    # Arguments larger than this (as canonical JSON) are stored as a size-and-shape summary only.
    max_bytes: int = Field(default=16 * 1024, gt=0)
    # Each string value is cut to this many characters after redaction.
    max_string: int = Field(default=2048, gt=0)

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(REDACT_DETECTORS))
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; known: {sorted(REDACT_DETECTORS)}")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
                raise ValueError(f"pattern name {name!r} must match [a-z][a-z0-9_-]{{0,31}}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from None
        return v


# The detectors that find credentials (rather than personal data): what the guards act on by default.
SECRET_DETECTORS = ("private_key", "jwt", "bearer", "url_password", "api_key", "credential")


class ArgumentRule(BaseModel):
    """Detectors applied to the arguments of the tools (exposed-name globs) called by the roles (any
    role when empty): ``deny`` refuses the call (``sensitive_argument``), ``redact`` forwards it with
    each match replaced by ``[REDACTED:<detector>]``. Detector names: ``REDACT_DETECTORS`` or the names
    of ``audit.redact.patterns``."""

    tools: list[str] = Field(default_factory=lambda: ["*"])
    roles: list[str] = Field(default_factory=list[str])
    detectors: list[str] = Field(min_length=1)
    action: Literal["deny", "redact"] = "deny"


class ArgumentGuardSettings(BaseModel):
    """Checks on a call's arguments before anything is forwarded (see docs/integrity.md)."""

    # Validate against the pinned input schema (jsonschema; no network $ref resolution).
    validate_schema: bool = True
    # Arguments nested deeper, or larger as JSON, than this are refused without validating them.
    max_depth: int = Field(default=32, gt=0, le=1000)
    max_bytes: int = Field(default=1024 * 1024, gt=0)
    # Compiled validators kept, per (exposed tool, schema digest); the least recently used go first.
    validator_cache: int = Field(default=1024, gt=0)
    # Value detectors on argument strings, per tool and role (see ArgumentRule); every matching rule
    # applies. The default denies secrets to every tool; PII passes (the audit record redacts it).
    rules: list[ArgumentRule] = Field(
        default_factory=lambda: [ArgumentRule(detectors=list(SECRET_DETECTORS), action="deny")]
    )


class ResultGuardSettings(BaseModel):
    """Checks on what an upstream answers before it reaches the agent (see docs/integrity.md)."""

    # A result larger than this is refused (or cut to it, ``on_oversize: truncate``); Arbiter never
    # holds more than this of one answer in memory.
    max_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    on_oversize: Literal["refuse", "truncate"] = "refuse"
    # Secrets found in text content are replaced by [REDACTED:<detector>] before the agent sees them.
    redact_secrets: bool = True
    # Which detectors (``REDACT_DETECTORS`` or ``audit.redact`` pattern names). Detectors without a
    # trigger substring (card, iban, operators' patterns) make every result take the slow path.
    detectors: list[str] = Field(default_factory=lambda: list(SECRET_DETECTORS))
    # structuredContent is checked against the pinned outputSchema when the tool declares one.
    validate_output_schema: bool = True


class IntegritySettings(BaseModel):
    """Tool integrity: pinned and approved definitions, the poisoning scan, argument and result guards."""

    # Whether an upstream registered without saying so approves its new, unflagged definitions itself.
    auto_approve_default: bool = False
    # Operators' own poisoning-scan rules (TOML files in the format of integrity/poisoning_rules.toml),
    # added to the built-in ones.
    scan_rules_files: list[Path] = Field(default_factory=list[Path])
    arguments: ArgumentGuardSettings = Field(default_factory=ArgumentGuardSettings)
    results: ResultGuardSettings = Field(default_factory=ResultGuardSettings)


class AuditSettings(BaseModel):
    """The audit log (see docs/audit.md)."""

    # When records cannot be stored: refuse new calls (503, audit_unavailable), or spool them to a local
    # append-only file that is replayed into the store when it returns.
    on_store_failure: Literal["fail_closed", "spool"] = "fail_closed"
    spool_dir: Path = Path("./audit-spool")
    # Records accepted but not yet stored; when full, new calls are refused rather than run unaudited.
    queue_max: int = Field(default=10_000, gt=0)
    batch_max: int = Field(default=500, gt=0, le=5000)
    # Records reach the store at most this long after their request was answered.
    flush_interval_s: float = Field(default=0.2, gt=0, le=1.0)
    # Answer a request only once its record is stored (or spooled): a replica killed (SIGKILL, OOM) has
    # lost no record of a call it answered. Costs one store write per call's latency (writes are shared
    # by the calls in flight). Off: records are stored within flush_interval_s after the answer.
    confirm_before_answer: bool = True
    retry_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long a stopping Arbiter spends storing what is queued before spooling the rest to disk.
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # Each store write (one batch) must finish within this, or the store counts as unavailable.
    write_timeout_s: float = Field(default=5.0, gt=0)
    # Ed25519 private key signing checkpoints: 32 bytes base64 (a raw seed) or PKCS#8 PEM. Unset:
    # checkpoints are written unsigned and `audit verify` says so.
    signing_key: SecretStr | None = None
    # Public keys of earlier signing keys (base64 raw 32 bytes), so their checkpoints still verify.
    trusted_public_keys: list[str] = Field(default_factory=list[str])
    # Key for the HMAC of each call's original arguments. Unset: derived from signing_key; if that is
    # unset too, a random per-process key (the HMACs then prove nothing after a restart).
    hmac_key: SecretStr | None = None
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    checkpoint_every: int = Field(default=10_000, gt=0)
    # Records older than this are purged (with a signed checkpoint at the cut). Unset: kept forever.
    retention_days: int | None = Field(default=None, gt=0)
    purge_interval_s: float = Field(default=3600.0, gt=0)
    redact: RedactSettings = Field(default_factory=RedactSettings)


class LimitSettings(BaseModel):
    """Rate limits, cost budgets and the loop breaker (see docs/limits.md)."""

    enabled: bool = True
    # auto: Redis when ARBITER_REDIS_URL is set, else in-process. memory: in-process even with Redis.
    backend: Literal["auto", "memory", "redis"] = "auto"
    # When Redis cannot be reached: refuse calls (limits_unavailable), or fall back to per-replica
    # in-process limits until it is back. Either way it is logged and shown in /readyz.
    on_redis_down: Literal["fail_closed", "fallback"] = "fail_closed"
    redis_prefix: str = Field(default="arbiter:limits:", min_length=1, max_length=100)
    # Each Redis round trip must finish within this, or Redis counts as down.
    redis_timeout_s: float = Field(default=0.5, gt=0, le=30)
    # After a Redis failure, calls skip Redis (and take the on_redis_down path) this long before retrying.
    redis_retry_s: float = Field(default=1.0, gt=0, le=300)
    # How often a replica checks for limit/budget/cost changes made through another replica.
    reload_interval_s: float = Field(default=2.0, gt=0, le=600)
    # Cost of a tool call when no cost entry matches the tool (units).
    default_cost: float = Field(default=1.0, ge=0, le=1_000_000)
    # Loop breaker default: more than this many identical calls within the window are refused (0: off).
    loop_max_repeats: int = Field(default=0, ge=0, le=100_000)
    loop_window_s: float = Field(default=60.0, gt=0, le=86_400)
    # How long a request key (idempotency key) is remembered: a copy within it is refused (run at most once).
    request_key_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    # The same for a key made from a handshake-era session id and JSON-RPC id: a copy of such a request is
    # a transport's retry, sent while the call runs or just after, and one is held per call made, so a
    # long hold costs memory (or Redis) in proportion to the call rate. Keep it above the longest call.
    session_request_key_ttl_s: float = Field(default=120.0, gt=0, le=7 * 86_400)
    # How often each replica writes its usage counts (GET /admin/v1/usage) to the database.
    usage_flush_interval_s: float = Field(default=5.0, gt=0, le=3600)


class TelemetrySettings(BaseModel):
    """Traces, metrics and logs (see docs/observability.md)."""

    # off: no tracer at all and no tracing work per call; otlp: OTLP over HTTP to otlp_endpoint;
    # console: spans printed to stdout (for trying it out).
    traces: Literal["off", "otlp", "console"] = "off"
    # The collector's traces URL (OTLP/HTTP). Unset: the exporter's own default
    # (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or http://localhost:4318/v1/traces).
    otlp_endpoint: str | None = None
    service_name: str = Field(default="arbiter", min_length=1, max_length=200)
    # Share of new traces recorded; a trace continued from the caller follows the caller's decision
    # when follow_caller_sampling is on, else the ratio decides for it too (an agent cannot then force
    # every one of its calls to be recorded and exported).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    follow_caller_sampling: bool = True
    # A span for each pipeline step (authenticate, authorize, limits, audit) under the SERVER span. Off:
    # the SERVER and CLIENT spans only, for about a third of the tracing cost per call.
    trace_steps: bool = True
    # Put tool-call arguments on spans, redacted exactly as in the audit log. Off: never.
    trace_arguments: bool = False
    # Log lines: JSON (one object a line) or readable text. Unset: the CLI chooses (serve: json, demo: text).
    log_format: Literal["json", "text"] | None = None
    # Prometheus metrics at GET /metrics. Off: no route and no metrics work per call.
    metrics: bool = True
    # GET /metrics requires `Authorization: Bearer <metrics_token>` (401 otherwise). Metrics name every
    # tool that was called, hidden ones included, and /metrics shares its port with /mcp: without a token
    # they are served only if metrics_public says so (a port only the scraper reaches), and otherwise
    # not at all (no route, no work per call; a warning at start-up says why).
    metrics_token: SecretStr | None = None
    metrics_public: bool = False


class ConsoleSettings(BaseModel):
    """The web console at /console (docs/console.md)."""

    enabled: bool = True
    # A session not used for this long is gone: the person logs in again.
    idle_timeout_s: int = Field(default=900, ge=60, le=86400)
    # However busy, a session ends this long after login (and an OpenID Connect one at its ID token's exp).
    max_lifetime_s: int = Field(default=8 * 3600, ge=60, le=7 * 86400)
    # Sessions are stored in the database (replicas share them): at most this many, least recently used
    # go first.
    max_sessions: int = Field(default=1000, ge=1, le=100_000)
    # auto: Secure cookies except for plain HTTP on loopback (a local demo); always: Secure cookies even
    # then, for a TLS proxy on the same host that rewrites Host to a loopback address.
    secure_cookies: Literal["auto", "always"] = "auto"
    # The console's origin as browsers reach it (e.g. https://arbiter.example.com), for the OpenID Connect
    # redirect URI. Unset: the origin of auth.resource_url, else http://<host>:<port>. Never the Host header.
    public_url: str | None = Field(default=None, max_length=2048)

    @field_validator("public_url")
    @classmethod
    def _origin(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/?#\s]+", v.rstrip("/")):
            raise ValueError("console.public_url must be an origin such as https://arbiter.example.com")
        return v.rstrip("/") if v is not None else None


class ApprovalSettings(BaseModel):
    """Calls an approver approves (``approve by role:...`` rules, docs/approvals.md)."""

    # How long an approver's approval holds for the agent's retry, unless the rule says (``for 4h``).
    valid_s: int = Field(default=3600, ge=1, le=7 * 86400)
    # How long a request waits for an approver before it lapses (the agent's retry then asks anew).
    pending_ttl_s: int = Field(default=86400, ge=60, le=30 * 86400)
    # Requests one caller may have waiting at once; the next call that needs one is refused until some
    # are decided (a looping agent must not flood approvers, the table and the webhook).
    max_pending_per_caller: int = Field(default=20, ge=1, le=10_000)
    # Told of every new pending approval (a signed POST, retried): chat, ticketing, a pager.
    webhook_url: str | None = Field(default=None, max_length=2048)
    # The HMAC-SHA256 key of the webhook's Arbiter-Signature header (required with webhook_url).
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Tries per notice, at 2, 4, 8, ... s apart (at most 5 min), then it is given up (logged).
    webhook_attempts: int = Field(default=8, ge=1, le=50)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/?#\s]+(/\S*)?", v):
            raise ValueError("approvals.webhook_url must be an http(s) URL")
        return v

    @model_validator(mode="after")
    def _secret(self) -> ApprovalSettings:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("approvals.webhook_secret is required with approvals.webhook_url (it signs)")
        return self


class Settings(BaseSettings):
    """Arbiter's configuration: environment ``ARBITER_*`` over an optional YAML/JSON config file."""

    model_config = SettingsConfigDict(
        env_prefix="ARBITER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # Validation errors would otherwise echo the offending value: a mistyped secret key or token.
        hide_input_in_errors=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    admin_token: SecretStr | None = None
    # Fernet key(s) encrypting upstream secrets given through the admin API; comma-separated for
    # rotation (the first encrypts, all decrypt). Unset: only environment-referenced secrets work.
    secret_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"
    # How long a stopping Arbiter waits for open connections (e.g. agents' SSE streams) before closing them.
    shutdown_grace_s: int = Field(default=10, ge=1)
    # On SIGTERM, how long Arbiter keeps accepting connections but answers 503 (readyz too) before it stops
    # listening, so a load balancer (Kubernetes endpoints) stops sending it traffic first. Then in-flight
    # requests get shutdown_grace_s to finish. 0: stop listening at once.
    drain_delay_s: float = Field(default=0.0, ge=0, le=300)
    # How long an idle keep-alive connection stays open. Well above clients' own expiry (httpx: 5 s) so
    # a client reusing a connection never races the server closing it; clients are told a shorter time.
    keep_alive_s: int = Field(default=75, ge=2)
    config_file: Path | None = None
    mcp: McpSettings = Field(default_factory=McpSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    upstream: UpstreamPolicy = Field(default_factory=UpstreamPolicy)
    upstreams: list[UpstreamConfig] = Field(default_factory=list[UpstreamConfig])
    policy: PolicySettings = Field(default_factory=PolicySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    integrity: IntegritySettings = Field(default_factory=IntegritySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    # Skip the "database is at head" check; only for tools that manage the schema themselves.
    check_schema: bool = True

    @field_validator("admin_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        return v

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        for key in v.get_secret_value().split(","):
            try:
                Fernet(key.strip())
            except ValueError:
                # Never echo the value: it is the key.
                raise ValueError(
                    "must be one or more comma-separated Fernet keys (32 url-safe base64-encoded bytes); "
                    "generate one with `python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'`"
                ) from None
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, *_config_file(settings_cls))


def _config_file(settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
    """The file named by ``ARBITER_CONFIG_FILE`` (JSON if its name ends in ``.json``, else YAML); the
    environment wins over it."""
    path = os.environ.get("ARBITER_CONFIG_FILE")
    if not path:
        return ()
    # pydantic-settings skips a file that is not there; a config file named but missing is an error.
    Path(path).open("rb").close()
    if path.endswith(".json"):
        return (_JsonFile(settings_cls, json_file=path),)
    return (_YamlFile(settings_cls, yaml_file=path, yaml_file_encoding="utf-8"),)


def _mapping(data: object, path: object) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return dict(cast(dict[str, Any], data))


class _YamlFile(YamlConfigSettingsSource):
    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return _mapping(super()._read_file(file_path), file_path)


class _JsonFile(JsonConfigSettingsSource):
    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return _mapping(super()._read_file(file_path), file_path)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and config file), with explicit overrides on top."""
    return Settings(**overrides)
