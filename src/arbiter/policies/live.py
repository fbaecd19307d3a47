"""The live policy of one process, and how it follows changes made by any replica.

``LivePolicy.engine`` is swapped whole when the version in the database moves, so requests in flight
finish on the engine they started with and nothing waits for a reload. Changes are noticed by
polling the version (one tiny query per interval) and, with Redis configured, at once through a
pub/sub message that the writing replica publishes; the poll stays on as a safety net. The Redis
client is the process's one (built by ``create_app``, which closes it).
"""

from __future__ import annotations

import logging
from typing import cast

import anyio
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError

from arbiter.policies.engine import PolicyEngine, empty_engine
from arbiter.policies.rules import Rule
from arbiter.policies.store import PolicyStore
from arbiter.redis_errors import REDIS_ERRORS
from arbiter.settings import PolicySettings

log = logging.getLogger(__name__)
# How long one wait for a feed message lasts before waiting again: a bounded read, whatever the
# client's socket timeout and the redis-py version make of an unbounded one.
_FEED_READ_S = 30.0


class LivePolicy:
    def __init__(self, store: PolicyStore, settings: PolicySettings, redis: Redis | None = None) -> None:
        self.store = store
        self.settings = settings
        self.engine: PolicyEngine = empty_engine()  # deny everything until the first load
        self.rule_ids: list[tuple[int, Rule]] = []
        self._redis = redis  # shared with the limits; its owner closes it
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._loaded = False
        self._feed_up = False  # the Redis change feed is subscribed and delivering

    async def reload(self) -> PolicyEngine:
        """Load the policy if the database has a newer version; return the engine now in force."""
        async with self._lock:  # one load at a time; a second caller then finds it current
            version = await self.store.version()
            if not self._loaded or version != self.engine.version:
                engine, ids = await self.store.load()
                self.engine, self.rule_ids, self._loaded = engine, ids, True
                log.info("policy version %d in force (%d rules)", engine.version, len(engine.rules))
            return self.engine

    async def changed(self, version: int) -> None:
        """After this process changed the policy: take it up now and tell the other replicas."""
        await self.reload()
        if self._redis is not None:
            try:
                with anyio.fail_after(2):
                    await self._redis.publish(self.settings.redis_channel, str(version))  # pyright: ignore[reportUnknownMemberType]
            except REDIS_ERRORS as exc:
                log.warning(
                    "could not publish policy version %d to Redis (%s); replicas will poll", version, exc
                )

    async def run(self, stopping: anyio.Event) -> None:
        """Follow changes until ``stopping`` is set."""
        interval = self.settings.poll_interval_s
        async with anyio.create_task_group() as tg:
            if self._redis is not None:
                tg.start_soon(self._listen, self._redis)

            async def wake_on_stop() -> None:
                await stopping.wait()
                self._wake.set()

            tg.start_soon(wake_on_stop)
            while not stopping.is_set():
                # Poll slowly only while the Redis feed is up; without it, as often as without Redis.
                slow = self._feed_up and self.settings.poll_interval_with_redis_s
                with anyio.move_on_after(slow or interval):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()
                if stopping.is_set():
                    break
                try:
                    await self.reload()
                except (SQLAlchemyError, OSError) as exc:
                    log.warning(
                        "could not check the policy version (%s); keeping version %d",
                        exc,
                        self.engine.version,
                    )
            tg.cancel_scope.cancel()

    async def _listen(self, redis: Redis) -> None:
        backoff = 0.5
        while True:
            try:
                pubsub = redis.pubsub()  # pyright: ignore[reportUnknownMemberType]
                async with pubsub:
                    await pubsub.subscribe(self.settings.redis_channel)
                    backoff = 0.5
                    self._feed_up = True
                    self._wake.set()  # changes made while the feed was down: check once now
                    while True:
                        message = cast(
                            "dict[str, object] | None", await pubsub.get_message(timeout=_FEED_READ_S)
                        )
                        if message is not None and message.get("type") == "message":
                            self._wake.set()
            except REDIS_ERRORS as exc:
                log.warning("policy change feed from Redis lost (%s); polling meanwhile", exc)
            if self._feed_up:
                self._feed_up = False
                self._wake.set()  # back to fast polling at once
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
