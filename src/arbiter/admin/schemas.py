"""Request and response bodies of the admin API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from arbiter.admin.types import UtcDateTime
from arbiter.settings import (
    ClientCredentialsFields,
    EnvName,
    HeaderCredentialFields,
    NoCredential,
    TokenExchangeFields,
    UpstreamFields,
)

_STDIO_REFUSED = (
    "stdio upstreams run a command on the gateway host, so only the operator can define them "
    "(settings or config file), never through the API"
)


def _api_transport(v: str) -> str:
    if v == "stdio":
        raise ValueError(_STDIO_REFUSED)
    return v


def _http_url(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return v


ApiTransport = Annotated[Literal["streamable_http", "sse", "stdio"], AfterValidator(_api_transport)]
HttpUrl = Annotated[
    str, Field(max_length=2048, examples=["https://crm.internal.example/mcp"]), AfterValidator(_http_url)
]


# Secrets given inline are stored encrypted (ARBITER_SECRET_KEY) and never shown again; the *_env form
# names an environment variable of the Arbiter process instead. On update, leaving both out keeps the
# stored secret, as long as it would still go to the same place (see admin/credentials.py).
Secret = Annotated[SecretStr, Field(min_length=1, max_length=8192)]


class HeaderCredentialIn(HeaderCredentialFields):
    value: Secret | None = Field(default=None, description="The header's value, e.g. 'Bearer …'")
    value_env: EnvName | None = None


class ClientCredentialsIn(ClientCredentialsFields):
    client_secret: Secret | None = None
    client_secret_env: EnvName | None = None


class TokenExchangeIn(TokenExchangeFields):
    client_secret: Secret | None = None
    client_secret_env: EnvName | None = None


CredentialIn = Annotated[
    NoCredential | HeaderCredentialIn | ClientCredentialsIn | TokenExchangeIn, Field(discriminator="kind")
]


class CredentialOut(BaseModel):
    """An upstream's credential as the admin API shows it: never a secret, only where it comes from."""

    kind: Literal["none", "header", "client_credentials", "token_exchange"]
    header: str | None = None
    value_env: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    scope: str | None = None
    audience: str | None = None
    resource: str | None = None
    auth_method: str | None = None
    subject_token_type: str | None = None
    requested_token_type: str | None = None
    secret_source: Literal["env", "stored"] | None = Field(
        default=None, description="env: read from the named variable; stored: encrypted in the database"
    )


class UpstreamCreate(UpstreamFields):
    model_config = ConfigDict(extra="forbid")

    transport: ApiTransport = "streamable_http"
    url: HttpUrl
    credential: CredentialIn = Field(default_factory=NoCredential)


class UpstreamUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: ApiTransport | None = None
    url: HttpUrl | None = None
    connect_timeout_s: float | None = Field(default=None, gt=0, le=300)
    call_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    enabled: bool | None = None
    credential: CredentialIn | None = None
    # null sets them back to none (the upstream.max_concurrency default; no fallback)
    max_concurrency: int | None = Field(default=None, gt=0, le=100_000)
    fallback: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,31}$")
    auto_approve: bool | None = None


class CatalogCounts(BaseModel):
    tools: int = 0
    resources: int = 0
    resource_templates: int = 0
    prompts: int = 0


class UpstreamOut(BaseModel):
    id: int
    name: str
    transport: str
    url: str | None
    command: list[str] | None
    connect_timeout_s: float
    call_timeout_s: float
    enabled: bool
    source: Literal["api", "config"]
    status: Literal["connected", "idle", "down", "disabled"]
    # Whether agents see its tools now: false while it is down (tools/list then names it in
    # _meta["arbiter/unavailable"] to callers who could see one of its tools) or disabled.
    listed: bool
    last_error: str | None
    created_at: UtcDateTime
    updated_at: UtcDateTime
    last_refresh_at: UtcDateTime | None
    catalog: CatalogCounts
    credential: CredentialOut
    max_concurrency: int | None = None
    fallback: str | None = None
    auto_approve: bool = False
    # The circuit breaker's state in this replica (None: disabled, not running here).
    circuit: Literal["closed", "open", "half_open"] | None = None


class ToolSettingsIn(BaseModel):
    """What a security admin decides about one upstream tool."""

    model_config = ConfigDict(extra="forbid")

    idempotent: bool = Field(
        default=False,
        description="A call that reached the upstream and failed may be sent again. The upstream's own "
        "idempotentHint is never enough: only this says so.",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="This tool's deadline; unset: the upstream's call_timeout_s"
    )


class ToolSettingsOut(ToolSettingsIn):
    upstream: str
    tool: str
    updated_at: UtcDateTime | None = None
    updated_by: str | None = None


class CatalogEntryOut(BaseModel):
    upstream: str
    kind: Literal["tool", "resource", "resource_template", "prompt"]
    name: str
    exposed_name: str
    sha256: str
    first_seen: UtcDateTime
    last_seen: UtcDateTime
    definition: dict[str, Any]
    # Whether agents are served this definition (approved) or not (docs/integrity.md).
    status: Literal["pending", "approved", "quarantined", "rejected", "disabled"] = "approved"


ReviewStatus = Literal["pending", "approved", "quarantined", "rejected", "disabled"]
PinnedKind = Literal["tool", "prompt", "resource_template"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FindingOut(BaseModel):
    """What the poisoning or shadowing scan found in a definition, and where."""

    rule: str
    category: str
    field: str = Field(description="JSON path of the text in the definition, e.g. inputSchema.properties.x")
    start: int
    end: int
    excerpt: str = Field(description="The offending text with context; hidden characters as \\uXXXX")
    message: str


class DefinitionOut(BaseModel):
    """A tool, prompt or resource template an upstream offers, as a reviewer sees it."""

    upstream: str
    kind: PinnedKind
    name: str
    exposed_name: str
    status: ReviewStatus
    sha256: str = Field(description="The present definition's sha256 (canonical JSON)")
    approved_sha256: str | None = Field(description="The approved definition's, when another is approved")
    findings: list[FindingOut]
    first_seen: UtcDateTime
    last_seen: UtcDateTime
    reviewed_by: str | None
    reviewed_at: UtcDateTime | None


class DefinitionVersionOut(BaseModel):
    sha256: str
    status: Literal["pending", "approved", "quarantined", "rejected", "superseded"]
    present: bool
    first_seen: UtcDateTime
    last_seen: UtcDateTime
    reviewed_by: str | None
    reviewed_at: UtcDateTime | None


class DefinitionDetailOut(DefinitionOut):
    definition: dict[str, Any]
    approved_definition: dict[str, Any] | None
    diff: str = Field(description="Unified diff from the approved to the present definition")
    changed_fields: list[str]
    history: list[DefinitionVersionOut]


class DefinitionSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: PinnedKind
    name: str = Field(min_length=1, max_length=1024)
    sha256: Sha256 | None = Field(
        default=None, description="The definition reviewed: required to approve or reject"
    )


class DefinitionDecisionIn(BaseModel):
    """One decision on one or many entries of an upstream (all applied, or none)."""

    model_config = ConfigDict(extra="forbid")

    items: list[DefinitionSelector] = Field(min_length=1, max_length=1000)
    acknowledge_findings: bool = Field(
        default=False, description="Approve definitions the scans flagged (after reading the findings)"
    )
