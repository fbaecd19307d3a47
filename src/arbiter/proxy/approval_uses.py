"""Single use of an approval: the id of each approval state Arbiter accepted, shared by every replica.

The sealed state (``request_state.py``) proves who may present it, for what and until when, but a copy
of it opens as well as the original, and the user approved *one* run. So the approval step claims the
state's id before the call runs, and a second claim of the same id fails, on any replica: a row of
``approval_uses`` (migration 0012) in the database the replicas share, whose primary key makes the
second insert fail. (Not Redis: a claim must not be lost to an eviction or a Redis restart, and every
deployment has the database.) Rows past their state's expiry can never be claimed again (the state no
longer opens), so they are deleted as new ones come.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = sa.MetaData()

uses = sa.Table(
    "approval_uses",
    metadata,
    sa.Column("state_id", sa.String(64), primary_key=True),
    sa.Column("used_s", sa.Float, nullable=False),
    sa.Column("expires_s", sa.Float, nullable=False),
)


class ApprovalUses:
    """Claims approval state ids, each at most once across the deployment."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock  # wall clock: a state's expiry is a wall-clock time

    async def claim(self, state_id: str, expires_s: float) -> bool:
        """True the first time ``state_id`` is claimed; False if it was claimed before, by any replica."""
        now = self._clock()
        try:
            async with self._engine.begin() as db:
                await db.execute(uses.delete().where(uses.c.expires_s < now))
                await db.execute(uses.insert().values(state_id=state_id, used_s=now, expires_s=expires_s))
        except IntegrityError:
            return False
        return True
