"""The deployment tests' tools: helm (unpacked by `make helm-tools`), hadolint and kubernetes-validate
(the dev extra). Missing tools skip the tests, or fail them when CI requires them
(ARBITER_REQUIRE_SERVICES=1: `.ci/run` on a fresh machine must get them from nothing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "helm" / "helm"


def tool_missing(what: str) -> NoReturn:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (ARBITER_REQUIRE_SERVICES=1) but could not be had")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary, fetched once through the Makefile if this checkout has none yet."""
    if not HELM.exists():
        if shutil.which("make") is None or shutil.which("npm") is None:
            tool_missing("helm (`make helm-tools` needs make and npm)")
        done = subprocess.run(
            ["make", "-s", "helm-tools"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0 or not HELM.exists():
            tool_missing(f"helm (`make helm-tools` failed: {done.stderr.strip()[-2000:]})")
    return HELM
