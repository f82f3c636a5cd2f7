"""Indexing jobs: which document (and generation) to run through the pipeline next.

Mesh mode: a Redis stream with a consumer group. A job stays pending until its worker acknowledges it; a
worker renews its claim on a heartbeat while it runs, and a job whose worker went silent (crashed) is taken over
by another process after `claim_idle_seconds`, which resumes it; a job taken over too often ends FAILED.
Embedded mode: an in-process queue; jobs lost with the process are rebuilt from the database at start-up (every
unfinished document is queued again).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from services.core.redis_store import stream_entries

GROUP = "indexers"


@dataclass(frozen=True)
class Job:
    """Index `document_id` at `generation`; `attempt` counts retries after unexpected failures."""

    document_id: str
    generation: int
    attempt: int = 1
    receipt: str = ""  # the stream entry id (mesh mode)
    deliveries: int = 1  # how often a worker took this very entry: more than once means a worker died on it


class QueueFull(Exception):
    """The in-process queue holds its maximum of waiting jobs."""


class JobQueue(Protocol):
    """Where uploads leave jobs and workers take them."""

    async def put(self, job: Job) -> None:
        """Add a job; QueueFull when no more fit."""

    async def take(self, limit: int = 1) -> list[Job]:
        """The next jobs: waits for one, then adds those already waiting, up to `limit` in all."""

    async def renew(self, *jobs: Job) -> None:
        """Tell the queue the jobs' worker is alive."""

    async def done(self, *jobs: Job) -> None:
        """Remove finished jobs."""

    async def close(self) -> None:
        """Release connections."""


class MemoryJobQueue:
    """Jobs in this process (embedded mode)."""

    def __init__(self, max_pending: int) -> None:
        self._queue: asyncio.Queue[Job] = asyncio.Queue(max_pending)

    async def put(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None

    async def take(self, limit: int = 1) -> list[Job]:
        jobs = [await self._queue.get()]
        while len(jobs) < limit and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        return jobs

    async def renew(self, *jobs: Job) -> None:
        """Nothing to renew: the jobs die with the process and are rebuilt from the database."""

    async def done(self, *jobs: Job) -> None:
        """Already removed by take()."""

    async def close(self) -> None:
        """Nothing to release."""


class RedisJobQueue:
    """Jobs on a Redis stream shared by every search process (mesh mode)."""

    def __init__(self, url: str, key: str, claim_idle_seconds: int, block_seconds: float = 5.0) -> None:
        # Its own connection: blocking reads outlast the short timeout of the shared one.
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=block_seconds + 10)
        self._key = key
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._claim_idle_ms = claim_idle_seconds * 1000
        self._block_ms = int(block_seconds * 1000)
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def put(self, job: Job) -> None:
        fields: dict[FieldT, EncodableT] = {
            "document_id": job.document_id, "generation": str(job.generation), "attempt": str(job.attempt)
        }
        await self._redis.xadd(self._key, fields)

    async def take(self, limit: int = 1) -> list[Job]:
        await self._ensure_group()
        while True:
            # First, jobs whose worker stopped renewing its claim (a crashed process): resume them.
            _cursor, claimed, *_ = await self._redis.xautoclaim(
                self._key, GROUP, self._consumer, self._claim_idle_ms, start_id="0-0", count=limit
            )
            entries = [entry for entry in claimed if entry and entry[1]]
            deliveries: dict[str, int] = {}
            if entries:
                for entry_id, _fields in entries:  # rare (a worker died): one look-up per entry is fine
                    pending = await self._redis.xpending_range(self._key, GROUP, entry_id, entry_id, 1)
                    deliveries[_text(entry_id)] = int(pending[0]["times_delivered"]) if pending else 1
            else:
                reply = await self._redis.xreadgroup(
                    GROUP, self._consumer, {self._key: ">"}, count=limit, block=self._block_ms
                )
                entries = stream_entries(reply)
            if entries:
                return [
                    Job(
                        fields[b"document_id"].decode(),
                        int(fields[b"generation"]),
                        int(fields.get(b"attempt", b"1")),
                        _text(entry_id),
                        deliveries.get(_text(entry_id), 1),
                    )
                    for entry_id, fields in entries
                ]

    async def renew(self, *jobs: Job) -> None:
        # XCLAIM by the owner resets the entries' idle time, so nobody takes them over while work goes on.
        if jobs:
            await self._redis.xclaim(self._key, GROUP, self._consumer, 0, [j.receipt for j in jobs], justid=True)

    async def done(self, *jobs: Job) -> None:
        if jobs:
            receipts = [j.receipt for j in jobs]
            await self._redis.xack(self._key, GROUP, *receipts)
            await self._redis.xdel(self._key, *receipts)

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
