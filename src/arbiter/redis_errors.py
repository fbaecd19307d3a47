"""What a Redis call can fail with, for every place Arbiter uses Redis (policy feed, limits).

redis-py raises its own errors, OSError and timeouts; and when the server dies while it reconnects
it can also leak the event loop's own complaint about the closed transport (uvloop: a bare
RuntimeError "unable to perform operation on <TCPTransport closed=True>"). Letting that one escape a
background task took the whole lifespan, and /mcp with it, down in CI.
"""

from __future__ import annotations

from redis.exceptions import RedisError

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, RuntimeError)
