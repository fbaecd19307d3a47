"""Credentials given through the admin API, converted to the registry's ``CredentialInput``.

The rules for what is stored (secrets sealed, references checked, when a stored secret is kept) are the
registry's, in ``proxy/credentials.py``; this module only translates the request schema.
"""

from __future__ import annotations

from arbiter.admin.schemas import CredentialIn
from arbiter.auth.outbound import CredentialSpec
from arbiter.auth.secrets import SecretBox
from arbiter.proxy.credentials import credential_to_store
from arbiter.proxy.definitions import CredentialInput
from arbiter.settings import UpstreamPolicy


def credential_input(given: CredentialIn) -> CredentialInput:
    """The domain form of a credential in a request body."""
    if given.kind == "none":
        return CredentialInput()
    if given.kind == "header":
        return CredentialInput(
            CredentialSpec(kind="header", header=given.header), given.value, given.value_env
        )
    fields = given.model_dump(exclude={"kind", "client_secret", "client_secret_env"})
    spec = CredentialSpec(kind=given.kind, **fields)
    return CredentialInput(spec, given.client_secret, given.client_secret_env)


async def credential_from_api(
    given: CredentialIn | None,
    previous: CredentialSpec,
    *,
    moved: bool,
    box: SecretBox,
    policy: UpstreamPolicy,
) -> CredentialSpec:
    """The credential to store for ``given``; ``moved``: the upstream's URL changes in the same request."""
    parsed = credential_input(given) if given is not None else None
    return await credential_to_store(parsed, previous, moved=moved, box=box, policy=policy)
