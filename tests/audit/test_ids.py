"""Audit record ids: RFC 9562 UUIDv7 carrying the record's own millisecond."""

from __future__ import annotations

import uuid

from arbiter.audit.record import uuid7


def test_uuid7_carries_the_given_millisecond_and_is_random_within_it() -> None:
    for ms in (0, 1, 1_700_000_000_123, 2**48 - 1):
        ids = {uuid7(ms) for _ in range(200)}
        assert len(ids) == 200
        for text in ids:
            u = uuid.UUID(text)
            assert (u.version, u.variant) == (7, uuid.RFC_4122) and u.int >> 80 == ms and str(u) == text


def test_uuid7_sorts_by_time() -> None:
    ids = [uuid7(1_700_000_000_000 + i // 5) for i in range(1000)]
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)
    assert uuid.UUID(uuid7()).version == 7
