"""Building the limiter from settings: which backend (``limits.backend``), on which Redis client."""

from __future__ import annotations

import time

from redis.asyncio import BlockingConnectionPool, Redis

from arbiter.errors import ConfigError
from arbiter.limits.backend import ManagedBackend
from arbiter.limits.failover import FailoverBackend
from arbiter.limits.limiter import Limiter
from arbiter.limits.local import LocalBackend
from arbiter.limits.memory import Clock, MemoryBackend
from arbiter.limits.redis_backend import RedisBackend
from arbiter.limits.store import LimitStore
from arbiter.settings import LimitSettings

# Connections the shared pool may open: one per Redis round trip in flight (an admission, a refund, a
# publish) plus the one the policy feed's pub/sub holds. A call that finds them all busy waits for one,
# within the same timeout as any round trip, rather than failing at once (which the limits would count
# as Redis being down, refusing every limited call for limits.redis_retry_s).
MAX_CONNECTIONS = 200


def build_redis(url: str, timeout_s: float) -> Redis:
    """The process's one Redis client (one connection pool), for limits and the policy change feed.

    Every round trip is bounded by ``timeout_s`` (``limits.redis_timeout_s``): longer counts as Redis
    down. The policy change feed waits for its pub/sub messages with a read timeout of its own."""
    pool = BlockingConnectionPool.from_url(  # pyright: ignore[reportUnknownMemberType]
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=0,
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes the pool


def build_backend(
    settings: LimitSettings, store: LimitStore, redis: Redis | None, clock: Clock = time.time
) -> ManagedBackend:
    """Redis with failover when ``limits.backend`` asks for it (``auto``: when there is a client), else
    the in-process backend with its spend kept in the database."""
    use_redis = settings.backend == "redis" or (settings.backend == "auto" and redis is not None)
    if not use_redis:
        return LocalBackend(MemoryBackend(clock, track_spend=True), store, settings)
    if redis is None:
        raise ConfigError("limits.backend is 'redis' but ARBITER_REDIS_URL is not set")
    return FailoverBackend(RedisBackend(redis, settings.redis_prefix), MemoryBackend(clock), settings)


def build_limiter(
    settings: LimitSettings, store: LimitStore, redis: Redis | None = None, clock: Clock = time.time
) -> Limiter:
    """The limiter ``create_app`` runs: config from ``store``, the backend ``settings`` ask for."""
    return Limiter(settings, store, build_backend(settings, store, redis, clock), clock)
