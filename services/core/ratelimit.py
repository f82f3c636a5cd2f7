"""Sliding-window rate limits, shared by every process through Redis (in-process in embedded mode).

A sliding log (one sorted-set entry per event, Redis server time) is exact: the 11th event inside any 60 s window
is refused, whatever the window boundaries. `retry_after` says when the oldest counted event leaves the window.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from services.core.redis_store import REDIS_ERRORS, RedisConnection


@dataclass(frozen=True)
class Limit:
    """At most `max_events` per `window_seconds` per key."""

    name: str
    max_events: int
    window_seconds: float


@dataclass(frozen=True)
class Decision:
    """The answer for one event."""

    allowed: bool
    retry_after: float = 0.0


class RateLimiter(Protocol):
    """Counts events per (limit, key)."""

    async def hit(self, limit: Limit, key: str) -> Decision:
        """Count one event if it fits; refuse it otherwise. Raises StoreUnavailable."""

    async def check(self, limit: Limit, key: str) -> Decision:
        """Would one more event fit? Counts nothing. Raises StoreUnavailable."""

    async def reset(self, limit: Limit, key: str) -> None:
        """Forget the events counted for `key` (e.g. failures before a success). Raises StoreUnavailable."""


# KEYS[1] = log key; ARGV = window ms, max events, member, count (1 = record the event, 0 = only check)
_SLIDING_LOG = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
end
return {1, 0}
"""


class RedisRateLimiter:
    """Sliding logs in Redis sorted sets, updated atomically by one Lua script."""

    def __init__(self, redis: RedisConnection) -> None:
        self._redis = redis
        self._script = redis.client.register_script(_SLIDING_LOG)

    async def _run(self, limit: Limit, key: str, record: bool) -> Decision:
        self._redis.check_available()
        try:
            allowed, wait_ms = await self._script(
                keys=[self._redis.key("rl", limit.name, key)],
                args=[int(limit.window_seconds * 1000), limit.max_events, uuid.uuid4().hex, "1" if record else "0"],
            )
        except REDIS_ERRORS as exc:
            raise self._redis.mark_down(exc) from exc
        return Decision(bool(allowed), max(0.0, float(wait_ms) / 1000))

    async def hit(self, limit: Limit, key: str) -> Decision:
        return await self._run(limit, key, record=True)

    async def check(self, limit: Limit, key: str) -> Decision:
        return await self._run(limit, key, record=False)

    async def reset(self, limit: Limit, key: str) -> None:
        self._redis.check_available()
        try:
            await self._redis.client.delete(self._redis.key("rl", limit.name, key))
        except REDIS_ERRORS as exc:
            raise self._redis.mark_down(exc) from exc


class MemoryRateLimiter:
    """Sliding logs in process memory (embedded mode)."""

    def __init__(self) -> None:
        self._logs: dict[tuple[str, str], deque[float]] = {}

    def _log(self, limit: Limit, key: str) -> deque[float]:
        log = self._logs.setdefault((limit.name, key), deque())
        now = time.monotonic()
        while log and log[0] <= now - limit.window_seconds:
            log.popleft()
        if len(self._logs) > 100_000:  # bound memory: forget idle keys
            self._logs = {k: v for k, v in self._logs.items() if v}
        return log

    def _decide(self, limit: Limit, log: deque[float]) -> Decision:
        if len(log) >= limit.max_events:
            return Decision(False, log[0] + limit.window_seconds - time.monotonic())
        return Decision(True)

    async def hit(self, limit: Limit, key: str) -> Decision:
        log = self._log(limit, key)
        decision = self._decide(limit, log)
        if decision.allowed:
            log.append(time.monotonic())
        return decision

    async def check(self, limit: Limit, key: str) -> Decision:
        return self._decide(limit, self._log(limit, key))

    async def reset(self, limit: Limit, key: str) -> None:
        self._logs.pop((limit.name, key), None)
