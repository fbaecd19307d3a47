"""The example LangChain agents run end to end through a live Arbiter with both demo upstreams.

Each agent is a real subprocess: the current one (``langchain.mcp``, mcp 2.x) in this environment, the
legacy one (``langchain-mcp-adapters``, mcp 1.x) in its own cached virtualenv, since the two mcp majors
cannot be installed side by side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LEGACY_REQUIREMENTS = EXAMPLES / "requirements-legacy.txt"
LEGACY_VENV = REPO / ".cache" / "venv-legacy"
LEGACY_MARKER = LEGACY_VENV / ".requirements.sha256"

AGENT_TIMEOUT_S = 180.0
VENV_TIMEOUT_S = 120.0
PIP_INSTALL_TIMEOUT_S = 900.0
PIP_PROBE_TIMEOUT_S = 60.0


class DemoArbiter(Protocol):
    """What the ``demo_arbiter`` fixture (tests/e2e/conftest.py) yields."""

    mcp_url: str
    token: str | None
    info: dict[str, object]


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr[-4000:]}"


async def run(
    cmd: list[str], *, limit_s: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Completed:
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(cmd)} did not finish within {limit_s:.0f}s")
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def agent_env(token: str | None) -> dict[str, str]:
    # No OPENAI_* so the scripted model runs; no PYTHONPATH/VIRTUAL_ENV so the legacy venv cannot see
    # this environment's mcp 2.x. The token goes by environment to keep it off the process list.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENAI_") and k not in {"ARBITER_TOKEN", "PYTHONPATH", "VIRTUAL_ENV"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env["ARBITER_TOKEN"] = token
    return env


async def run_agent(python: str, script: str, demo_arbiter: DemoArbiter, cwd: Path) -> None:
    result = await run(
        [python, str(EXAMPLES / script), "--mcp-url", demo_arbiter.mcp_url],
        limit_s=AGENT_TIMEOUT_S,
        env=agent_env(demo_arbiter.token),
        cwd=cwd,
    )
    assert result.returncode == 0, result.describe()

    tools_line = next((line for line in result.stdout.splitlines() if line.startswith("Tools seen")), "")
    assert "kb__search_docs" in tools_line, result.describe()
    assert "crm__get_customer" in tools_line, result.describe()
    _, marker, answer = result.stdout.partition("Answer:\n")
    assert marker, result.describe()
    # Both facts come only from tool results (CRM record, KB document title), so the tools ran.
    assert "Acme Logistics" in answer, result.describe()
    assert "single sign-on" in answer, result.describe()


def legacy_cache_key() -> str:
    # The interpreter's minor version is part of the key: a venv is tied to the Python that made it.
    digest = hashlib.sha256(LEGACY_REQUIREMENTS.read_bytes())
    digest.update(f"python{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("ARBITER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (ARBITER_REQUIRE_SERVICES=1, so this is a failure, not a skip)")
    pytest.skip(reason)


async def legacy_python() -> str:
    """The legacy venv's interpreter, (re)building the venv when the requirements changed."""
    python = LEGACY_VENV / "bin" / "python"
    key = legacy_cache_key()
    if python.exists() and LEGACY_MARKER.exists() and LEGACY_MARKER.read_text().strip() == key:
        return str(python)

    shutil.rmtree(LEGACY_VENV, ignore_errors=True)
    LEGACY_VENV.parent.mkdir(parents=True, exist_ok=True)
    made = await run([sys.executable, "-m", "venv", str(LEGACY_VENV)], limit_s=VENV_TIMEOUT_S)
    assert made.returncode == 0, f"python -m venv failed: {made.describe()}"
    installed = await run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
            str(LEGACY_REQUIREMENTS),
        ],
        limit_s=PIP_INSTALL_TIMEOUT_S,
    )
    if installed.returncode != 0:
        # Without the marker the half-built venv is rebuilt next time; remove it now to save space.
        shutil.rmtree(LEGACY_VENV, ignore_errors=True)
        probe = await run(
            [sys.executable, "-m", "pip", "index", "versions", "langchain-mcp-adapters"],
            limit_s=PIP_PROBE_TIMEOUT_S,
        )
        if probe.returncode != 0:
            detail = installed.stderr[-2000:]
            _unavailable(f"cannot build {LEGACY_VENV}: the package index is unreachable\n{detail}")
        pytest.fail(f"pip install -r {LEGACY_REQUIREMENTS} failed: {installed.describe()}")
    # Written last, so an interrupted build never counts as a cached one.
    LEGACY_MARKER.write_text(key)
    return str(python)


async def test_support_agent_on_langchain_mcp(demo_arbiter: DemoArbiter, tmp_path: Path) -> None:
    await run_agent(sys.executable, "support_agent.py", demo_arbiter, tmp_path)


@pytest.mark.timeout(PIP_INSTALL_TIMEOUT_S + 2 * AGENT_TIMEOUT_S)
async def test_support_agent_on_legacy_adapters(demo_arbiter: DemoArbiter, tmp_path: Path) -> None:
    python = await legacy_python()
    await run_agent(python, "legacy_adapters_agent.py", demo_arbiter, tmp_path)


async def test_support_agent_carries_on_when_its_crm_is_down(own_demo: DemoArbiter, tmp_path: Path) -> None:
    """The CRM upstream is killed: the agent still completes its run from the knowledge base, and the model
    was told in words why the customer lookup failed (a tool result, not a JSON-RPC error ending the run)."""
    pids: dict[str, int] = own_demo.info["upstream_pids"]  # type: ignore[assignment]
    os.kill(pids["crm"], signal.SIGKILL)
    result = await run(
        [sys.executable, str(EXAMPLES / "support_agent.py"), "--mcp-url", own_demo.mcp_url],
        limit_s=AGENT_TIMEOUT_S,
        env=agent_env(own_demo.token),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.describe()
    transcript, marker, answer = result.stdout.partition("Answer:\n")
    assert marker, result.describe()
    (crm_line,) = [
        line for line in transcript.splitlines() if line.startswith("Tool result crm__get_customer")
    ]
    assert "[error]" in crm_line, result.describe()
    assert "crm is unavailable right now; try again" in crm_line and "answer without it" in crm_line, crm_line
    assert "single sign-on" in answer, result.describe()  # from the knowledge base, which still answered
    assert "could not look up the customer record" in answer and "Acme Logistics" not in answer


async def test_a_bad_key_is_one_line_with_the_servers_answer(
    demo_arbiter: DemoArbiter, tmp_path: Path
) -> None:
    result = await run(
        [sys.executable, str(EXAMPLES / "support_agent.py"), "--mcp-url", demo_arbiter.mcp_url],
        limit_s=AGENT_TIMEOUT_S,
        env=agent_env("arb_0000000000000000_not-a-real-key"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: {demo_arbiter.mcp_url} answered 401 Unauthorized: "
        '{"error": "invalid_token", "error_description": "unknown or revoked API key"}'
    ), result.describe()
