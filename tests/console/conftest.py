"""The console's browser: Debian's Chromium driven by Playwright (both from `make browser`), headless.

Playwright's own browser download is never used; it is pointed at the system executable. A missing piece
that `make browser` cannot provide skips the tests, or fails them when CI requires them
(ARBITER_REQUIRE_SERVICES=1: `.ci/run` on a fresh machine must get them from nothing).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, REQUIRE_SERVICES, ArbiterServer

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


def tool_missing(what: str) -> NoReturn:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (ARBITER_REQUIRE_SERVICES=1) but could not be had")
    pytest.skip(f"{what} not available")


def _ready() -> bool:
    return CHROMIUM.exists() and importlib.util.find_spec("playwright") is not None


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The system Chromium, with Playwright importable: installed once through the Makefile if missing."""
    if not _ready():
        if shutil.which("make") is None:
            tool_missing("Chromium and Playwright (`make browser` needs make)")
        done = subprocess.run(
            ["make", "-s", "browser"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0 or not _ready():
            tool_missing(f"Chromium and Playwright (`make browser` failed: {done.stderr.strip()[-2000:]})")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots (the test's own output directory)."""
    out = tmp_path / "screenshots"
    out.mkdir()
    return out


def make_key(server: ArbiterServer, owner: str, roles: list[str]) -> str:
    with httpx.Client(
        base_url=f"{server.base_url}/admin/v1", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as admin:
        resp = admin.post("/api-keys", json={"owner": owner, "roles": roles})
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key
