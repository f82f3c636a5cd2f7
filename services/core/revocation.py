"""The revocation list every service consults when it verifies an access token.

Three kinds of entry, each kept only as long as the tokens it can affect may live: a token id (jti), a refresh
family (one login session), and a per-user cut-off (every token issued before it is revoked). Redis in mesh mode,
shared by every process; a dictionary in embedded mode, shared by the services of the one process.
"""

from __future__ import annotations

import time
from typing import Protocol

from services.core.redis_store import REDIS_ERRORS, RedisConnection


class RevocationList(Protocol):
    """Where revocations are written (by auth) and read (by every service)."""

    async def revoke_token(self, jti: str, ttl_seconds: float) -> None:
        """Revoke one token for `ttl_seconds` (its remaining lifetime)."""

    async def revoke_family(self, family_id: str, ttl_seconds: float) -> None:
        """Revoke every token of a login session."""

    async def revoke_user_before(self, user_id: str, cutoff: float, ttl_seconds: float) -> None:
        """Revoke every token of `user_id` issued before the epoch time `cutoff`."""

    async def is_revoked(self, jti: str, family_id: str, user_id: str, issued_at: float) -> bool:
        """True when any entry covers this token. Raises StoreUnavailable when the list cannot be read."""


def _ttl_ms(ttl_seconds: float) -> int:
    return max(1, int(ttl_seconds * 1000))


class RedisRevocationList:
    """Revocations as Redis keys with TTLs; one MGET per check."""

    def __init__(self, redis: RedisConnection) -> None:
        self._redis = redis

    async def _set(self, key: str, value: str, ttl_seconds: float) -> None:
        self._redis.check_available()
        try:
            await self._redis.client.set(key, value, px=_ttl_ms(ttl_seconds))
        except REDIS_ERRORS as exc:
            raise self._redis.mark_down(exc) from exc

    async def revoke_token(self, jti: str, ttl_seconds: float) -> None:
        await self._set(self._redis.key("revoked", "jti", jti), "1", ttl_seconds)

    async def revoke_family(self, family_id: str, ttl_seconds: float) -> None:
        await self._set(self._redis.key("revoked", "fam", family_id), "1", ttl_seconds)

    async def revoke_user_before(self, user_id: str, cutoff: float, ttl_seconds: float) -> None:
        # A later cut-off always wins: concurrent writers can only move it forward.
        key = self._redis.key("revoked", "user", user_id)
        self._redis.check_available()
        try:
            await self._redis.client.eval(
                "local c = tonumber(redis.call('GET', KEYS[1]) or '0') "
                "if tonumber(ARGV[1]) > c then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end",
                1,
                key,
                repr(cutoff),
                _ttl_ms(ttl_seconds),
            )
        except REDIS_ERRORS as exc:
            raise self._redis.mark_down(exc) from exc

    async def is_revoked(self, jti: str, family_id: str, user_id: str, issued_at: float) -> bool:
        self._redis.check_available()
        keys = [
            self._redis.key("revoked", "jti", jti),
            self._redis.key("revoked", "fam", family_id or "-"),
            self._redis.key("revoked", "user", user_id),
        ]
        try:
            jti_hit, family_hit, cutoff = await self._redis.client.mget(keys)
        except REDIS_ERRORS as exc:
            raise self._redis.mark_down(exc) from exc
        return bool(jti_hit or family_hit) or (cutoff is not None and issued_at < float(cutoff))


class MemoryRevocationList:
    """Revocations in a dictionary (embedded mode: one process, nothing to share)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, float]] = {}  # key -> (value, expiry on the monotonic clock)

    def _put(self, key: str, value: float, ttl_seconds: float) -> None:
        self._purge()
        self._entries[key] = (value, time.monotonic() + ttl_seconds)

    def _get(self, key: str) -> float | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _purge(self) -> None:
        if len(self._entries) > 10_000:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}

    async def revoke_token(self, jti: str, ttl_seconds: float) -> None:
        self._put(f"jti:{jti}", 1, ttl_seconds)

    async def revoke_family(self, family_id: str, ttl_seconds: float) -> None:
        self._put(f"fam:{family_id}", 1, ttl_seconds)

    async def revoke_user_before(self, user_id: str, cutoff: float, ttl_seconds: float) -> None:
        self._put(f"user:{user_id}", max(cutoff, self._get(f"user:{user_id}") or 0), ttl_seconds)

    async def is_revoked(self, jti: str, family_id: str, user_id: str, issued_at: float) -> bool:
        if self._get(f"jti:{jti}") or (family_id and self._get(f"fam:{family_id}")):
            return True
        cutoff = self._get(f"user:{user_id}")
        return cutoff is not None and issued_at < cutoff
