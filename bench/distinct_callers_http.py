"""Throughput and memory as distinct callers arrive, end to end over HTTP (issue 10, finding 11).

    .venv/bin/python bench/distinct_callers_http.py [--callers 12000] [--window 2000] [--concurrency 16]

Starts the demo CRM upstream and ``arbiter serve`` (SQLite, the demo policy, signed audit) trusting a
JWKS this script serves on loopback, then makes one ``tools/call`` (2026-07-28, raw HTTP) per caller,
each caller a new JWT subject with the same role and tenant. Per window of callers it prints calls/s,
Arbiter's CPU ms per call and its resident memory: with per-caller state bounded, all three stay flat.
Run it against another checkout with ``PYTHONPATH=<checkout>/src`` to compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
import httpx2
from harness import (
    DEMO_POLICY,
    HOST,
    Fleet,
    Jwks,
    clean_env,
    free_ports,
    rss_mb,
    venv_tool,
    wait_for_http_ok,
    wait_for_port,
)

MODERN = "2026-07-28"


async def drive(url: str, tokens: list[str], concurrency: int) -> int:
    """One tools/call per token, ``concurrency`` in flight; returns the number of failed calls."""
    failures = 0
    limiter = anyio.Semaphore(concurrency)
    async with httpx2.AsyncClient(timeout=30.0, limits=httpx2.Limits(max_connections=concurrency)) as http:

        async def call(i: int, token: str) -> None:
            nonlocal failures
            body = {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {
                    "name": "crm__get_customer",
                    "arguments": {"customer_id": "C-1001"},
                    "_meta": {
                        "io.modelcontextprotocol/protocolVersion": MODERN,
                        "io.modelcontextprotocol/clientCapabilities": {},
                    },
                },
            }
            headers = {
                "authorization": f"Bearer {token}",
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": MODERN,
                "mcp-method": "tools/call",
                "mcp-name": "crm__get_customer",
            }
            async with limiter:
                resp = await http.post(url, json=body, headers=headers)
            if resp.status_code != 200 or '"isError":true' in resp.text or '"error"' in resp.text:
                failures += 1

        async with anyio.create_task_group() as tg:
            for i, token in enumerate(tokens):
                tg.start_soon(call, i, token)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--callers", type=int, default=12_000)
    parser.add_argument("--window", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        up_port, arb_port, jwks_port = free_ports(3)
        jwks = Jwks(jwks_port)
        resource = f"http://{HOST}:{arb_port}/mcp"
        env = {
            **clean_env(),
            "ARBITER_DATABASE_URL": f"sqlite:///{workdir / 'a.db'}",
            "ARBITER_LOG_LEVEL": "WARNING",
            "ARBITER_ADMIN_TOKEN": "bench-admin-token-0123456789",
            "ARBITER_AUTH__RESOURCE_URL": resource,
            "ARBITER_AUTH__ISSUERS": json.dumps([{"issuer": jwks.issuer, "jwks_uri": jwks.url}]),
        }
        fleet = Fleet(workdir)
        try:
            upstream = fleet.start(
                "upstream", [venv_tool("python")[0], "-m", "arbiter.demo.crm", "--port", str(up_port)], env
            )
            wait_for_port(upstream, up_port)
            subprocess.run([*venv_tool("arbiter"), "migrate"], env=env, check=True, capture_output=True)
            arbiter = fleet.start(
                "arbiter", [*venv_tool("arbiter"), "serve", "--host", HOST, "--port", str(arb_port)], env
            )
            wait_for_http_ok(arbiter, f"http://{HOST}:{arb_port}/healthz")
            admin = {"authorization": f"Bearer {env['ARBITER_ADMIN_TOKEN']}"}
            with httpx2.Client(
                base_url=f"http://{HOST}:{arb_port}/admin/v1", headers=admin, timeout=30
            ) as http:
                http.post(
                    "/upstreams",
                    json={"name": "crm", "url": f"http://{HOST}:{up_port}/mcp", "auto_approve": True},
                ).raise_for_status()
                http.post(
                    "/policies/import",
                    content=DEMO_POLICY.read_text(encoding="utf-8"),
                    headers={"content-type": "text/csv"},
                ).raise_for_status()
            print(f"{'callers':>15} {'calls/s':>8} {'cpu ms/call':>11} {'rss MB':>7} {'failed':>6}")
            for start in range(0, args.callers, args.window):
                tokens = [
                    jwks.mint(resource, f"user-{n}", ["support-agent"], "acme", ttl_s=3600)
                    for n in range(start, start + args.window)
                ]
                cpu0, t0 = arbiter.cpu_seconds(), time.perf_counter()
                failed = anyio.run(drive, resource, tokens, args.concurrency)
                seconds, cpu = time.perf_counter() - t0, arbiter.cpu_seconds() - cpu0
                window = f"{start + 1}-{start + args.window}"
                print(
                    f"{window:>15} {len(tokens) / seconds:8.1f} {cpu * 1000 / len(tokens):11.2f} "
                    f"{rss_mb(arbiter.popen.pid):7.1f} {failed:6d}",
                    flush=True,
                )
        finally:
            fleet.close()
            jwks.close()


if __name__ == "__main__":
    main()
