"""CPU cost of verifying one JWT access token (RS256) with a warm JWKS cache.

Run: ``.venv/bin/python bench/jwt_verify_cost.py``.

Uses the test IdP helpers (keys generated here, JWKS served on a loopback port).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.auth.jwks import ISSUER, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key

from arbiter.auth.jwt import JwtVerifier
from arbiter.settings import AuthSettings, IssuerConfig

CALLS = 2000


async def measure(url: str, key: SigningKey) -> float:
    verifier = JwtVerifier(AuthSettings(issuers=[IssuerConfig(issuer=ISSUER, jwks_uri=url)]), RESOURCE)
    token = mint(claims(), key)
    await verifier.verify(token)  # warm the key cache
    start = time.process_time()
    for _ in range(CALLS):
        await verifier.verify(token)
    await verifier.aclose()
    return 1000 * (time.process_time() - start) / CALLS


def main() -> None:
    key = rsa_key("k1")
    jwks = JwksServer(keys=[key])
    with jwks.running():
        print(f"JWT RS256 verify: {asyncio.run(measure(jwks.url, key)):.3f} ms CPU each ({CALLS} calls)")


if __name__ == "__main__":
    main()
