"""Turn a credential given for an upstream into what is stored: secrets sealed, references checked.

Two rules keep the admin API from becoming a way to read secrets it never shows:
- an environment variable may be referenced only if ``upstream.secret_env_allowlist`` allows it, and
  never one of Arbiter's own (``ARBITER_*``);
- a stored secret is kept on update only while it would go where it went before: same kind, same
  upstream URL, same token endpoint and client. Otherwise the secret must be given again.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase

from arbiter.auth.outbound import CredentialSpec, header_safe
from arbiter.auth.secrets import SecretBox, SecretRef
from arbiter.errors import InvalidInput
from arbiter.net.urlcheck import check_upstream_url
from arbiter.proxy.definitions import CredentialInput
from arbiter.settings import UpstreamPolicy

_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))


async def credential_to_store(
    given: CredentialInput | None,
    previous: CredentialSpec,
    *,
    moved: bool,
    box: SecretBox,
    policy: UpstreamPolicy,
) -> CredentialSpec:
    """The credential to store; ``moved`` says the upstream's URL changes in the same request."""
    if given is None:
        if moved and previous.secret is not None:
            raise InvalidInput(
                "changing the url of an upstream that has a credential needs the credential again, "
                "including its secret: a stored secret is only ever sent where it was configured to go",
                field="credential",
            )
        return previous
    spec = replace(given.spec, secret=None)
    if spec.kind == "none":
        return CredentialSpec()
    if spec.oauth:
        await _check_token_url(spec, policy)
    value, env = given.secret, given.secret_env
    name = f"credential.{spec.secret_field}"
    if value is not None and env is not None:
        raise InvalidInput(f"give {name} or {name}_env, not both", field=name)
    if value is not None:
        plain = value.get_secret_value()
        # A header value goes on the wire as it is; a client secret is form- or Basic-encoded.
        sendable = header_safe(plain) if spec.kind == "header" else not _CONTROL.intersection(plain)
        if not sendable:
            raise InvalidInput(f"{name} holds characters it cannot be sent with", field=name)
        return replace(spec, secret=SecretRef(sealed=box.seal(plain, name)))
    if env is not None:
        _check_env(env, policy, name)
        return replace(spec, secret=SecretRef(env=env))
    same_place = (
        previous.secret is not None
        and not moved
        and previous.kind == spec.kind
        and (previous.token_url, previous.client_id) == (spec.token_url, spec.client_id)
    )
    if not same_place:
        kept = " (a stored secret is kept only while kind, url, token_url and client_id stay the same)"
        raise InvalidInput(
            f"{name} or {name}_env is required{kept if previous.secret is not None else ''}", field=name
        )
    return replace(spec, secret=previous.secret)


def _check_env(env: str, policy: UpstreamPolicy, name: str) -> None:
    if env.upper().startswith("ARBITER_"):
        raise InvalidInput(f"{name}_env may not name one of Arbiter's own settings (ARBITER_*)", field=name)
    if not any(fnmatchcase(env, pattern) for pattern in policy.secret_env_allowlist):
        raise InvalidInput(
            f"{name}_env: {env} is not allowed by upstream.secret_env_allowlist", field=f"{name}_env"
        )


async def _check_token_url(spec: CredentialSpec, policy: UpstreamPolicy) -> None:
    assert spec.token_url is not None
    try:
        await check_upstream_url(spec.token_url, policy)
    except InvalidInput as exc:
        raise InvalidInput(f"credential.token_url: {exc.message}", field="credential.token_url") from None
