"""Property-based tests of JWT access tokens: hostile headers and claims, signed with the test IdP's key
or not at all, against /mcp and /admin/v1. A token is either accepted (only when it is honestly signed
by the published key for the configured issuer) or refused with 401/403, never a 5xx, and every refusal
leaves an audit record."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.auth.jwks import ISSUER, RESOURCE, JwksServer, SigningKey, mint, rsa_key
from tests.conftest import Recorder
from tests.fuzz.conftest import ACCEPT, META, MODERN, RecordingUpstream, Target, fuzz, make_server, new_trace
from tests.fuzz.strategies import HUGE, encode, json_values, odd_text

ADMIN_PATHS = [
    "/admin/v1/upstreams",
    "/admin/v1/audit/events",
    "/admin/v1/openapi.json",
    "/admin/v1/policies",
]


@dataclass
class Idp:
    jwks: JwksServer
    key: SigningKey
    attacker: SigningKey  # same kid, a key the IdP never published


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    key = rsa_key("k1")
    jwks = JwksServer(keys=[key])
    with jwks.running():
        yield Idp(jwks, key, rsa_key("k1"))


@pytest.fixture(scope="module")
def jwt_target(
    tmp_path_factory: pytest.TempPathFactory, idp: Idp, recording_upstream: tuple[RecordingUpstream, str]
) -> Iterator[Target]:
    recorder = Recorder()
    server = make_server(
        tmp_path_factory.mktemp("arbiter-jwt"),
        recorder,
        auth={
            "resource_url": RESOURCE,
            "required_scopes": ["mcp"],
            "jwks_refresh_cooldown_s": 60,  # unknown kids must not hammer the IdP
            "issuers": [{"issuer": ISSUER, "jwks_uri": idp.jwks.url, "roles_claim": "realm_access.roles"}],
        },
    )
    server.register("rec", recording_upstream[1])
    t = Target(server, recorder, recording_upstream[0])
    yield t
    t.audit_http.close()
    server.stop()


def _now() -> int:
    return int(time.time())


# Each claim: its valid value (a callable, for times), and hostile replacements of every JSON type.
def _claim_values(name: str) -> st.SearchStrategy[Any]:
    times = st.one_of(
        st.sampled_from([0, -1, HUGE, -HUGE, 2**63, 10**400, 1e308, -1e308, 0.5, 4_000_000_000]),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    specific: dict[str, st.SearchStrategy[Any]] = {
        "iss": st.sampled_from(
            [ISSUER, ISSUER + "/", ISSUER.upper(), [ISSUER], {"iss": ISSUER}, [ISSUER, ISSUER]]
        ),
        "aud": st.sampled_from(
            [RESOURCE, [RESOURCE], [RESOURCE, 5], [[RESOURCE]], {"aud": RESOURCE}, "", []]
        ),
        "exp": times,
        "nbf": times,
        "iat": times,
        "sub": st.sampled_from(["", "user-1", "a" * 10_000]),
        "scope": st.sampled_from(["mcp", "mcp tools", ["mcp"], "MCP", " mcp ", {"mcp": True}]),
        "realm_access": st.sampled_from([{"roles": ["security-admin"]}, {"roles": "security-admin"}, []])
        | st.fixed_dictionaries({"roles": json_values}),
        "roles": json_values,
        "tenant": st.sampled_from(["acme", "", "x" * 5000]),
        "client_id": st.sampled_from(["agent-app", ""]),
        "jti": st.sampled_from(["jti-1", ""]),
    }
    return st.one_of(
        specific.get(name, st.nothing()), json_values, odd_text, st.lists(json_values, max_size=3)
    )


CLAIMS = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "scope",
    "realm_access",
    "roles",
    "tenant",
    "client_id",
    "jti",
]


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    now = _now()
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": RESOURCE,
        "exp": now + 300,
        "iat": now,
        "scope": "mcp",
        "tenant": "acme",
    }
    for name in draw(st.lists(st.sampled_from(CLAIMS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            claims.pop(name, None)
        else:
            claims[name] = draw(_claim_values(name))
    claims.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return claims


HEADER_FIELDS = ["alg", "kid", "typ", "crit", "b64", "jku", "x5c", "x5u", "jwk", "cty", "zip", "enc"]


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    odd = st.one_of(
        json_values,
        st.sampled_from(
            [
                "RS256",
                "none",
                "None",
                "HS256",
                "ES256",
                "PS256",
                "EdDSA",
                "k1",
                "../k1",
                "at+jwt",
                "JWT",
                ["exp"],
                False,
                "http://127.0.0.1:1/jwks.json",
                ["MIIB"],
                {"kty": "oct", "k": "AA"},
            ]
        ),
    )
    for name in draw(st.lists(st.sampled_from(HEADER_FIELDS), max_size=3, unique=True)):
        fields[name] = draw(odd)
    return fields


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Token:
    value: str
    honest: bool  # signed with the published key, the issuer's algorithm, and a header left as is


@st.composite
def tokens(draw: st.DrawFn, idp: Idp) -> Token:
    how = draw(st.sampled_from(["key", "key", "attacker", "none", "hmac", "garbage-signature", "segments"]))
    claims = draw(claim_sets())
    header = draw(header_sets())
    if how == "segments":
        part = st.one_of(
            st.text(
                alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/", max_size=40
            ),
            json_values.map(lambda v: _b64(encode(v))),
            st.just(_b64(b"{")),
            st.just(_b64(json.dumps({"iss": ISSUER}).encode())),
            st.just(_b64(json.dumps({"iss": [ISSUER]}).encode())),
            st.just(_b64(json.dumps({"iss": {"a": 1}}).encode())),
        )
        parts = draw(st.lists(part, min_size=1, max_size=5))
        return Token(".".join(parts), honest=False)
    # ``mint`` signs with ``alg`` (the key's own unless overridden) and lets ``header`` override what it says.
    safe_claims = json.loads(encode(claims))  # what json.dumps in mint can write (no Deep values here)
    if how == "key":
        value = mint(safe_claims, idp.key, header=header)
    elif how == "attacker":
        value = mint(safe_claims, idp.attacker, header=header)
    elif how == "none":
        value = mint(safe_claims, None, alg="none", header={"kid": "k1", **header})
    elif how == "hmac":
        pem = idp.key.jwk.as_pem(private=False)
        value = mint(safe_claims, None, alg="HS256", header={"kid": "k1", **header}, hmac_secret=pem)
    else:
        good = mint(safe_claims, idp.key, header=header)
        value = good.rsplit(".", 1)[0] + "." + draw(st.sampled_from(["", "AAAA", "!!!", "a" * 400]))
    return Token(value, how == "key" and _plain_header(value, idp))


def _plain_header(token: str, idp: Idp) -> bool:
    """Whether the IdP's own signature vouches for what the header says: the key's algorithm, its id (or
    none, with one key published), an access-token type (or none), and none of the headers Arbiter
    refuses (embedded or remote keys, critical extensions, unencoded payloads). Other fields are the
    issuer's business (its key signed them)."""
    segment = token.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(header, dict):
        return False
    typ = header.get("typ", "at+jwt")
    return (
        header.get("alg") == idp.key.alg
        and header.get("kid", idp.key.kid) == idp.key.kid
        and isinstance(typ, str)
        and typ.lower() in ("at+jwt", "application/at+jwt")
        and not set(header) & {"crit", "b64", "jku", "x5c", "x5u", "jwk"}
    )


def _expect(target: Target, resp: httpx.Response, token: Token, trace: str, where: str) -> None:
    shown = f"\n{where} with token {token.value[:1500]!r}\n--> {resp.status_code} {resp.text[:300]!r}"
    assert resp.status_code < 500, f"5xx for a token{shown}"
    if resp.status_code in (200, 202):
        assert token.honest, f"a token not honestly signed by the IdP's key was accepted{shown}"
        return
    assert resp.status_code in (401, 403), f"a bad token got neither 401 nor 403{shown}"
    if resp.status_code == 401:
        assert "www-authenticate" in resp.headers, f"a 401 without a challenge{shown}"
    events = target.settle(trace)
    assert events, f"a refused token left no audit record{shown}"
    assert {e["kind"] for e in events} <= {"auth", "admin"}, f"unexpected audit kinds {events}{shown}"


@fuzz(80)
@given(data=st.data())
def test_hostile_tokens_on_mcp_and_admin(jwt_target: Target, idp: Idp, data: st.DataObject) -> None:
    token = data.draw(tokens(idp), "token")
    pipeline_before = len(jwt_target.recorder.calls)
    upstream_before = len(jwt_target.upstream.agent_calls())
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "rec__echo", "arguments": {"text": "x"}, "_meta": META},
    }
    headers = {
        "accept": ACCEPT,
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "rec__echo",
        "authorization": f"Bearer {token.value}".strip(),
    }
    with httpx.Client(timeout=30) as http:
        trace, parent = new_trace()
        resp = http.post(jwt_target.server.mcp_url, json=body, headers={**headers, "traceparent": parent})
        _expect(jwt_target, resp, token, trace, "POST /mcp")
        if resp.status_code != 200:
            assert len(jwt_target.recorder.calls) == pipeline_before, "a refused token reached the pipeline"
            assert jwt_target.upstream.agent_calls()[upstream_before:] == [], (
                "a refused token reached the upstream"
            )
        path = data.draw(st.sampled_from(ADMIN_PATHS), "admin path")
        trace, parent = new_trace()
        resp = http.get(
            jwt_target.server.base_url + path,
            headers={"authorization": f"Bearer {token.value}".strip(), "traceparent": parent},
        )
        _expect(jwt_target, resp, token, trace, f"GET {path}")
