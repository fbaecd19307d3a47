"""One fuzzed request against /mcp and the properties every answer must have.

Properties (issue 10): never a 5xx; a malformed request reaches neither the pipeline nor the upstream and
is answered with an error; every authenticated request that was refused or reached the pipeline leaves
an audit record (exactly one ``mcp`` record if it reached the pipeline); the server still answers a normal
call afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tests.fuzz.conftest import ACCEPT, HANDSHAKE, META, MODERN, Target, new_trace

Headers = Mapping[str, str | bytes]


@dataclass
class Exchange:
    request: str  # a readable reproduction: method, headers and body
    response: httpx.Response
    trace: str
    reached_pipeline: int
    reached_upstream: list[str]

    @property
    def errored(self) -> bool:
        if self.response.status_code >= 400:
            return True
        try:
            body: Any = self.response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and "error" in body

    def __str__(self) -> str:
        resp = self.response
        return f"\n{self.request}\n--> {resp.status_code} {dict(resp.headers)} {resp.text[:400]!r}"


def describe(url: str, headers: Headers, body: bytes) -> str:
    shown = {k: (v if k.lower() != "authorization" else f"{str(v)[:14]}...") for k, v in headers.items()}
    text = body[:600] + (b"...(%d bytes)" % len(body) if len(body) > 600 else b"")
    return f"POST {url}\n{shown}\n{text!r}"


def send(
    target: Target, http: httpx.Client, body: bytes, headers: Headers, *, authenticated: bool = True
) -> Exchange:
    trace, parent = new_trace()
    all_headers: dict[str, str | bytes] = {"traceparent": parent, **headers}
    if authenticated:
        all_headers.setdefault("authorization", f"Bearer {target.key}")
    pipeline_before = len(target.recorder.calls)
    upstream_before = len(target.upstream.agent_calls())
    # httpx takes str or bytes per header value; its annotation only admits all of one kind.
    resp = http.post(target.server.mcp_url, content=body, headers=all_headers)  # pyright: ignore[reportArgumentType]
    return Exchange(
        request=describe(target.server.mcp_url, all_headers, body),
        response=resp,
        trace=trace,
        reached_pipeline=len(target.recorder.calls) - pipeline_before,
        reached_upstream=target.upstream.agent_calls()[upstream_before:],
    )


def check(target: Target, ex: Exchange, *, malformed: bool, authenticated: bool = True) -> None:
    assert ex.response.status_code < 500, f"5xx answer{ex}"
    if malformed:
        assert ex.reached_pipeline == 0, f"a malformed request reached the pipeline{ex}"
        assert not ex.reached_upstream, f"a malformed request reached the upstream {ex.reached_upstream}{ex}"
        assert ex.errored, f"a malformed request was not answered with an error{ex}"
    if authenticated and (ex.errored or ex.reached_pipeline):
        events = target.settle(ex.trace)
        assert events, f"an authenticated request that was refused or ran left no audit record{ex}"
        if ex.reached_pipeline:
            mcp = [e for e in events if e["kind"] == "mcp"]
            assert len(mcp) == 1, f"{len(mcp)} mcp audit records for one request{ex}"


def _echo(text: str, *, modern: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"name": "rec__echo", "arguments": {"text": text}}
    if modern:
        params["_meta"] = META
    return {"jsonrpc": "2.0", "id": "after", "method": "tools/call", "params": params}


def still_serves(target: Target, http: httpx.Client, session: str | None = None) -> None:
    """A normal call in each era still works (on the same client, so on a kept-alive connection)."""
    base = {"accept": ACCEPT, "content-type": "application/json", "authorization": f"Bearer {target.key}"}
    modern = {**base, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "rec__echo"}
    legacy = {**base, "mcp-protocol-version": HANDSHAKE, **({"mcp-session-id": session} if session else {})}
    for headers, is_modern in ((modern, True), (legacy, False)):
        if not is_modern and session is None:
            continue
        resp = http.post(
            target.server.mcp_url, content=json.dumps(_echo("ok", modern=is_modern)), headers=headers
        )
        assert resp.status_code == 200, (
            f"a normal call failed after fuzzing: {resp.status_code} {resp.text[:300]}"
        )
        assert resp.json()["result"]["content"][0]["text"] == "ok", resp.text[:300]
