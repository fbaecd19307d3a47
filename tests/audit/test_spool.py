"""The spool on its own: a replay after a crash doubles nothing and survives a torn last line; a file
another live process holds is left alone."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer
from arbiter.audit.spool import Spool
from arbiter.audit.store import AuditStore
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine
from tests.audit.helpers import stored, verify

RENDER = Renderer(Redactor(RedactSettings()), b"k" * 32).render


def _bodies(n: int) -> list[dict[str, object]]:
    return [
        RENDER(
            Event(kind="mcp", decision="allow", reason="allowed", actor={"subject": f"s{i}"}, request_id=i)
        )
        for i in range(n)
    ]


@pytest.fixture
def url(sqlite_url: str) -> str:
    schema.upgrade(sqlite_url)
    return sqlite_url


async def test_replay_after_a_crash_stores_each_record_once_and_skips_a_torn_line(
    url: str, tmp_path: Path
) -> None:
    engine = create_engine(url)
    store = AuditStore(engine, Signer.from_secret(None), AuditSettings(), RENDER)
    spool = Spool(tmp_path, batch=4)
    bodies = _bodies(10)
    await spool.write(bodies)
    # The process died after storing the first six but before deleting the file, mid-way through a line.
    await store.append([dict(b) for b in bodies[:6]])
    path = spool.pending_files()[0]
    await spool.close()
    with path.open("ab") as f:
        f.write('{"id": "torn", "subject": "Jü'.encode()[:-1])  # cut inside the two-byte "ü"
    replayer = Spool(tmp_path, batch=4)
    assert await replayer.replay(store.append_replayed) == 4
    await engine.dispose()
    records = stored(url)
    assert [r["request_id"] for r in records] == list(range(10))
    assert verify(url).ok
    assert replayer.pending_files() == []


async def test_a_file_locked_by_a_live_process_is_not_replayed(url: str, tmp_path: Path) -> None:
    engine = create_engine(url)
    store = AuditStore(engine, Signer.from_secret(None), AuditSettings(), RENDER)
    path = tmp_path / "spool-0000.jsonl"
    path.write_text("")
    with path.open("a", encoding="utf-8") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert await Spool(tmp_path).replay(store.append_replayed) == 0
    await engine.dispose()
    assert path.exists()


async def test_spool_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "d")
    await spool.write(_bodies(1))
    assert spool.pending_files()[0].stat().st_mode & 0o077 == 0
    await spool.close()


def test_a_record_that_cannot_be_rendered_is_kept_without_its_arguments() -> None:
    from arbiter.audit.record import render_all

    broken = Event(
        kind="mcp",
        decision="allow",
        reason="allowed",
        actor={"subject": "s"},
        arguments={"x": {1, 2}},
        request_id=9,
    )
    fine = _bodies(1)[0]
    bodies = render_all(RENDER, [broken])
    assert len(bodies) == 1 and bodies[0]["id"] == broken.id and bodies[0]["request_id"] == 9
    assert bodies[0]["outcome"]["render_error"] == "TypeError" and bodies[0]["args"] is None
    assert set(bodies[0]) == set(fine)
