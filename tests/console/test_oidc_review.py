"""Security review of the console's OpenID Connect login and database sessions, over plain HTTP against the
loopback provider (tests/console/idp.py): a login the server did not start itself must not open a session
(login CSRF), the login's secrets stay on the server, a callback is good once; and a session does not
outlive the admin token it was opened with."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tests.conftest import ADMIN_TOKEN, ArbiterFactory
from tests.console.idp import CLIENT_ID, TestIdp
from tests.console.test_console_review import log_in, set_cookies
from tests.console.test_oidc import PENDING, callback, refused, to_callback, with_idp


@pytest.fixture
def idp() -> Iterator[TestIdp]:
    with TestIdp(claims={"roles": ["security-admin"]}).running() as provider:
        yield provider


def test_a_login_the_attacker_started_at_the_provider_does_not_log_the_victim_in(
    arbiter_factory: ArbiterFactory, idp: TestIdp
) -> None:
    """Login CSRF: the attacker makes up a state, nonce and PKCE verifier, has the provider issue a code for
    their own account with Arbiter's client id and redirect URI, and plants the matching login cookie in the
    victim's browser. A login cookie must be one this server handed out for a login it started."""
    server = with_idp(arbiter_factory, idp)
    state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
    redirect_uri = f"{server.base_url}/console/oidc/callback"
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": state,
        "nonce": nonce,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    with httpx.Client(timeout=30) as http:
        at_idp = http.get(f"{idp.issuer}/authorize?{urlencode(query)}")
    assert at_idp.status_code == 302 and at_idp.headers["location"].startswith(redirect_uri)
    planted = base64.urlsafe_b64encode(json.dumps([0, state, nonce, verifier, time.time()]).encode())
    resp = callback(at_idp.headers["location"], f"{PENDING}={planted.decode()}")
    refused(resp, 400, "was not started here")
    assert not idp.token_requests  # the attacker's code was never redeemed


def test_the_login_cookie_holds_none_of_the_logins_secrets_and_a_callback_is_good_once(
    arbiter_factory: ArbiterFactory, idp: TestIdp
) -> None:
    server = with_idp(arbiter_factory, idp)
    url, cookie = to_callback(server)
    [asked] = idp.authorize_requests
    value = cookie.split("=", 1)[1]
    assert asked["state"] not in value and asked["nonce"] not in value
    ok = callback(url, cookie)
    assert ok.status_code == 200 and "arbiter_console" in set_cookies(ok), ok.text
    [redeemed] = idp.token_requests
    assert redeemed["code_verifier"] not in value and redeemed["code_verifier"] not in ok.text
    refused(callback(url, cookie), 400, "was not started here")  # replayed: refused here, not at the provider
    assert len(idp.token_requests) == 1


@pytest.mark.parametrize(
    "admin_token", ["a-rotated-admin-token-0123456789", None], ids=["rotated", "removed"]
)
def test_a_session_opened_with_the_admin_token_ends_once_that_token_is_rotated_or_removed(
    arbiter_factory: ArbiterFactory, admin_token: str | None
) -> None:
    """Sessions now outlive a restart (they are in the database): one opened with the break-glass token
    must not outlive the token itself, which an operator rotates or removes with a restart."""
    before = arbiter_factory()
    resp = log_in(before, ADMIN_TOKEN)
    assert resp.status_code == 303, resp.text
    cookie = set_cookies(resp)["arbiter_console"].split(";", 1)[0]
    with httpx.Client(timeout=30, headers={"cookie": cookie}) as http:
        assert http.get(f"{before.base_url}/console/keys").status_code == 200
        after = arbiter_factory(policy=None, admin_token=admin_token)  # the same database, restarted
        page = http.get(f"{after.base_url}/console/keys")
        assert page.status_code == 303 and page.headers["location"] == "/console/login", page.text
        again = http.get(f"{before.base_url}/console/keys")  # the session is gone, not only refused
        assert again.status_code == 303
