"""What the audit log must never hold (credentials, secrets in arguments), and what it must prove: an
edited or deleted record is reported at its sequence number; a purge keeps the rest verifiable."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from arbiter.audit.record import Event, Renderer, canonical, now_ms, record_hash
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer, generate_key
from arbiter.audit.store import AuditStore
from arbiter.errors import AuditChainBroken
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine
from tests.audit.helpers import execute, of_kind, raw_text, stored, verify, wait_for
from tests.auth.jwks import ISSUER, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key
from tests.conftest import ArbiterFactory, UpstreamProc
from tests.policies.conftest import MODERN, MODERN_META

SEED, PUBLIC = generate_key()
CARD = "4111 1111 1111 1111"
PROVIDER_KEY = "sk_live_51Hx9aZ3kq8PzT0mXyQ2bC4dE"


@pytest.fixture
def idp() -> Iterator[tuple[JwksServer, SigningKey]]:
    key = rsa_key("audit-kid")
    jwks = JwksServer(keys=[key])
    with jwks.running():
        yield jwks, key


def _call(url: str, token: str, arguments: dict[str, Any], n: int) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "kb__search_docs", "arguments": arguments, "_meta": MODERN_META}}  # fmt: skip
    headers = {
        **MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "kb__search_docs",
        "authorization": f"Bearer {token}",
    }
    with httpx.Client(timeout=30) as http:
        return http.post(url, content=json.dumps(body), headers=headers)


def test_no_token_key_or_secret_argument_reaches_the_store_the_logs_or_an_export(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    idp: tuple[JwksServer, SigningKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks, key = idp
    caplog.set_level(logging.DEBUG)
    server = arbiter_factory(
        auth={"resource_url": RESOURCE, "issuers": [{"issuer": ISSUER, "jwks_uri": jwks.url}]},
        audit={"signing_key": SEED},
    )
    server.register("kb", kb_upstream.url)
    token = mint(claims(sub="jwt-user", tenant="acme", roles=["agent"]), key)
    secret_args = {
        "query": f"card {CARD} and key {PROVIDER_KEY}",
        "password": "hunter2-correct-horse",
        "limit": 3,
    }
    assert _call(server.mcp_url, token, secret_args, 1).status_code == 200
    assert (
        _call(
            server.mcp_url, server.agent_key, {**secret_args, "query": f"my token is {token}"}, 2
        ).status_code
        == 200
    )
    records = wait_for(
        server, lambda rs: len([r for r in of_kind(rs, "mcp") if r["method"] == "tools/call"]) >= 2
    )
    calls = [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]
    assert {r["actor"]["auth_method"] for r in calls} == {"jwt", "api_key"}
    # Redacted, not dropped. The argument guard refuses both calls (a card and a provider key, a JWT) and
    # hands the audit log their arguments with what it found already replaced, so the log's own count
    # covers what the guard did not (the password, the card) and both markers are there.
    assert all(r["reason"] == "sensitive_argument" and r["args"]["limit"] == 3 for r in calls)
    assert all(r["args_redactions"] >= 1 and r["args"]["password"].startswith("[REDACTED") for r in calls)
    assert all("[REDACTED:" in r["args"]["query"] for r in calls)

    with httpx.Client(timeout=30) as http:
        exported = http.get(
            f"{server.base_url}/admin/v1/audit/events",
            params={"format": "jsonl"},
            headers={"authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"},  # type: ignore[union-attr]
        )
    assert exported.status_code == 200 and len(exported.text.splitlines()) == len(
        stored(server.settings.database_url)
    )
    secrets = [
        token,
        server.agent_key,
        CARD,
        CARD.replace(" ", ""),
        PROVIDER_KEY,
        "hunter2-correct-horse",
        SEED,
    ]
    places = {"store": raw_text(server.settings.database_url), "logs": caplog.text, "export": exported.text}
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret reached the {where}"
    # The HMAC still ties a record to the original arguments for whoever holds the key.
    assert all(len(r["args_hmac"]) == 64 for r in calls)


def test_an_edited_and_a_deleted_record_are_reported_at_their_sequence_numbers(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(audit={"signing_key": SEED})
    server.register("kb", kb_upstream.url)
    for n in range(12):
        assert _call(server.mcp_url, server.agent_key, {"query": f"q{n}"}, n).status_code == 200
    records = wait_for(server, lambda rs: len([r for r in rs if r["method"] == "tools/call"]) >= 12)
    url = server.settings.database_url
    assert verify(url, [PUBLIC]).ok
    edited, deleted = records[-8]["seq"], records[-3]["seq"]
    # An insider changes a denial into an allow and removes another record.
    flip = "UPDATE audit_events SET body = replace(body, :allow, :deny) WHERE seq = :s"
    execute(url, flip, allow='"decision":"allow"', deny='"decision":"deny"', s=edited)
    execute(url, "DELETE FROM audit_events WHERE seq = :s", s=deleted)
    report = verify(url, [PUBLIC])
    assert not report.ok
    found = {(p.seq, p.kind) for p in report.problems}
    assert found == {(edited, "altered"), (deleted, "missing")}, report.to_json()
    assert report.problems[0].seq == edited


def test_a_rewritten_and_rehashed_record_is_caught_by_the_next_link_and_the_signed_checkpoint(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(audit={"signing_key": SEED, "checkpoint_every": 5})
    server.register("kb", kb_upstream.url)
    for n in range(12):
        assert _call(server.mcp_url, server.agent_key, {"query": f"q{n}"}, n).status_code == 200
    records = wait_for(server, lambda rs: len([r for r in rs if r["method"] == "tools/call"]) >= 12)
    server.stop()  # signs the head on the way out
    url = server.settings.database_url
    report = verify(url, [PUBLIC])
    assert report.ok and report.checkpoints_valid >= 1 and report.last_signed_seq == records[-1]["seq"]
    target = records[-4]
    body = {k: v for k, v in target.items() if k != "hash"}
    body["reason"] = "forged"
    text = canonical(body)
    execute(url, "UPDATE audit_events SET body = :b, hash = :h, reason = 'forged' WHERE seq = :s",
            b=text, h=record_hash(text), s=target["seq"])  # fmt: skip
    report = verify(url, [PUBLIC])
    assert not report.ok and report.problems[0].seq == target["seq"], report.to_json()
    # Without the private key no valid checkpoint can be made for the forgery: a wrong key fails them.
    _, other = generate_key()
    assert verify(url, [other]).checkpoints_valid == 0


def test_purge_removes_old_records_behind_a_signed_anchor_and_is_itself_audited(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(audit={"signing_key": SEED})
    server.register("kb", kb_upstream.url)
    for n in range(6):
        assert _call(server.mcp_url, server.agent_key, {"query": f"q{n}"}, n).status_code == 200
    before = wait_for(server, lambda rs: len([r for r in rs if r["method"] == "tools/call"]) >= 6)
    server.stop()
    url = server.settings.database_url
    settings = AuditSettings(signing_key=SEED)  # type: ignore[arg-type]

    async def purge(cutoff_ms: int) -> int:
        engine = create_engine(url)
        try:
            render = Renderer(Redactor(settings.redact), b"k").render
            store = AuditStore(engine, Signer.from_secret(settings.signing_key), settings, render)
            return await store.purge(cutoff_ms, {"subject": "retention-test"})
        finally:
            await engine.dispose()

    # A tampered record among those due for purging: the purge refuses to sign over it.
    victim = next(r for r in before if r["method"] == "tools/call")["seq"]
    execute(
        url, "UPDATE audit_events SET body = replace(body, 'allowed', 'allowed ') WHERE seq = :s", s=victim
    )
    with pytest.raises(AuditChainBroken) as refused:
        asyncio.run(purge(before[-1]["ts_ms"]))
    assert refused.value.details["first_broken_seq"] == victim
    execute(
        url, "UPDATE audit_events SET body = replace(body, 'allowed ', 'allowed') WHERE seq = :s", s=victim
    )
    assert verify(url, [PUBLIC]).ok

    purged = asyncio.run(purge(before[-1]["ts_ms"]))
    assert purged >= 1
    after = stored(url)
    assert after[0]["seq"] == purged + 1 and len(after) == len(before) - purged + 1
    assert after[-1]["kind"] == "audit" and after[-1]["reason"] == "purged"
    assert after[-1]["admin"]["purged"] == purged and after[-1]["admin"]["purged_through_seq"] == purged
    report = verify(url, [PUBLIC])
    assert report.ok and report.checkpoints_valid >= 1, report.to_json()
    # Records purged from the front leave nothing to re-hash, but the anchor is signed: a forged anchor fails.
    execute(url, "UPDATE audit_chain SET anchor_hash = :h", h="f" * 64)
    assert not verify(url, [PUBLIC]).ok


def _store(url: str, **settings: object) -> tuple[AuditStore, object]:
    engine = create_engine(url)
    cfg = AuditSettings(signing_key=SEED, **settings)  # type: ignore[arg-type]
    render = Renderer(Redactor(cfg.redact), b"k").render
    return AuditStore(engine, Signer.from_secret(cfg.signing_key), cfg, render), engine


def _old_events(n: int, age_s: int) -> list[Event]:
    past = now_ms() - age_s * 1000
    return [
        Event(
            kind="mcp",
            decision="allow",
            reason="allowed",
            actor={"subject": "s"},
            ts_ms=past + i,
            request_id=i,
        )
        for i in range(n)
    ]


async def test_an_edited_newest_record_is_caught_by_the_chain_head(sqlite_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, sqlite_url)
    store, engine = _store(sqlite_url)
    render = Renderer(Redactor(RedactSettings()), b"k").render
    await store.append([render(e) for e in _old_events(5, 0)])
    await engine.dispose()  # type: ignore[attr-defined]
    last = stored(sqlite_url)[-1]
    body = {k: v for k, v in last.items() if k != "hash"}
    body["reason"] = "forged"
    text = canonical(body)
    execute(sqlite_url, "UPDATE audit_events SET body = :b, hash = :h, reason = 'forged' WHERE seq = :s",
            b=text, h=record_hash(text), s=last["seq"])  # fmt: skip
    report = verify(sqlite_url, [PUBLIC])
    # Caught twice over: the head row and the checkpoint signed at the first append both disagree.
    assert {(p.seq, p.kind) for p in report.problems} == {(last["seq"], "altered")}, report.to_json()


async def test_deleting_every_checkpoint_of_old_records_is_reported(sqlite_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, sqlite_url)
    store, engine = _store(sqlite_url)
    render = Renderer(Redactor(RedactSettings()), b"k").render
    await store.append([render(e) for e in _old_events(20, age_s=3600)])  # signed on the first append
    assert (await store.head()).checkpoint_seq == 20
    assert (await store.verify()).ok
    execute(sqlite_url, "DELETE FROM audit_checkpoints")
    report = await store.verify()
    await engine.dispose()  # type: ignore[attr-defined]
    assert [(p.seq, p.kind) for p in report.problems] == [(1, "unsigned")], report.to_json()


async def test_a_caller_chosen_name_with_a_nul_byte_is_stored_on_postgres(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, postgres_url: str
) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    server = arbiter_factory(database_url=postgres_url)
    server.register("kb", kb_upstream.url)
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "kb__x\u0000y", "arguments": {}, "_meta": MODERN_META}}  # fmt: skip
    headers = {**MODERN, "mcp-method": "tools/call", "authorization": f"Bearer {server.agent_key}"}
    name = "=?base64?" + base64.b64encode("kb__x\u0000y".encode()).decode() + "?="  # how clients send it
    async with httpx.AsyncClient(timeout=30) as http:
        refused = await http.post(
            server.mcp_url, content=json.dumps(body), headers={**headers, "mcp-name": name}
        )
        assert refused.json()["error"]["code"] == -32602
        # The record is stored (its column cleaned, its body exact) and the store stays available.
        ok = await http.post(
            server.mcp_url, content=_body_for("q"), headers={**headers, "mcp-name": "kb__search_docs"}
        )
        assert "result" in ok.json(), ok.text
    records = wait_for(server, lambda rs: any(r["reason"] == "unknown_target" for r in rs))
    assert next(r for r in records if r["reason"] == "unknown_target")["tool"] == "kb__x\u0000y"
    assert verify(postgres_url).ok


def _body_for(query: str) -> str:
    params = {"name": "kb__search_docs", "arguments": {"query": query}, "_meta": MODERN_META}
    return json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": params})
