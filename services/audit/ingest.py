"""Ingestion: events from the Redis stream (mesh mode) or the in-process queue (embedded mode) into the ledger.

One consumer loop serves both: read a batch, check every event (a bad one is set aside and never blocks the
rest), commit the batch in one ledger transaction, then acknowledge. With Redis the audit processes share a
consumer group, so each entry goes to one of them and stays pending until it is committed: after a crash the
entries a consumer held are taken over by another one (XAUTOCLAIM) once idle for AUDIT_CLAIM_IDLE_SECONDS, and
an entry committed but not yet acknowledged is skipped by its event id when it comes back. A stream or group
lost with Redis is recreated and read from its first entry. Acknowledged entries are deleted from the stream,
which therefore only holds what the ledger has not committed yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from services.audit.checkpoints import Checkpoints
from services.audit.events import NewEvent, check_event
from services.audit.ledger import Ledger
from services.core.audit_client import STREAM, STREAM_FIELD
from services.core.errors import ServiceError
from services.core.redis_store import stream_entries
from voiceassist.audit.v1 import audit_pb2

log = logging.getLogger(__name__)

GROUP = "ledger"
REJECTED_STREAM = STREAM + ".rejected"  # events the ledger cannot take, with the reason, for an operator
MAX_BACKOFF_SECONDS = 5.0
SPLIT_AFTER_FAILURES = 3  # a batch failing this often for a reason other than an outage is committed one by one

EVENTS = Counter("audit_ingest_events_total", "Events taken from the stream or queue, by result.", ["result"])
RECLAIMED = Counter("audit_ingest_reclaimed_total", "Stream entries taken over from consumers that stopped.")
COMMIT_SECONDS = Histogram(
    "audit_ingest_commit_seconds", "Time to commit one batch to the ledger.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
TREE_SIZE = Gauge("audit_ledger_tree_size", "Events in the ledger, as last committed by this process.")
BACKLOG = Gauge("audit_ingest_backlog", "Events waiting in the stream or queue.")


@dataclass(frozen=True)
class Delivery:
    """One entry read from a source: the event, or why it could not be read."""

    ref: str | None  # stream entry id; None for the in-process queue
    event: audit_pb2.Event | None
    error: str = ""


class EventSource(Protocol):
    """Where the consumer reads events from."""

    async def read(self, count: int) -> list[Delivery]:
        """Up to `count` entries, waiting a little when there are none."""

    async def ack(self, refs: Sequence[str]) -> None:
        """The entries are committed (or rejected): forget them."""

    async def reject(self, delivery: Delivery, reason: str) -> None:
        """Set an entry aside that can never be committed, then forget it."""

    def has_buffered(self) -> bool:
        """True while entries the consumer must still drain before stopping are waiting."""

    async def close(self) -> None:
        """Release connections."""


def consumer_name(configured: str) -> str:
    """This process's name in the consumer group."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class RedisStreamSource:
    """The `<prefix>audit.events` stream, read through the consumer group "ledger"."""

    def __init__(
        self, url: str, prefix: str, consumer: str, *, block_seconds: float, claim_idle_seconds: float,
        reclaim_interval_seconds: float,
    ) -> None:  # fmt: skip
        # Its own client: a blocking read outlasts the short timeout of the process's shared connection.
        self._client = aioredis.Redis.from_url(url, socket_timeout=block_seconds + 5, socket_connect_timeout=2)
        self.stream = prefix + STREAM
        self.rejected = prefix + REJECTED_STREAM
        self.consumer = consumer
        self._block_ms = int(block_seconds * 1000)
        self._claim_idle_ms = int(claim_idle_seconds * 1000)
        self._reclaim_interval = reclaim_interval_seconds
        self._next_reclaim = 0.0
        self._claim_cursor = "0-0"
        self._group_ready = False

    async def _ensure_group(self) -> None:
        try:
            # From the stream's first entry: after Redis lost the group, nothing still in the stream is skipped.
            await self._client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            log.info("audit consumer group created", extra={"stream": self.stream})
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def read(self, count: int) -> list[Delivery]:
        if not self._group_ready:
            await self._ensure_group()
        try:
            if time.monotonic() >= self._next_reclaim:
                claimed = await self._reclaim(count)
                if claimed:
                    return claimed
            reply = await self._client.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=count,
                                                  block=self._block_ms)  # fmt: skip
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty, or the stream was deleted
                self._group_ready = False
                return []
            raise
        return [_delivery(ref, fields) for ref, fields in stream_entries(reply)]

    async def _reclaim(self, count: int) -> list[Delivery]:
        cursor, entries, *_ = await self._client.xautoclaim(
            self.stream, GROUP, self.consumer, self._claim_idle_ms, start_id=self._claim_cursor, count=count
        )
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":  # went through every pending entry: rest until the next interval
            self._next_reclaim = time.monotonic() + self._reclaim_interval
            BACKLOG.set(await self._client.xlen(self.stream))
            await self._forget_idle_consumers()
        if entries:
            RECLAIMED.inc(len(entries))
            log.warning("reclaimed audit entries from a stopped consumer", extra={"count": len(entries)})
        return [_delivery(ref, fields) for ref, fields in entries if fields is not None]

    async def _forget_idle_consumers(self) -> None:
        # Every process restart leaves a consumer name behind; drop the ones with nothing pending for long.
        for info in await self._client.xinfo_consumers(self.stream, GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.consumer and info["pending"] == 0 and info["idle"] > 10 * self._claim_idle_ms:
                await self._client.xgroup_delconsumer(self.stream, GROUP, name)

    async def ack(self, refs: Sequence[str]) -> None:
        if refs:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, *refs)
                pipe.xdel(self.stream, *refs)
                await pipe.execute()

    async def reject(self, delivery: Delivery, reason: str) -> None:
        raw = delivery.event.SerializeToString() if delivery.event is not None else b""
        await self._client.xadd(self.rejected, {"entry": delivery.ref or "", "reason": reason[:500], "event": raw})
        await self.ack([delivery.ref] if delivery.ref else [])

    def has_buffered(self) -> bool:
        return False  # whatever is left stays in the stream for the next consumer

    async def close(self) -> None:
        await self._client.aclose()


def _delivery(ref: bytes | str, fields: Mapping[bytes, bytes]) -> Delivery:
    ref = ref.decode() if isinstance(ref, bytes) else ref
    raw = fields.get(STREAM_FIELD)
    if raw is None:
        return Delivery(ref, None, "entry has no event field")
    try:
        return Delivery(ref, audit_pb2.Event.FromString(raw))
    except DecodeError:
        return Delivery(ref, None, "entry is not a serialized audit event")


class QueueSource:
    """The process's in-process queue (embedded mode), filled by the services' QueueSink."""

    def __init__(self, queue: asyncio.Queue[audit_pb2.Event], block_seconds: float) -> None:
        self._queue = queue
        self._block = block_seconds

    async def read(self, count: int) -> list[Delivery]:
        try:
            first = await asyncio.wait_for(self._queue.get(), self._block)
        except TimeoutError:
            return []
        events = [first]
        while len(events) < count and not self._queue.empty():
            events.append(self._queue.get_nowait())
        BACKLOG.set(self._queue.qsize())
        return [Delivery(None, e) for e in events]

    async def ack(self, refs: Sequence[str]) -> None:
        """Nothing to do: a queued event is gone once read."""

    async def reject(self, delivery: Delivery, reason: str) -> None:
        event_id = delivery.event.event_id if delivery.event is not None else ""
        log.error("audit event rejected", extra={"event_id": event_id, "reason": reason})

    def has_buffered(self) -> bool:
        return not self._queue.empty()

    async def close(self) -> None:
        """Nothing to release."""


def _is_outage(exc: BaseException) -> bool:
    """A database that cannot be reached (retry as is), as opposed to a batch the database refuses."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or "connect" in str(exc.orig).lower()
    return isinstance(exc, OSError | TimeoutError)


class Consumer:
    """Moves events from a source into the ledger until stopped."""

    def __init__(self, source: EventSource, ledger: Ledger, checkpoints: Checkpoints, batch_size: int) -> None:
        self._source = source
        self._ledger = ledger
        self._checkpoints = checkpoints
        self._batch_size = batch_size
        self._stopping = asyncio.Event()
        self._source_down = False

    async def run(self) -> None:
        """Read, commit, acknowledge; on stop, finish the batch in hand (and drain an in-process queue)."""
        backoff = 0.1
        while not self._stopping.is_set() or self._source.has_buffered():
            try:
                deliveries = await self._source.read(self._batch_size)
                if self._source_down:
                    log.info("audit event source reachable again")
                    self._source_down = False
                if deliveries:
                    await self._take(deliveries)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                if not self._source_down:
                    log.warning("audit event source unreachable; retrying", extra={"error": type(exc).__name__})
                    self._source_down = True
            except Exception:  # the loop must outlive any one bad batch; the entries stay pending
                log.exception("audit ingestion failed; retrying")
            else:
                continue
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def stop(self) -> None:
        """Ask the loop to end after the batch in hand."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _take(self, deliveries: list[Delivery]) -> None:
        accepted: list[tuple[Delivery, NewEvent]] = []
        for delivery in deliveries:
            if delivery.event is None:
                await self._reject(delivery, delivery.error)
                continue
            try:
                accepted.append((delivery, check_event(delivery.event, prefix="")))
            except ServiceError as exc:
                await self._reject(delivery, exc.message)
        if accepted and not await self._commit(accepted):
            return  # stopping during an outage: the entries stay pending for the next consumer
        await self._source.ack([d.ref for d, _ in accepted if d.ref])

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        EVENTS.labels("rejected").inc()
        log.error("audit entry rejected", extra={"entry": delivery.ref or "", "reason": reason})
        await self._source.reject(delivery, reason)

    async def _commit(self, accepted: list[tuple[Delivery, NewEvent]]) -> bool:
        """Commit the batch, retrying through database outages; False when stopped before it could."""
        failures, backoff = 0, 0.1
        while True:
            try:
                started = time.perf_counter()
                result = await self._ledger.append([event for _, event in accepted])
                COMMIT_SECONDS.observe(time.perf_counter() - started)
                break
            except SQLAlchemyError as exc:
                outage = _is_outage(exc)
                failures += 0 if outage else 1
                log.warning(
                    "audit batch not committed; retrying",
                    extra={"error": type(exc).__name__, "events": len(accepted), "outage": outage},
                )
                if failures >= SPLIT_AFTER_FAILURES and len(accepted) > 1:
                    return await self._commit_one_by_one(accepted)
                if failures >= SPLIT_AFTER_FAILURES:
                    await self._reject(accepted[0][0], f"the ledger refuses this event ({type(exc).__name__})")
                    return True
            except OSError as exc:
                log.warning("audit database unreachable; retrying", extra={"error": type(exc).__name__})
            if self._stopping.is_set():
                return False
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        EVENTS.labels("committed").inc(result.committed)
        EVENTS.labels("duplicate").inc(result.duplicates)
        TREE_SIZE.set(result.tree_size)
        try:
            await self._checkpoints.after_append(result.tree_size)
        except SQLAlchemyError:  # the periodic checkpoint will catch up
            log.exception("checkpoint after append failed")
        return True

    async def _commit_one_by_one(self, accepted: list[tuple[Delivery, NewEvent]]) -> bool:
        # Finds the event the database refuses instead of holding back every event behind it.
        for item in accepted:
            if not await self._commit([item]):
                return False
        return True
