"""``arbiter demo`` keeps what you made between runs (its keys, your keys, its audit log), says so,
and ``--reset`` starts over; the info file holds working keys either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass(frozen=True)
class Demo:
    info: dict[str, object]
    output: Path

    def admin(self) -> httpx.Client:
        token = str(self.info["admin_token"])
        return httpx.Client(
            base_url=str(self.info["admin_url"]), headers={"authorization": f"Bearer {token}"}
        )

    def key(self, role: str) -> str:
        keys: dict[str, str] = self.info["api_keys"]  # type: ignore[assignment]
        return keys[role]


@contextmanager
def demo(work: Path, *args: str) -> Iterator[Demo]:
    info_file, output = work / "info.json", work / f"demo-{time.monotonic_ns()}.log"
    info_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    command = [sys.executable, "-m", "arbiter.cli", "demo", "--port", "0", "--info-file", str(info_file)]
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--state-dir", str(work / "state"), *args], cwd=work, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while not info_file.exists():
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "arbiter demo did not write its info file within 60s"
            time.sleep(0.1)
        yield Demo(json.loads(info_file.read_text()), output)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def recognised(demo: Demo, key: str) -> bool:
    """Whether Arbiter knows ``key``: a support agent's key is refused on the admin API with 403 (known,
    not allowed) rather than 401 (unknown)."""
    status = httpx.get(
        f"{demo.info['admin_url']}/upstreams", headers={"authorization": f"Bearer {key}"}, timeout=30
    ).status_code
    assert status in (401, 403), status
    return status == 403


@pytest.mark.timeout(240)
def test_a_second_run_reuses_the_state_and_reset_starts_over(tmp_path: Path) -> None:
    with demo(tmp_path) as first:
        assert f"new demo state in {tmp_path / 'state'}" in first.output.read_text()
        with first.admin() as admin:
            made = admin.post("/api-keys", json={"owner": "my-own-agent", "roles": ["support-agent"]})
            assert made.status_code == 201, made.text
        support = first.key("support-agent")
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0  # it holds the keys: owner-only

    with demo(tmp_path) as second:
        said = second.output.read_text()
        assert f"reusing demo state in {tmp_path / 'state'}; run with --reset to start over" in said
        assert second.key("support-agent") == support
        assert recognised(second, support)  # the info file's keys still work
        with second.admin() as admin:
            owners = {k["owner"] for k in admin.get("/api-keys").json()}
            assert "my-own-agent" in owners  # what the user made is still there
            urls = {u["name"]: u["url"] for u in admin.get("/upstreams").json()}
            assert urls == second.info["upstreams"]  # re-pointed at this run's demo servers
            verified = admin.get("/audit/verify")
            assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text

    with demo(tmp_path, "--reset") as third:
        assert "new demo state" in third.output.read_text()
        assert third.key("support-agent") != support
        assert not recognised(third, support)
        with third.admin() as admin:
            assert "my-own-agent" not in {k["owner"] for k in admin.get("/api-keys").json()}
