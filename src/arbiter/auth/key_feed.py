"""API key changes reach every replica at once, over Redis pub/sub.

Each replica verifies keys from its in-memory cache (auth/apikeys.py). The replica where a key is created
or revoked updates its own cache at once and publishes here; the others reload theirs when they hear it,
so a revocation holds everywhere within a Redis round trip and one query. The maintenance pass
(``upstream.maintain_interval_s``) still reloads the cache: the safety net when a message is lost, and the
only way without Redis. The channel is the policy feed's with ``:api-keys`` appended, so deployments
that share a Redis and set ``policy.redis_channel`` apart keep their key changes apart too.
"""

from __future__ import annotations

import logging
from typing import cast

import anyio
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError

from arbiter.auth.apikeys import ApiKeys
from arbiter.redis_errors import REDIS_ERRORS

log = logging.getLogger(__name__)
_PUBLISH_S = 2.0  # a change is answered without waiting longer on Redis; the others then poll
_READ_S = 30.0  # one bounded wait for a message, then wait again


class KeyFeed:
    def __init__(self, keys: ApiKeys, redis: Redis, channel: str) -> None:
        self._keys = keys
        self._redis = redis  # the process's one client; its owner closes it
        self.channel = channel

    async def changed(self) -> None:
        """Tell the other replicas that the keys changed (they reload); a failure is logged, not raised."""
        try:
            with anyio.fail_after(_PUBLISH_S):
                await self._redis.publish(self.channel, "changed")  # pyright: ignore[reportUnknownMemberType]
        except REDIS_ERRORS as exc:
            log.warning("could not publish an API key change to Redis (%s); replicas will poll", exc)

    async def run(self, stopping: anyio.Event) -> None:
        """Reload the key cache on every change another replica announces, until ``stopping`` is set."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            await stopping.wait()
            tg.cancel_scope.cancel()

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with self._redis.pubsub() as pubsub:  # pyright: ignore[reportUnknownMemberType]
                    await pubsub.subscribe(self.channel)
                    backoff = 0.5
                    await self._reload()  # changes made while the feed was down
                    while True:
                        message = cast("dict[str, object] | None", await pubsub.get_message(timeout=_READ_S))
                        if message is not None and message.get("type") == "message":
                            await self._reload()
            except REDIS_ERRORS as exc:
                log.warning("API key change feed from Redis lost (%s); polling meanwhile", exc)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _reload(self) -> None:
        try:
            await self._keys.reload()
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not reload API keys after a change (%s); the next pass retries", exc)
