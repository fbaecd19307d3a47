"""``arbiter demo``: both demo upstreams, Arbiter in front of them on SQLite, and an info file for scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import cast

import httpx
from pydantic import SecretStr

from arbiter.app import create_app
from arbiter.audit.signing import generate_key
from arbiter.errors import InvalidToken
from arbiter.runtime import Runtime
from arbiter.serving import graceful_server, uvicorn_config
from arbiter.settings import Settings, load_settings
from arbiter.store import schema

DEMO_UPSTREAMS = {"kb": "arbiter.demo.kb", "crm": "arbiter.demo.crm"}
DEMO_ROLES = ("support-agent", "auditor", "security-admin")
STATE_FILE = "demo-state.json"
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


async def run_demo(port: int, info_file: Path, state_dir: Path, *, reset: bool = False) -> None:
    # uvicorn re-raises the SIGTERM that stopped it; by default that kills the process on the spot,
    # before the `finally` below can stop the demo upstreams, which would then outlive it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    state = await asyncio.to_thread(DemoState.open, state_dir, reset)
    database_url = f"sqlite+aiosqlite:///{state.db_path}"
    if state.reused:
        print(f"reusing demo state in {state_dir}; run with --reset to start over", flush=True)
    else:
        print(f"new demo state in {state_dir} (database {database_url})", flush=True)
    await asyncio.to_thread(schema.upgrade, database_url)
    # Everything else (log level, timeouts, ...) still comes from ARBITER_* through the settings object.
    configured = _with_audit_key(load_settings(database_url=database_url), state)
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
        keys = await _demo_keys(app.state.runtime, state.api_keys)
        await asyncio.to_thread(state.save, keys)
        admin_token = keys["security-admin"]
        # Register through the admin API itself, exactly as an operator would.
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {admin_token}"}
        ) as admin:
            await _register_upstreams(admin, ports)
            if not state.reused:
                # The demo's policy, imported the way a security team would apply theirs. A reused
                # state keeps whatever the user has made of it since.
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
            "state_dir": str(state_dir),
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


async def _register_upstreams(admin: httpx.AsyncClient, ports: dict[str, int]) -> None:
    """Point the demo upstreams at this run's ports: registered on a new state, updated on a reused
    one (the demo servers listen on fresh ports each run), registered again if the user deleted one."""
    resp = await admin.get("/admin/v1/upstreams")
    resp.raise_for_status()
    known = {u["name"]: u for u in resp.json()}
    for name, upstream_port in ports.items():
        url = f"http://127.0.0.1:{upstream_port}/mcp"
        if name in known:
            resp = await admin.patch(f"/admin/v1/upstreams/{known[name]['id']}", json={"url": url})
        else:
            # The demo's own servers: their definitions are approved as they are discovered (a
            # changed one is still quarantined until approved; docs/integrity.md).
            upstream = {"name": name, "url": url, "auto_approve": True}
            resp = await admin.post("/admin/v1/upstreams", json=upstream)
        resp.raise_for_status()


async def _demo_keys(runtime: Runtime, kept: dict[str, str]) -> dict[str, str]:
    """One API key per demo role: the one kept from an earlier run while it is still valid, else a new
    one created as `arbiter api-key create` would (a key the user revoked is replaced, not revived)."""
    out: dict[str, str] = {}
    for role in DEMO_ROLES:
        if role in kept:
            with contextlib.suppress(InvalidToken):
                if role in runtime.keys.verify(kept[role]).roles:
                    out[role] = kept[role]
                    continue
        _, key = await runtime.keys.create(
            owner=f"demo-{role}", roles=[role], tenant="acme", created_by="arbiter demo"
        )
        out[role] = key
    return out


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _with_audit_key(settings: Settings, state: DemoState) -> Settings:
    """A demo signs its audit checkpoints with a key of its own, kept with its database so the log of
    earlier runs still verifies, unless ARBITER_AUDIT__SIGNING_KEY is set; its spool lives there too."""
    audit = settings.audit
    update: dict[str, object] = {"spool_dir": state.dir / "audit-spool"}
    if audit.signing_key is None:
        update["signing_key"] = SecretStr(state.signing_key)
    return settings.model_copy(update={"audit": audit.model_copy(update=update)})


@dataclass
class DemoState:
    """What a demo keeps between runs in its owner-only state directory: the SQLite database, and in
    demo-state.json the audit signing key and the demo roles' API keys. Arbiter stores only the keys'
    hashes, so the demo keeps the keys themselves to hand them out again (in the info file each run)."""

    dir: Path
    reused: bool
    signing_key: str
    api_keys: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.dir / "arbiter-demo.db"

    @property
    def file(self) -> Path:
        return self.dir / STATE_FILE

    @classmethod
    def open(cls, state_dir: Path, reset: bool) -> DemoState:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        file = state_dir / STATE_FILE
        kept: dict[str, object] = {}
        if not reset and file.exists() and (state_dir / "arbiter-demo.db").exists():
            with contextlib.suppress(OSError, ValueError):
                loaded: object = json.loads(file.read_text(encoding="utf-8"))
                kept = cast(dict[str, object], loaded) if isinstance(loaded, dict) else {}
        keys = kept.get("api_keys")
        if not isinstance(kept.get("signing_key"), str) or not isinstance(keys, dict):
            # A new state (first run, --reset, or one this demo cannot read): nothing of the old one.
            kept, keys = {}, {}
            for stale in [*state_dir.glob("arbiter-demo.db*"), file]:
                stale.unlink(missing_ok=True)
            shutil.rmtree(state_dir / "audit-spool", ignore_errors=True)
        return cls(
            state_dir,
            reused=bool(kept),
            signing_key=str(kept.get("signing_key") or generate_key()[0]),
            api_keys={str(k): v for k, v in cast(dict[object, object], keys).items() if isinstance(v, str)},
        )

    def save(self, api_keys: dict[str, str]) -> None:
        self.api_keys = api_keys
        _write_atomically(self.file, json.dumps({"signing_key": self.signing_key, "api_keys": api_keys}))


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
  Web console    {str(mcp_url).removesuffix("/mcp")}/console   (log in with the security-admin or auditor key)
  Credentials    {info_file}: an API key per demo role (support-agent, auditor, security-admin)
  State          {info["state_dir"]}, kept between runs (`arbiter demo --reset` starts over)
  Audit log      {info["admin_url"]}/audit/events (auditor key); verify: {info["admin_url"]}/audit/verify

Run the example LangChain agent as the support agent (in another terminal):
  ARBITER_TOKEN={key} \\
    .venv/bin/python examples/support_agent.py --mcp-url {mcp_url}

Press Ctrl-C to stop.
""",
        flush=True,
    )
