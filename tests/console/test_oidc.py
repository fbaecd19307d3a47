"""Console login through an identity provider (OpenID Connect, code + PKCE) against a real provider on
loopback (tests/console/idp.py): the whole redirect flow in a browser, and every way its answer can be
wrong over plain HTTP, each refused with a page that says why (4xx, never a 500) and no session."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tests.audit.helpers import of_kind, wait_for
from tests.auth.jwks import rsa_key
from tests.conftest import ArbiterFactory, ArbiterServer
from tests.console.idp import CLIENT_ID, TestIdp
from tests.console.test_console import console_changes, shot
from tests.console.test_console_review import set_cookies

PENDING = "arbiter_console_oidc"


@pytest.fixture
def idp() -> Iterator[TestIdp]:
    with TestIdp(claims={"roles": ["security-admin"]}).running() as provider:
        yield provider


def with_idp(factory: ArbiterFactory, idp: TestIdp, **console: Any) -> ArbiterServer:
    return factory(auth={"issuers": [idp.issuer_config()]}, console=console)


def to_callback(server: ArbiterServer) -> tuple[str, str]:
    """A browser's way up to the callback: the URL the provider sends it back to, and the login's cookie."""
    with httpx.Client(timeout=30) as http:
        start = http.get(f"{server.base_url}/console/oidc/login/0")
        assert start.status_code == 303, start.text
        pending = set_cookies(start)[PENDING]
        assert "httponly" in pending.lower() and "samesite=lax" in pending.lower()
        at_idp = http.get(start.headers["location"])
        assert at_idp.status_code == 302, at_idp.text
        return at_idp.headers["location"], pending.split(";", 1)[0]


def callback(url: str, cookie: str | None) -> httpx.Response:
    with httpx.Client(timeout=30) as http:
        return http.get(url, headers={"cookie": cookie} if cookie else {})


def refused(resp: httpx.Response, status: int, why: str) -> None:
    assert resp.status_code == status, resp.text
    assert why in resp.text, resp.text
    assert "Single sign-on failed" in resp.text or status == 403
    cookies = set_cookies(resp)
    assert "arbiter_console" not in cookies  # no session
    assert cookies[PENDING].lower().count("max-age=0") == 1  # the login under way is forgotten


async def test_a_person_logs_in_through_the_identity_provider_with_the_roles_its_id_token_names(
    arbiter_factory: ArbiterFactory, idp: TestIdp, browser: Any, shots: Path
) -> None:
    server = with_idp(arbiter_factory, idp)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{server.base_url}/console/login")
    await shot(page, shots, "login-with-sso")
    await page.get_by_role("link", name="Log in with Test IdP").click()
    await page.wait_for_url(f"{server.base_url}/console")
    keys = await page.goto(f"{server.base_url}/console/keys")  # a security admin's page
    assert keys is not None and keys.status == 200
    assert "dana@example.com · security admin" in await page.locator(".who").inner_text()
    await shot(page, shots, "keys-after-sso")
    names = {c["name"]: c for c in await context.cookies()}
    assert PENDING not in names  # used once, then gone
    session = names["arbiter_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/console"

    # The real flow: code + PKCE S256, with a state and a nonce, back to the configured redirect URI.
    [asked] = idp.authorize_requests
    assert asked["redirect_uri"] == f"{server.base_url}/console/oidc/callback"
    assert asked["code_challenge_method"] == "S256" and asked["state"] and asked["nonce"]
    assert "openid" in asked["scope"].split()
    [redeemed] = idp.token_requests
    assert create_s256_code_challenge(redeemed["code_verifier"]) == asked["code_challenge"]
    assert redeemed["code_verifier"] not in str(session)

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(f"{server.base_url}/console/login")
    [logged_in] = console_changes(server, "console.login")
    assert logged_in["subject"] == "dana@example.com" and logged_in["actor"]["auth_method"] == "jwt"
    assert console_changes(server, "console.logout")[0]["subject"] == "dana@example.com"
    await context.close()


def test_the_session_ends_at_the_id_tokens_exp_when_that_comes_before_the_maximum_lifetime(
    arbiter_factory: ArbiterFactory, idp: TestIdp, sqlite_url: str
) -> None:
    exp = int(time.time()) + 300
    idp.id_token_claims = {"exp": exp}
    server = with_idp(arbiter_factory, idp, max_lifetime_s=3600)
    url, cookie = to_callback(server)
    resp = callback(url, cookie)
    assert resp.status_code == 200 and "arbiter_console" in set_cookies(resp), resp.text
    with sqlite3.connect(sqlite_url.split("///", 1)[1]) as db:
        [(expires,)] = db.execute("SELECT expires_s FROM console_sessions").fetchall()
    assert expires == exp


WRONG_ID_TOKENS = [
    pytest.param({"nonce": "not-the-one-we-sent"}, {}, "wrong nonce", id="wrong-nonce"),
    pytest.param({"nonce": None}, {}, "wrong nonce", id="no-nonce"),
    pytest.param({"aud": "another-client"}, {}, "wrong audience", id="other-audience"),
    pytest.param({"iss": "https://idp.elsewhere.example"}, {}, "wrong issuer", id="other-issuer"),
    pytest.param({"exp": 1_000_000}, {}, "token expired", id="expired"),
    pytest.param({}, {"typ": "at+jwt"}, "wrong token type", id="an-access-token"),
    pytest.param({"aud": [CLIENT_ID, "x"], "azp": "x"}, {}, "wrong authorized party", id="other-azp"),
]


@pytest.mark.parametrize(("claims", "header", "why"), WRONG_ID_TOKENS)
def test_an_id_token_that_is_not_for_this_login_is_refused(
    arbiter_factory: ArbiterFactory, idp: TestIdp, claims: dict[str, Any], header: dict[str, Any], why: str
) -> None:
    idp.id_token_claims, idp.id_token_header = claims, header
    server = with_idp(arbiter_factory, idp)
    url, cookie = to_callback(server)
    refused(callback(url, cookie), 401, why)
    records = wait_for(server, lambda rs: any(r["reason"] == "login_refused" for r in of_kind(rs, "auth")))
    assert any(why in str(r) for r in of_kind(records, "auth"))


def test_an_id_token_signed_with_another_key_is_refused(
    arbiter_factory: ArbiterFactory, idp: TestIdp
) -> None:
    idp.sign_with = rsa_key(idp.key.kid)  # the published kid, another private key
    server = with_idp(arbiter_factory, idp)
    url, cookie = to_callback(server)
    refused(callback(url, cookie), 401, "bad signature")


def test_a_callback_with_a_wrong_state_or_without_the_login_cookie_is_refused(
    arbiter_factory: ArbiterFactory, idp: TestIdp
) -> None:
    server = with_idp(arbiter_factory, idp)
    url, cookie = to_callback(server)
    parts = urlsplit(url)
    params = {k: v[0] for k, v in parse_qs(parts.query).items()}
    forged = f"{server.base_url}{parts.path}?{urlencode({**params, 'state': 'forged'})}"
    refused(callback(forged, cookie), 400, "state does not match")
    refused(callback(url, None), 400, "was not started here")
    assert not idp.token_requests  # neither reached the token endpoint
    ok = callback(url, cookie)  # the genuine answer still completes, once
    assert ok.status_code == 200 and "arbiter_console" in set_cookies(ok)
    refused(callback(url, cookie), 400, "was not started here")  # once: the login is taken


def test_the_providers_refusal_and_a_person_without_admin_rights_get_a_clear_page(
    arbiter_factory: ArbiterFactory, idp: TestIdp
) -> None:
    server = with_idp(arbiter_factory, idp)
    idp.error = "access_denied"
    url, cookie = to_callback(server)
    refused(callback(url, cookie), 401, "refused the login (access_denied)")
    idp.error, idp.claims = None, {"roles": ["agent"]}
    url, cookie = to_callback(server)
    refused(callback(url, cookie), 403, "no admin rights")
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{server.base_url}/console/oidc/login/7").status_code == 400  # no such provider


def test_without_a_configured_provider_there_is_no_single_sign_on(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        assert "Single sign-on" not in http.get("/console/login").text
        assert http.get("/console/oidc/login/0").status_code == 404
        assert http.get("/console/oidc/callback?code=x&state=y").status_code == 404


@pytest.mark.parametrize(
    ("change", "why"),
    [
        pytest.param({"discovery": "/nowhere"}, "could not be read (HTTP 404)", id="no-discovery-document"),
        pytest.param(
            {"issuer": "http://localhost"}, "names another issuer", id="discovery-of-another-issuer"
        ),
    ],
)
def test_a_provider_that_cannot_be_used_answers_with_a_clear_502_page(
    arbiter_factory: ArbiterFactory, idp: TestIdp, change: dict[str, str], why: str
) -> None:
    config = idp.issuer_config(
        discovery_url=f"{idp.issuer}{change.get('discovery', '/.well-known/openid-configuration')}"
    )
    config["issuer"] = change.get("issuer", config["issuer"])
    server = arbiter_factory(auth={"issuers": [config]})
    with httpx.Client(timeout=30) as http:
        resp = http.get(f"{server.base_url}/console/oidc/login/0")
    assert resp.status_code == 502 and why in resp.text, resp.text
    assert PENDING not in set_cookies(resp) and not idp.authorize_requests
