"""The process's Redis connection, with a short memory of outages for the fail-open paths.

Callers that must not stall when Redis is gone (token checks, rate limits, audit) ask `available` first; after a
connection error the connection stays "down" for a second instead of paying a timeout on every call.

TLS is the URL's: `rediss://` with redis-py's query parameters (ssl_ca_certs, ssl_certfile, ssl_keyfile,
ssl_cert_reqs, ssl_check_hostname), which `from_url` reads; docs/backend-tls.md.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import XReadGroupResponse

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
DOWN_SECONDS = 1.0


def stream_entries(reply: XReadGroupResponse | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The (id, fields) entries of an XREADGROUP reply, over all its streams. Our clients speak RESP2 and
    do not decode: the reply is a list of [stream, entries] pairs of bytes (RESP3 would answer a dict)."""
    if isinstance(reply, dict):
        raise TypeError("XREADGROUP answered in RESP3; the clients here speak RESP2")
    return [entry for _stream, entries in reply or [] for entry in entries]


class StoreUnavailable(Exception):
    """Redis could not be reached; the caller decides whether to fail open or closed."""


class RedisConnection:
    """One Redis client per process plus key naming under the configured prefix."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self.prefix = prefix
        self._down_until = 0.0

    def key(self, *parts: str) -> str:
        """A key under this system's prefix: key("revoked", "jti", x) -> "va:revoked:jti:x"."""
        return self.prefix + ":".join(parts)

    @property
    def available(self) -> bool:
        """False for a moment after a connection error."""
        return time.monotonic() >= self._down_until

    def mark_down(self, exc: BaseException) -> StoreUnavailable:
        """Remember an outage; returns the exception to raise."""
        if self.available:
            # The message tells a refused connection from a failed TLS handshake (a CA or host name that fails).
            log.warning("redis unreachable", extra={"error": type(exc).__name__, "detail": str(exc)})
        self._down_until = time.monotonic() + DOWN_SECONDS
        return StoreUnavailable(str(exc))

    def check_available(self) -> None:
        """Raise StoreUnavailable during a remembered outage."""
        if not self.available:
            raise StoreUnavailable("redis marked down after a recent error")

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
