"""The rules for upstream credentials given through the admin API or the operator's configuration."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr, TypeAdapter, ValidationError

from arbiter.admin.credentials import credential_from_api
from arbiter.admin.schemas import CredentialIn
from arbiter.auth.outbound import CredentialSpec
from arbiter.auth.secrets import CredentialUnavailable, SecretBox, SecretKeyMissing, SecretRef
from arbiter.errors import InvalidInput
from arbiter.settings import Settings, UpstreamConfig, UpstreamPolicy

KEY = Fernet.generate_key().decode()
BOX = SecretBox(SecretStr(KEY))
POLICY = UpstreamPolicy()
TOKEN_URL = "http://127.0.0.1:9/token"
_ADAPTER: TypeAdapter[Any] = TypeAdapter(CredentialIn)


async def stored(
    given: dict[str, Any] | None, previous: CredentialSpec | None = None, **kw: Any
) -> CredentialSpec:
    parsed = _ADAPTER.validate_python(given) if given is not None else None
    return await credential_from_api(
        parsed,
        previous or CredentialSpec(),
        moved=kw.get("moved", False),
        box=kw.get("box", BOX),
        policy=kw.get("policy", POLICY),
    )


def cc(**extra: Any) -> dict[str, Any]:
    return {"kind": "client_credentials", "token_url": TOKEN_URL, "client_id": "gw", **extra}


async def test_inline_secrets_are_sealed_and_round_trip_through_the_column() -> None:
    spec = await stored(cc(client_secret="s3cret", scope="a b"))
    assert spec.secret is not None and spec.secret.sealed is not None
    data = spec.to_json()
    assert data is not None and "s3cret" not in str(data) and "s3cret" not in str(spec.public())
    assert CredentialSpec.from_json(data) == spec
    assert spec.secret.reveal(BOX) == "s3cret"
    # Rotation: a new key first, the old one still decrypts.
    rotated = SecretBox(SecretStr(f"{Fernet.generate_key().decode()},{KEY}"))
    assert spec.secret.reveal(rotated) == "s3cret"
    with pytest.raises(CredentialUnavailable, match="cannot be decrypted"):
        spec.secret.reveal(SecretBox(SecretStr(Fernet.generate_key().decode())))
    with pytest.raises(SecretKeyMissing, match="ARBITER_SECRET_KEY"):
        await stored(cc(client_secret="s3cret"), box=SecretBox(None))


async def test_stored_secret_is_kept_only_while_it_goes_to_the_same_place() -> None:
    previous = await stored(cc(client_secret="s3cret"))
    assert (await stored(None, previous)) == previous  # other fields patched
    kept = await stored(cc(scope="more"), previous)  # credential restated without its secret
    assert kept.secret == previous.secret and kept.scope == "more"
    for changed in (
        cc(token_url="http://127.0.0.1:10/token"),  # a new token endpoint would receive the secret
        cc(client_id="other"),
        {"kind": "token_exchange", "token_url": TOKEN_URL, "client_id": "gw"},
    ):
        with pytest.raises(InvalidInput, match="is required"):
            await stored(changed, previous)
    with pytest.raises(InvalidInput, match="credential again"):
        await stored(None, previous, moved=True)  # a new upstream URL would receive the token
    with pytest.raises(InvalidInput, match="is required"):
        await stored(cc(), previous, moved=True)
    assert (await stored(cc(client_secret="new"), previous, moved=True)).secret != previous.secret
    assert (await stored({"kind": "none"}, previous)) == CredentialSpec()
    with pytest.raises(InvalidInput, match="is required"):
        await stored({"kind": "header"})  # nothing stored to keep


async def test_environment_references_are_limited() -> None:
    spec = await stored({"kind": "header", "value_env": "CRM_TOKEN"})
    assert spec.secret == SecretRef(env="CRM_TOKEN")
    assert spec.public() == {
        "kind": "header",
        "header": "Authorization",
        "secret_source": "env",
        "value_env": "CRM_TOKEN",
    }
    for name in ("ARBITER_SECRET_KEY", "arbiter_admin_token"):
        with pytest.raises(InvalidInput, match="ARBITER_"):
            await stored({"kind": "header", "value_env": name})
    narrow = UpstreamPolicy(secret_env_allowlist=["UPSTREAM_*"])
    assert (await stored(cc(client_secret_env="UPSTREAM_CRM"), policy=narrow)).secret == SecretRef(
        env="UPSTREAM_CRM"
    )
    with pytest.raises(InvalidInput, match="secret_env_allowlist"):
        await stored(cc(client_secret_env="AWS_SECRET_ACCESS_KEY"), policy=narrow)


async def test_values_and_destinations_are_checked() -> None:
    with pytest.raises(InvalidInput, match="cannot be sent"):
        await stored({"kind": "header", "value": "Bearer x\r\nX-Injected: 1"})
    with pytest.raises(InvalidInput, match="not both"):
        await stored({"kind": "header", "value": "x", "value_env": "X"})
    with pytest.raises(InvalidInput, match="metadata"):
        await stored(cc(token_url="http://169.254.169.254/token", client_secret="s"))
    for bad in (
        {"kind": "header", "header": "Host", "value": "x"},
        {"kind": "header", "header": "Mcp-Session-Id", "value": "x"},
        {"kind": "header", "header": "X Bad", "value": "x"},
        {"kind": "header", "value_env": "not a name"},
        cc(token_url="ftp://idp/token"),
        {"kind": "basic"},
    ):
        with pytest.raises(ValidationError):
            _ADAPTER.validate_python(bad)


def test_operator_configuration_references_secrets_and_never_holds_them() -> None:
    cfg = UpstreamConfig.model_validate(
        {
            "name": "crm",
            "url": "http://crm/mcp",
            "credential": {"kind": "header", "header": "X-Api-Key", "value_env": "CRM_KEY"},
        }
    )
    spec = CredentialSpec.from_config(cfg.credential)
    assert spec == CredentialSpec(kind="header", header="X-Api-Key", secret=SecretRef(env="CRM_KEY"))
    te = UpstreamConfig.model_validate(
        {
            "name": "hr",
            "url": "http://hr/mcp",
            "credential": {
                "kind": "token_exchange",
                "token_url": TOKEN_URL,
                "client_id": "gw",
                "client_secret_env": "HR_SECRET",
                "audience": "hr",
            },
        }
    )
    assert CredentialSpec.from_json(CredentialSpec.from_config(te.credential).to_json()).audience == "hr"
    with pytest.raises(ValidationError):  # no inline secret in a config file
        UpstreamConfig.model_validate(
            {"name": "crm", "url": "http://crm/mcp", "credential": {"kind": "header", "value": "x"}}
        )
    with pytest.raises(ValidationError, match="stdio"):
        UpstreamConfig.model_validate(
            {
                "name": "local",
                "transport": "stdio",
                "command": ["x"],
                "credential": {"kind": "header", "value_env": "X"},
            }
        )


def test_a_bad_secret_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as err:
        # A raw string, as it arrives from the environment: the one that could be echoed.
        Settings(secret_key="not-a-fernet-key-but-maybe-a-secret")  # pyright: ignore[reportArgumentType]
    assert "Fernet" in str(err.value)
    assert "maybe-a-secret" not in str(err.value)
    assert Settings(secret_key=SecretStr(f"{KEY}, {Fernet.generate_key().decode()}")).secret_key is not None
