"""JWT access-token verification against a real JWKS on a loopback port, with keys the tests generate."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import arbiter.auth.jwt as jwt_module
from arbiter.auth.jwt import JwtVerifier
from arbiter.auth.principal import Principal
from arbiter.errors import InvalidToken
from arbiter.settings import AuthSettings, IssuerConfig
from tests.auth.jwks import ISSUER, MINTED, RESOURCE, JwksServer, SigningKey, claims, ec_key, mint, rsa_key

MakeVerifier = Callable[..., JwtVerifier]


@dataclass(frozen=True)
class Keys:
    rsa: SigningKey  # published
    ec: SigningKey  # published
    attacker: SigningKey  # never published; shares the kid of `rsa`
    rotated: SigningKey  # published by tests that rotate
    enc: SigningKey  # published with use=enc by the rejection tests


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa_key("rsa-1"),
        ec=ec_key("ec-1"),
        attacker=rsa_key("rsa-1"),
        rotated=rsa_key("rsa-2"),
        enc=rsa_key("enc-1", use="enc"),
    )


@pytest.fixture(scope="module")
def idp_server() -> Iterator[JwksServer]:
    with JwksServer().running() as server:
        yield server


@pytest.fixture
def idp(idp_server: JwksServer, keys: Keys) -> JwksServer:
    idp_server.reset(keys.rsa, keys.ec)
    return idp_server


@pytest.fixture
async def make(idp: JwksServer) -> AsyncIterator[MakeVerifier]:
    made: list[JwtVerifier] = []

    def factory(
        *,
        clock: Callable[[], float] = time.time,
        cooldown: float = 30.0,
        timeout: float = 2.0,
        jwks_uri: str | None = None,
        **issuer: Any,
    ) -> JwtVerifier:
        config = IssuerConfig(issuer=ISSUER, jwks_uri=jwks_uri or idp.url, **issuer)
        auth = AuthSettings(issuers=[config], jwks_refresh_cooldown_s=cooldown, jwks_timeout_s=timeout)
        verifier = JwtVerifier(auth, RESOURCE, clock=clock)
        made.append(verifier)
        return verifier

    yield factory
    for verifier in made:
        await verifier.aclose()


@pytest.fixture(autouse=True)
def no_tokens_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test does, no token it minted (nor its signature) may show up in any log record."""
    caplog.set_level(logging.DEBUG)
    first = len(MINTED)
    yield
    text = caplog.text
    for token in MINTED[first:]:
        assert token not in text
        signature = token.rsplit(".", 1)[1]
        assert not signature or signature not in text


async def rejected(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as err:
        await verifier.verify(token)
    assert not token or token not in err.value.message
    return err.value.message


# --- valid tokens → Principal -------------------------------------------------------------------------


async def test_rs256_keycloak_style_token(make: MakeVerifier, keys: Keys) -> None:
    verifier = make(roles_claim="realm_access.roles")
    token = mint(
        claims(
            realm_access={"roles": ["support-agent", "viewer"]},
            tenant="acme",
            scope="tools:list tools:call",
            azp="agent-app",
        ),
        keys.rsa,
    )
    assert await verifier.verify(token) == Principal(
        subject="user-1",
        issuer=ISSUER,
        auth_method="jwt",
        tenant="acme",
        roles=frozenset({"support-agent", "viewer"}),
        scopes=frozenset({"tools:list", "tools:call"}),
        client_id="agent-app",
    )


async def test_es256_entra_style_token(make: MakeVerifier, keys: Keys) -> None:
    verifier = make(
        audiences=["api://arbiter"],
        subject_claim="oid",
        tenant_claim="tid",
        scope_claim="scp",
        client_id_claim="appid",
        access_token_types=["JWT"],
    )
    payload = claims(
        aud=["api://other", "api://arbiter"],
        sub="pairwise-sub",
        oid="object-id-7",
        tid="tenant-9",
        scp=["Tools.Call", "Tools.List"],
        roles="auditor, viewer admin",
        appid="client-3",
        azp="not-this-one",
    )
    principal = await verifier.verify(mint(payload, keys.ec, header={"typ": "JWT"}))
    assert principal == Principal(
        subject="object-id-7",
        issuer=ISSUER,
        auth_method="jwt",
        tenant="tenant-9",
        roles=frozenset({"auditor", "viewer", "admin"}),
        scopes=frozenset({"Tools.Call", "Tools.List"}),
        client_id="client-3",
    )


async def test_optional_claims_absent_and_client_id_fallback(make: MakeVerifier, keys: Keys) -> None:
    verifier = make()
    principal = await verifier.verify(mint(claims(client_id="svc-1"), keys.rsa))
    assert (principal.tenant, principal.roles, principal.scopes) == (None, frozenset(), frozenset())
    assert principal.client_id == "svc-1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": -30},  # expired, but within the 60 s leeway
        {"nbf": 30},
        {"iat": 30},
        {"aud": ["https://elsewhere.test", RESOURCE]},
    ],
    ids=["exp-leeway", "nbf-leeway", "iat-leeway", "aud-list"],
)
async def test_accepted_edges(make: MakeVerifier, keys: Keys, overrides: dict[str, Any]) -> None:
    now = int(time.time())
    payload = claims(**{k: now + v if isinstance(v, int) else v for k, v in overrides.items()})
    assert (await make().verify(mint(payload, keys.rsa))).subject == "user-1"


@pytest.mark.parametrize("typ", [None, "at+jwt", "AT+JWT", "application/at+jwt"])
async def test_access_token_types_accepted(make: MakeVerifier, keys: Keys, typ: str | None) -> None:
    assert (await make().verify(mint(claims(), keys.rsa, header={"typ": typ}))).subject == "user-1"


async def test_injected_clock_decides_expiry(make: MakeVerifier, keys: Keys) -> None:
    verifier = make(clock=lambda: time.time() + 3600)
    assert await rejected(verifier, mint(claims(), keys.rsa)) == "token expired"


# --- rejections -----------------------------------------------------------------------------------------


def _raw(header: bytes, payload: bytes) -> str:
    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    return f"{enc(header)}.{enc(payload)}.{enc(b'sig')}"


def _tampered(k: Keys) -> str:
    header, _, signature = mint(claims(), k.rsa).split(".")
    other_payload = mint(claims(sub="admin"), k.rsa).split(".")[1]
    return f"{header}.{other_payload}.{signature}"


def _hs256_with_public_key(k: Keys) -> str:
    return mint(claims(), k.rsa, alg="HS256", hmac_secret=k.rsa.jwk.as_pem(private=False))


NOW = int(time.time())
REJECTIONS: list[tuple[str, Callable[[Keys], str], str]] = [
    ("empty", lambda k: "", "malformed token"),
    ("garbage", lambda k: "not a token", "malformed token"),
    ("three-garbage-parts", lambda k: "a.b.c", "malformed token"),
    ("header-not-object", lambda k: _raw(b'"alg"', b'{"iss": "x"}'), "malformed token"),
    ("payload-not-object", lambda k: _raw(b'{"alg": "RS256"}', b"[1]"), "malformed token"),
    ("kid-not-string", lambda k: mint(claims(), k.rsa, header={"kid": 7}), "malformed token"),
    ("expired", lambda k: mint(claims(exp=int(time.time()) - 120), k.rsa), "token expired"),
    ("nbf-future", lambda k: mint(claims(nbf=int(time.time()) + 120), k.rsa), "token not yet valid"),
    ("iat-future", lambda k: mint(claims(iat=int(time.time()) + 120), k.rsa), "token issued in the future"),
    ("exp-not-number", lambda k: mint(claims(exp="tomorrow"), k.rsa), "invalid exp claim"),
    ("bad-signature", lambda k: mint(claims(), k.attacker), "bad signature"),
    ("tampered-payload", _tampered, "bad signature"),
    # Claims are only judged once the signature holds: a forger learns nothing from them.
    ("forged-and-expired", lambda k: mint(claims(exp=NOW - 999), k.attacker), "bad signature"),
    ("wrong-issuer", lambda k: mint(claims(iss="https://evil.test"), k.rsa), "unknown issuer"),
    ("issuer-not-string", lambda k: mint(claims(iss=["x"]), k.rsa), "unknown issuer"),
    ("wrong-audience", lambda k: mint(claims(aud="https://other.test/mcp"), k.rsa), "wrong audience"),
    ("empty-audience", lambda k: mint(claims(aud=[]), k.rsa), "wrong audience"),
    ("missing-aud", lambda k: mint(claims(aud=None), k.rsa), "missing aud claim"),
    ("missing-exp", lambda k: mint(claims(exp=None), k.rsa), "missing exp claim"),
    ("missing-sub", lambda k: mint(claims(sub=None), k.rsa), "missing subject claim"),
    ("roles-wrong-type", lambda k: mint(claims(roles={"a": 1}), k.rsa), "invalid roles claim"),
    ("tenant-wrong-type", lambda k: mint(claims(tenant=5), k.rsa), "invalid tenant claim"),
    ("alg-none", lambda k: mint(claims(), alg="none", header={"kid": "rsa-1"}), "algorithm not allowed"),
    ("hs256-public-key", _hs256_with_public_key, "algorithm not allowed"),
    ("rs512-not-allowed", lambda k: mint(claims(), k.rsa, alg="RS512"), "algorithm not allowed"),
    (
        "own-jwk-unknown-kid",
        lambda k: mint(claims(), k.attacker, header={"kid": "evil", "jwk": k.attacker.public_jwk()}),
        "key headers not accepted",
    ),
    (
        "own-jwk-known-kid",
        lambda k: mint(claims(), k.attacker, header={"jwk": k.attacker.public_jwk()}),
        "key headers not accepted",
    ),
    (
        "jku",
        lambda k: mint(claims(), k.attacker, header={"jku": "https://evil.test/jwks"}),
        "key headers not accepted",
    ),
    (
        "x5u",
        lambda k: mint(claims(), k.rsa, header={"x5u": "https://evil.test/cert"}),
        "key headers not accepted",
    ),
    ("x5c", lambda k: mint(claims(), k.rsa, header={"x5c": ["MIIB"]}), "key headers not accepted"),
    ("crit", lambda k: mint(claims(), k.rsa, header={"crit": ["exp"]}), "unsupported token header"),
    ("typ-id-token", lambda k: mint(claims(), k.rsa, header={"typ": "id+jwt"}), "wrong token type"),
    ("typ-jwt-by-default", lambda k: mint(claims(), k.rsa, header={"typ": "JWT"}), "wrong token type"),
    ("unknown-kid", lambda k: mint(claims(), k.rsa, header={"kid": "nope"}), "unknown signing key"),
    ("no-kid-many-keys", lambda k: mint(claims(), k.rsa, header={"kid": None}), "unknown signing key"),
    ("enc-key-ignored", lambda k: mint(claims(), k.enc), "unknown signing key"),
    (
        "ec-key-for-rs256",
        lambda k: mint(claims(), k.rsa, header={"kid": "ec-1"}),
        "signing key does not match algorithm",
    ),
]


@pytest.mark.parametrize(
    ("build", "reason"), [(b, r) for _, b, r in REJECTIONS], ids=[i for i, _, _ in REJECTIONS]
)
async def test_rejected(
    make: MakeVerifier, idp: JwksServer, keys: Keys, build: Callable[[Keys], str], reason: str
) -> None:
    idp.extra = [keys.enc.public_jwk()]
    assert await rejected(make(), build(keys)) == reason


@pytest.mark.parametrize("token", ["alg-none", "hs256"])
async def test_forbidden_algorithms_never_reach_the_jwks(
    make: MakeVerifier, idp: JwksServer, keys: Keys, token: str
) -> None:
    forged = (
        mint(claims(), alg="none", header={"kid": "rsa-1"})
        if token == "alg-none"
        else _hs256_with_public_key(keys)
    )
    assert await rejected(make(), forged) == "algorithm not allowed"
    assert idp.fetches == 0


async def test_key_pinned_to_another_algorithm(make: MakeVerifier, idp: JwksServer, keys: Keys) -> None:
    idp.extra = [{**keys.rsa.public_jwk(), "kid": "pinned", "alg": "RS256"}]
    verifier = make(algorithms=["RS256", "RS512"])
    token = mint(claims(), keys.rsa, alg="RS512", header={"kid": "pinned"})
    assert await rejected(verifier, token) == "signing key does not match algorithm"
    assert (await verifier.verify(mint(claims(), keys.rsa, alg="RS512"))).subject == "user-1"


async def test_single_key_set_without_kid(make: MakeVerifier, idp: JwksServer, keys: Keys) -> None:
    idp.reset(keys.ec)
    assert (await make().verify(mint(claims(), keys.ec, header={"kid": None}))).subject == "user-1"


async def test_invalid_jwks_entries_are_skipped(make: MakeVerifier, idp: JwksServer, keys: Keys) -> None:
    idp.extra = [{"kty": "RSA", "kid": "broken"}, {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}, "junk"]
    assert (await make().verify(mint(claims(), keys.rsa))).subject == "user-1"
    secret_kid = mint(claims(), keys.rsa, alg="RS256", header={"kid": "secret"})
    assert await rejected(make(), secret_kid) == "unknown signing key"


# --- JWKS cache: single flight, cool-down, rotation, outages -----------------------------------------------


@pytest.mark.parametrize("cooldown", [30.0, 0.0])
async def test_unknown_kid_storm_fetches_once(
    make: MakeVerifier, idp: JwksServer, keys: Keys, cooldown: float
) -> None:
    verifier = make(cooldown=cooldown)
    token = mint(claims(), keys.rsa, header={"kid": "nope"})
    results = await asyncio.gather(*(verifier.verify(token) for _ in range(1000)), return_exceptions=True)
    assert {r.message if isinstance(r, InvalidToken) else repr(r) for r in results} == {"unknown signing key"}
    assert idp.fetches == 1


async def test_unknown_kid_refresh_is_rate_limited_by_cooldown(
    make: MakeVerifier, idp: JwksServer, keys: Keys
) -> None:
    now = [time.time()]
    verifier = make(clock=lambda: now[0], cooldown=30)
    assert (await verifier.verify(mint(claims(), keys.rsa))).subject == "user-1"
    assert idp.fetches == 1  # fetched lazily on first use
    unknown = mint(claims(), keys.rsa, header={"kid": "nope"})

    now[0] += 10
    results = await asyncio.gather(*(verifier.verify(unknown) for _ in range(1000)), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in results)
    assert idp.fetches == 1  # within the cool-down: no fetch at all

    now[0] += 25
    results = await asyncio.gather(*(verifier.verify(unknown) for _ in range(1000)), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in results)
    assert idp.fetches == 2  # cool-down over: exactly one


async def test_no_fetch_before_first_use_and_none_for_known_kids(
    make: MakeVerifier, idp: JwksServer, keys: Keys
) -> None:
    verifier = make(cooldown=0)
    assert idp.fetches == 0
    for _ in range(5):
        await verifier.verify(mint(claims(), keys.rsa))
        await verifier.verify(mint(claims(), keys.ec))
    assert idp.fetches == 1


async def test_key_rotation_without_restart(make: MakeVerifier, idp: JwksServer, keys: Keys) -> None:
    now = [time.time()]
    verifier = make(clock=lambda: now[0], cooldown=30)
    old_token = mint(claims(), keys.rsa)
    await verifier.verify(old_token)

    idp.publish(keys.rotated)
    new_token = mint(claims(), keys.rotated)
    assert await rejected(verifier, new_token) == "unknown signing key"  # cool-down still running
    now[0] += 31
    assert (await verifier.verify(new_token)).subject == "user-1"
    assert (await verifier.verify(old_token)).subject == "user-1"
    assert idp.fetches == 2

    # The IdP retires the old key; the next refresh drops it from the cache.
    idp.reset(keys.rotated, keys.ec)
    now[0] += 31
    assert await rejected(verifier, mint(claims(), keys.rsa, header={"kid": "nope"})) == "unknown signing key"
    assert await rejected(verifier, old_token) == "unknown signing key"
    assert (await verifier.verify(new_token)).subject == "user-1"


async def test_jwks_error_status_keeps_cached_keys(
    make: MakeVerifier, idp: JwksServer, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make(cooldown=0)
    token = mint(claims(), keys.rsa)
    await verifier.verify(token)
    idp.status = 500
    assert (await verifier.verify(token)).subject == "user-1"
    rotated = mint(claims(), keys.rotated)
    assert await rejected(verifier, rotated) == "signing keys unavailable"
    assert (await verifier.verify(token)).subject == "user-1"
    assert idp.fetches == 2
    assert "HTTP 500" in caplog.text and "keeping 2 cached keys" in caplog.text

    idp.status = 200
    idp.publish(keys.rotated)
    assert (await verifier.verify(rotated)).subject == "user-1"  # recovers once the IdP does


async def test_jwks_server_stopped_keeps_cached_keys(
    make: MakeVerifier, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    server = JwksServer(keys=[keys.rsa])
    with server.running():
        verifier = make(cooldown=0, jwks_uri=server.url)
        token = mint(claims(), keys.rsa)
        await verifier.verify(token)
    assert (await verifier.verify(token)).subject == "user-1"
    assert await rejected(verifier, mint(claims(), keys.rotated)) == "signing keys unavailable"
    assert "ConnectError" in caplog.text
    assert (await verifier.verify(token)).subject == "user-1"


async def test_hanging_jwks_times_out(
    make: MakeVerifier, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sink:  # accepts connections (backlog) but never answers
        sink.bind(("127.0.0.1", 0))
        sink.listen()
        verifier = make(timeout=0.2, jwks_uri=f"http://127.0.0.1:{sink.getsockname()[1]}/jwks.json")
        started = time.monotonic()
        assert await rejected(verifier, mint(claims(), keys.rsa)) == "signing keys unavailable"
        assert time.monotonic() - started < 2
    assert "JWKS fetch" in caplog.text


# --- routing and lifecycle -------------------------------------------------------------------------------


async def test_accepts_routes_only_tokens_from_configured_issuers(
    make: MakeVerifier, idp: JwksServer, keys: Keys
) -> None:
    verifier = make()
    assert verifier.accepts(mint(claims(), keys.rsa))
    assert verifier.accepts(mint(claims(), alg="none"))  # routing only; verify() decides
    assert not verifier.accepts(mint(claims(iss="https://evil.test"), keys.rsa))
    assert not verifier.accepts(mint(claims(iss=None), keys.rsa))
    for other in ["", "arb_k1_0123456789abcdef", "a.b.c", "a.b.c.d", "..", _raw(b"{}", b"[1]"), "é.é.é"]:
        assert not verifier.accepts(other), other
    assert idp.fetches == 0


async def test_aclose_closes_only_its_own_client(idp: JwksServer, keys: Keys) -> None:
    auth = AuthSettings(issuers=[IssuerConfig(issuer=ISSUER, jwks_uri=idp.url)])
    async with httpx.AsyncClient() as http:
        shared = JwtVerifier(auth, RESOURCE, http=http)
        assert (await shared.verify(mint(claims(), keys.rsa))).subject == "user-1"
        await shared.aclose()
        assert not http.is_closed
    own = JwtVerifier(auth, RESOURCE)
    await own.aclose()
    assert own._http.is_closed  # pyright: ignore[reportPrivateUsage]


# --- a token's signature is checked once, its claims every time ------------------------------------------


async def test_a_verified_token_skips_only_the_signature_check(
    make: MakeVerifier, idp: JwksServer, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    real = jwt_module.jws.validate_compact

    def counting(*args: Any, **kwargs: Any) -> bool:
        checks.append("signature")
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt_module.jws, "validate_compact", counting)
    now = [time.time()]
    verifier = make(clock=lambda: now[0], cooldown=30)
    token = mint(claims(exp=int(now[0]) + 600), keys.ec)
    for _ in range(3):
        assert (await verifier.verify(token)).subject == "user-1"
    assert checks == ["signature"]

    # Another token (here the same one with a character of its signature changed) is checked afresh.
    forged = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    assert await rejected(verifier, forged) == "bad signature"
    assert len(checks) == 2

    # The claims are checked on every call: the remembered token expires with the clock.
    now[0] += 3600
    assert await rejected(verifier, token) == "token expired"

    # A JWKS refresh makes new key objects: the remembered signature no longer vouches for the token.
    now[0] -= 3600
    idp.publish(keys.rotated)
    now[0] += 31
    await rejected(verifier, mint(claims(), keys.rsa, header={"kid": "unknown"}))  # forces a refresh
    checks.clear()
    assert (await verifier.verify(token)).subject == "user-1"
    assert checks == ["signature"]
