"""Security review of the console, over plain HTTP (httpx, no browser): the session cookie's Secure flag
behind a proxy on the same host, and which credentials may open a session at all."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.auth.jwks import ISSUER, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key
from tests.conftest import ADMIN_TOKEN, ArbiterFactory, ArbiterServer
from tests.console.conftest import make_key

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def set_cookies(resp: httpx.Response) -> dict[str, str]:
    """Each cookie the answer sets, by name, with its whole Set-Cookie line (flags included)."""
    return {line.split("=", 1)[0]: line for line in resp.headers.get_list("set-cookie")}


def log_in(server: ArbiterServer, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The login form's round trip, cookies carried by hand (a Secure cookie is not sent back over
    http by a cookie jar, and the point here is what the server sets)."""
    with httpx.Client(base_url=server.base_url, timeout=30, headers=headers or {}) as http:
        page = http.get("/console/login")
        assert page.status_code == 200, page.text
        match = CSRF.search(page.text)
        assert match is not None
        token = match.group(1)
        return http.post(
            "/console/login",
            data={"key": key, "csrf": token},
            headers={"cookie": f"arbiter_console_login={token}"},
        )


def is_secure(set_cookie: str) -> bool:
    return any(part.strip().lower() == "secure" for part in set_cookie.split(";"))


# A TLS terminator on the same host (nginx, a sidecar) connects from loopback. When it does not send
# X-Forwarded-Proto, or passes a client's own X-Forwarded-For: 127.0.0.1 through (uvicorn trusts
# forwarded headers from loopback), the peer looks local although the browser is far away, on https.
PROXIED = [
    pytest.param({"host": "console.example.com"}, id="tls-proxy-on-loopback"),
    pytest.param({"host": "console.example.com", "x-forwarded-for": "127.0.0.1"}, id="spoofed-xff"),
]


@pytest.mark.parametrize("headers", PROXIED)
def test_the_session_cookie_is_secure_unless_the_browser_itself_is_on_loopback(
    arbiter_factory: ArbiterFactory, headers: dict[str, str]
) -> None:
    server = arbiter_factory()
    resp = log_in(server, ADMIN_TOKEN, headers)
    assert resp.status_code == 303, resp.text
    cookies = set_cookies(resp)
    assert "arbiter_console" in cookies
    assert is_secure(cookies["arbiter_console"]), cookies["arbiter_console"]
    with httpx.Client(base_url=server.base_url, timeout=30, headers=headers) as http:
        login_page = http.get("/console/login")
    assert is_secure(set_cookies(login_page)["arbiter_console_login"])


def test_a_local_demo_over_plain_http_on_loopback_still_logs_in(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    resp = log_in(server, ADMIN_TOKEN)
    assert resp.status_code == 303, resp.text
    session = set_cookies(resp)["arbiter_console"]
    assert not is_secure(session)  # else no browser would send it back to http://127.0.0.1
    assert "httponly" in session.lower() and "samesite=strict" in session.lower()


@pytest.fixture
def idp() -> Iterator[tuple[JwksServer, SigningKey]]:
    key = rsa_key("k1")
    jwks = JwksServer(keys=[key])
    with jwks.running():
        yield jwks, key


def test_a_jwt_does_not_open_a_console_session(
    arbiter_factory: ArbiterFactory, idp: tuple[JwksServer, SigningKey]
) -> None:
    # A session holds the principal, not the credential: one opened with a JWT would outlive the
    # token's exp. A person with a JWT-issuing provider logs in through it instead (test_oidc.py).
    jwks, signing = idp
    server = arbiter_factory(
        auth={"resource_url": RESOURCE, "issuers": [{"issuer": ISSUER, "jwks_uri": jwks.url}]}
    )
    token = mint(claims(roles=["security-admin"]), signing)
    with httpx.Client(timeout=10) as http:  # the token itself is good: /admin/v1 takes it
        assert (
            http.get(
                f"{server.base_url}/admin/v1/api-keys", headers={"authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )
    resp = log_in(server, token)
    assert resp.status_code == 403, resp.text
    assert "arbiter_console" not in set_cookies(resp)


def test_an_api_key_session_ends_when_its_key_is_revoked(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    key = make_key(server, "rev", ["security-admin"])
    resp = log_in(server, key)
    assert resp.status_code == 303, resp.text
    session = set_cookies(resp)["arbiter_console"].split(";", 1)[0]
    with httpx.Client(base_url=server.base_url, timeout=30, headers={"cookie": session}) as http:
        assert http.get("/console/keys").status_code == 200
        with server.admin() as admin:
            assert admin.delete(f"/api-keys/{key.split('_')[1]}").status_code == 204
        after = http.get("/console/keys")
    assert after.status_code == 303 and after.headers["location"] == "/console/login"
