"""The Redis backend: every replica's limits in one Redis, admissions checked and charged by Lua.

Admissions that arrive while one is in flight go to Redis together, as one script over all their
plans (``limits.coalesce``): each plan is checked and charged in turn, exactly as one script per call
would, and the client's own cost per round trip, most of what an admission costs, is shared. A
caller whose deadline passes while its plan is on its way is counted as Redis being down, as one
whose own round trip overran always was: the plan may still have been charged in Redis.

The script reads the time with ``redis.call('TIME')``, so buckets refill, loop windows slide and budget
periods turn by Redis's clock alone: a replica whose clock is off changes nothing. Scripts run
atomically, so concurrent calls from any number of replicas cannot both take the last token or the last
unit of a budget. Keys are computed in the script (budget counters get the period suffix there), so
this needs a standalone Redis (or Sentinel), not Redis Cluster.

The client is the process's one Redis client (see ``limits.factory.build_redis``), shared with the
policy change feed: its owner closes it, not this backend. Whether Redis is up, and what to do when it
is not, is the failover backend's business (``limits.failover``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from arbiter.limits.backend import PERIOD_CODES, Plan, Verdict, counter_ttl_s
from arbiter.limits.coalesce import Coalescer

# Plans in one script at most: a plan's commands take Redis some 10-20 µs, so a full batch holds
# Redis for about a millisecond.
MAX_BATCH = 64

# KEYS: none (see the module docstring). ARGV[1]: a JSON list of plans, each:
#   b = [[key, capacity, tokens per ms], ...]   l = [key, max, window ms, member] or []
#   c = [[key, period code h|d|m, limit micro-units, ttl s], ...]   cost = micro-units
#   r = [request key, ttl ms] or []
# Returns a JSON list with, for each plan in order, [outcome, index (1-based), retry after ms, spent,
# now ms, charged keys] (cjson writes an empty list as {}: both read as no keys). Plans are admitted in
# turn: a later plan sees what an earlier one took. A held request key is refused first
# ("duplicate") and that plan writes nothing; an admitted call sets its key in the same step. A
# script that fails fails its whole batch (every caller sees Redis down); the plans are validated
# before they get here (rates above zero, bounded budgets), so none is known to.
ADMIT_LUA = """
local plans = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local secs = math.floor(now / 1000)

local function month_index(days)
  -- civil_from_days (H. Hinnant): the proleptic Gregorian year and month of a day count
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)
  yoe = math.floor(yoe / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y * 12 + m - 1
end

local function period_id(code)
  if code == 'h' then return 'h' .. string.format('%d', math.floor(secs / 3600)) end
  if code == 'd' then return 'd' .. string.format('%d', math.floor(secs / 86400)) end
  return 'm' .. string.format('%d', month_index(math.floor(secs / 86400)))
end

local function admit(p)
  if #p.r > 0 and redis.call('EXISTS', p.r[1]) == 1 then
    return {'duplicate', 0, 0, 0, now, {}}
  end

  local tokens = {}
  for i, b in ipairs(p.b) do
    local cap, rate = tonumber(b[2]), tonumber(b[3])
    local s = redis.call('HMGET', b[1], 'k', 't')
    local have, at = tonumber(s[1]), tonumber(s[2])
    if have == nil or at == nil then have = cap; at = now end
    if now > at then have = have + (now - at) * rate end
    if have > cap then have = cap end
    if have < 1 then
      return {'rate', i, (1 - have) / rate, 0, now, {}}
    end
    tokens[i] = have
  end

  local loop = (#p.l > 0) and p.l or nil
  if loop then
    local window = tonumber(loop[3])
    redis.call('ZREMRANGEBYSCORE', loop[1], '-inf', now - window)
    if redis.call('ZCARD', loop[1]) >= tonumber(loop[2]) then
      local oldest = redis.call('ZRANGE', loop[1], 0, 0, 'WITHSCORES')
      return {'loop', 1, tonumber(oldest[2]) + window - now, 0, now, {}}
    end
  end

  local charged = {}
  if p.cost > 0 then
    for i, c in ipairs(p.c) do
      local key = c[1] .. ':' .. period_id(c[2])
      local spent = tonumber(redis.call('GET', key) or '0')
      if spent + p.cost > tonumber(c[3]) then
        return {'budget', i, 0, spent, now, {}}
      end
      charged[i] = key
    end
  end

  for i, b in ipairs(p.b) do
    redis.call('HSET', b[1], 'k', string.format('%.17g', tokens[i] - 1), 't', string.format('%d', now))
    redis.call('PEXPIRE', b[1], math.ceil(tonumber(b[2]) / tonumber(b[3])) + 1000)
  end
  if loop then
    redis.call('ZADD', loop[1], now, loop[4])
    redis.call('PEXPIRE', loop[1], math.ceil(tonumber(loop[3])) + 1000)
  end
  for i, key in ipairs(charged) do
    redis.call('INCRBY', key, string.format('%d', p.cost))
    redis.call('EXPIRE', key, tonumber(p.c[i][4]))
  end
  if #charged > 0 and #p.r > 0 then
    redis.call('SET', p.r[1], '1', 'PX', tonumber(p.r[2]))
  end
  return {'ok', 0, 0, 0, now, charged}
end

local out = {}
for i, p in ipairs(plans) do out[i] = admit(p) end
return cjson.encode(out)
"""

# ARGV[1]: {"k": [charged counter keys], "cost": micro-units, "r": request key or ""}
REFUND_LUA = """
local p = cjson.decode(ARGV[1])
for _, key in ipairs(p.k) do
  if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, string.format('%d', p.cost)) end
end
if p.r ~= '' then redis.call('DEL', p.r) end
return 1
"""


class RedisBackend:
    name = "redis"

    def __init__(self, client: Redis, prefix: str) -> None:
        self._prefix = prefix
        self._redis = client
        self._admit = client.register_script(ADMIT_LUA)
        self._refund = client.register_script(REFUND_LUA)
        self._batches: Coalescer[dict[str, Any], list[Any]] = Coalescer(self._admit_all, MAX_BATCH)

    async def _admit_all(self, payloads: list[dict[str, Any]]) -> list[list[Any]]:
        raw: Any = await self._admit(keys=[], args=[orjson.dumps(payloads)])
        verdicts: list[list[Any]] = orjson.loads(raw)
        return verdicts

    async def admit(self, plan: Plan) -> Verdict:
        pre = self._prefix
        payload: dict[str, Any] = {
            "b": [[pre + b.key, b.capacity, b.rate_per_s / 1000.0] for b in plan.buckets],
            "l": (
                [pre + plan.loop.key, plan.loop.max_repeats, plan.loop.window_s * 1000.0, plan.call_id]
                if plan.loop
                else []
            ),
            "c": [
                [pre + c.key, PERIOD_CODES[c.period], c.limit_micros, counter_ttl_s(c.period)]
                for c in plan.counters
            ],
            "cost": plan.cost_micros,
            "r": [pre + plan.request_key, round(plan.request_ttl_s * 1000)] if plan.request_key else [],
        }
        outcome, index, retry_ms, spent, now_ms, charged = await self._batches.submit(payload)
        return Verdict(
            outcome=outcome,
            now=float(now_ms) / 1000.0,
            index=max(int(index) - 1, 0),
            retry_after_s=max(float(retry_ms), 0.0) / 1000.0,
            spent_micros=int(spent),
            charged=tuple(str(k)[len(pre) :] for k in charged),
        )

    async def refund(self, charged: Sequence[str], cost_micros: int, request_key: str | None) -> None:
        pre = self._prefix
        payload = {
            "k": [pre + k for k in charged],
            "cost": cost_micros,
            "r": pre + request_key if request_key else "",
        }
        await self._refund(keys=[], args=[orjson.dumps(payload)])

    async def ping(self) -> None:
        await self._redis.ping()  # pyright: ignore[reportUnknownMemberType]

    async def aclose(self) -> None:
        await self._batches.aclose()  # the client is shared: closed by its owner
