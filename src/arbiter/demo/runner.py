"""``arbiter demo``: both demo upstreams, Arbiter in front of them on SQLite, and an info file for scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import httpx
from pydantic import SecretStr

from arbiter.app import create_app
from arbiter.audit.signing import generate_key
from arbiter.runtime import Runtime
from arbiter.serving import graceful_server, uvicorn_config
from arbiter.settings import Settings, load_settings
from arbiter.store import schema

DEMO_UPSTREAMS = {"kb": "arbiter.demo.kb", "crm": "arbiter.demo.crm"}
_START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(port: int, proc: subprocess.Popen[bytes], name: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_TIMEOUT_S
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo upstream {name} exited with code {proc.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"demo upstream {name} did not start listening on port {port}")


DEMO_POLICY = Path(str(files("arbiter.policies") / "demo.csv"))


def start_upstreams() -> tuple[dict[str, int], list[subprocess.Popen[bytes]]]:
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    for name, module in DEMO_UPSTREAMS.items():
        ports[name] = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, "--port", str(ports[name])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return ports, procs


async def run_demo(port: int, info_file: Path, state_dir: Path) -> None:
    # uvicorn re-raises the SIGTERM that stopped it; by default that kills the process on the spot,
    # before the `finally` below can stop the demo upstreams, which would then outlive it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    db_path = await asyncio.to_thread(_fresh_db_path, state_dir)
    database_url = f"sqlite+aiosqlite:///{db_path}"
    await asyncio.to_thread(schema.upgrade, database_url)
    # Everything else (log level, timeouts, ...) still comes from ARBITER_* through the settings object.
    configured = _with_audit_key(load_settings(database_url=database_url), state_dir)
    ports, procs = start_upstreams()
    try:
        for (name, upstream_port), proc in zip(ports.items(), procs, strict=True):
            await _wait_listening(upstream_port, proc, name)
        port = port or free_port()
        settings = configured.model_copy(update={"port": port})
        app = create_app(settings)
        server = graceful_server(
            # log_config=None: uvicorn's lines go through the handler `arbiter demo` configured.
            uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning", log_config=None),
            app.state.admission,
            settings,
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("Arbiter did not start")
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        keys = await _demo_keys(app.state.runtime)
        admin_token = keys["security-admin"]
        # Register through the admin API itself, exactly as an operator would.
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {admin_token}"}
        ) as admin:
            for name, upstream_port in ports.items():
                resp = await admin.post(
                    "/admin/v1/upstreams", json={"name": name, "url": f"http://127.0.0.1:{upstream_port}/mcp"}
                )
                resp.raise_for_status()
            # The demo's policy, imported the way a security team would apply theirs.
            resp = await admin.post(
                "/admin/v1/policies/import",
                content=await asyncio.to_thread(DEMO_POLICY.read_text, encoding="utf-8"),
                headers={"content-type": "text/csv"},
            )
            resp.raise_for_status()
        info: dict[str, object] = {
            "mcp_url": f"{base}/mcp",
            "admin_url": f"{base}/admin/v1",
            "admin_token": admin_token,  # the security-admin role's API key
            "api_keys": keys,
            "upstreams": {name: f"http://127.0.0.1:{p}/mcp" for name, p in ports.items()},
            # So a script (or test) can stop one, e.g. to see what agents get while an upstream is down.
            "upstream_pids": {name: proc.pid for name, proc in zip(ports, procs, strict=True)},
            "database_url": database_url,
            # Pin this when verifying an exported audit bundle offline (`arbiter audit verify --file`).
            "audit_public_key": app.state.runtime.audit.store.signer.public_b64,
        }
        await asyncio.to_thread(_write_atomically, info_file, json.dumps(info, indent=2))
        _print_banner(info, info_file)
        await serving
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _demo_keys(runtime: Runtime) -> dict[str, str]:
    """One API key per demo role, created as `arbiter api-key create` would."""
    out: dict[str, str] = {}
    for role in ("support-agent", "auditor", "security-admin"):
        _, key = await runtime.keys.create(
            owner=f"demo-{role}", roles=[role], tenant="acme", created_by="arbiter demo"
        )
        out[role] = key
    return out


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _with_audit_key(settings: Settings, state_dir: Path) -> Settings:
    """A demo signs its audit checkpoints with a key of its own (a fresh one per run, like its
    database) unless ARBITER_AUDIT__SIGNING_KEY is set; its spool lives beside its database."""
    audit = settings.audit
    update: dict[str, object] = {"spool_dir": state_dir / "audit-spool"}
    if audit.signing_key is None:
        update["signing_key"] = SecretStr(generate_key()[0])
    return settings.model_copy(update={"audit": audit.model_copy(update=update)})


def _fresh_db_path(state_dir: Path) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in state_dir.glob("arbiter-demo.db*"):
        stale.unlink()  # the demo starts from a clean slate every time
    return state_dir / "arbiter-demo.db"


def _write_atomically(path: Path, text: str) -> None:
    # Scripts poll for the file; they must never read it half-written.
    # It holds the admin token: readable by its owner only.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(text)
    tmp.replace(path)


def _print_banner(info: dict[str, object], info_file: Path) -> None:
    # Keys stay in the (owner-only) info file; the terminal only says where they are.
    mcp_url = info["mcp_url"]
    read = f"import json; print(json.load(open('{info_file}'))['api_keys']['support-agent'])"
    key = f'$(.venv/bin/python -c "{read}")'
    print(
        f"""
Arbiter demo is running (SQLite, demo upstreams 'kb' and 'crm', policy: {DEMO_POLICY}).

  MCP endpoint   {mcp_url}
  Admin API      {info["admin_url"]}   (OpenAPI: {info["admin_url"]}/openapi.json)
  Credentials    {info_file}: an API key per demo role (support-agent, auditor, security-admin)
  Audit log      {info["admin_url"]}/audit/events (auditor key); verify: {info["admin_url"]}/audit/verify

Run the example LangChain agent as the support agent (in another terminal):
  ARBITER_TOKEN={key} \\
    .venv/bin/python examples/support_agent.py --mcp-url {mcp_url}

Press Ctrl-C to stop.
""",
        flush=True,
    )
