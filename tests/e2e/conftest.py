"""End-to-end fixtures: the real ``arbiter demo`` command, as a user would start it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DemoArbiter:
    mcp_url: str
    admin_url: str
    admin_token: str
    token: str | None
    info: dict[str, object]


@pytest.fixture(scope="session")
def demo_arbiter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoArbiter]:
    """``arbiter demo --port 0 --info-file ...`` in a subprocess, shared by the session's tests."""
    with run_demo(tmp_path_factory.mktemp("demo")) as demo:
        yield demo


@pytest.fixture
def own_demo(tmp_path: Path) -> Iterator[DemoArbiter]:
    """An ``arbiter demo`` of this test's own, which it may break (e.g. kill an upstream)."""
    with run_demo(tmp_path) as demo:
        yield demo


@contextmanager
def run_demo(work: Path) -> Iterator[DemoArbiter]:
    """``arbiter demo --port 0 --info-file ...`` in a subprocess; waits for the info file."""
    info_file = work / "info.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arbiter.cli",
            "demo",
            "--port",
            "0",
            "--info-file",
            str(info_file),
            "--state-dir",
            str(work / "state"),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not info_file.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"arbiter demo exited with {proc.returncode}:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("arbiter demo did not write its info file within 60s")
        time.sleep(0.1)
    assert info_file.stat().st_mode & 0o077 == 0, "the info file holds the admin token: owner-only"
    info = json.loads(info_file.read_text())
    assert {"mcp_url", "admin_url", "admin_token", "api_keys"} <= set(info)
    try:
        yield DemoArbiter(
            mcp_url=str(info["mcp_url"]),
            admin_url=str(info["admin_url"]),
            admin_token=str(info["admin_token"]),
            token=str(info["api_keys"]["support-agent"]),  # pyright: ignore[reportIndex]
            info=info,
        )
    finally:
        proc.terminate()  # SIGTERM, as a service manager stops it
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    # Its demo upstreams stop with it rather than outliving it.
    upstreams: dict[str, str] = info["upstreams"]  # type: ignore[assignment]
    for url in upstreams.values():
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        deadline = time.monotonic() + 10
        while _listening(port):
            assert time.monotonic() < deadline, f"the demo upstream on port {port} outlived arbiter demo"
            time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0
