"""The one way every service records audit events.

`AuditClient.record()` builds the event (ids, time, request context, actor) and hands it to the process's sink
without waiting for the audit service: producers never block on it. Events never carry PHI: metadata keys that
name PHI are refused, identifiers in free-text values are redacted, and sizes are bounded.

`Runtime` picks the sink from settings:
- RedisStreamSink (REDIS_URL set): XADD to the stream `<REDIS_KEY_PREFIX>audit.events`, which the audit service
  consumes with a consumer group (commit, then XACK). While Redis is unreachable, events wait in a bounded local
  buffer and are flushed in order when it is back; the log and the `audit_client_*` metrics say so.
- QueueSink (no Redis, the audit service in this process): an in-process queue, consumed by the same consumer
  code (embedded mode).
- RpcSink (no Redis, the audit service in another process; services/core/audit_rpc_sink.py): AppendEvent calls
  from a bounded buffer, made with the credentials of the call that recorded the event (AppendEvent takes events
  from admins and services, and from anyone else only events they performed themselves).
A command that must know its events are committed brings its own sink: `voiceassist users` appends each event to
the ledger before it returns (services/audit/ledger_sink.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from services.core.context import Caller, current_request
from services.core.errors import FieldViolation, Reason, ServiceError
from services.core.limits import AUDIT
from services.core.redis_store import REDIS_ERRORS, RedisConnection
from voiceassist.audit.v1 import audit_pb2

log = logging.getLogger("voiceassist.audit")

STREAM = "audit.events"  # under REDIS_KEY_PREFIX
STREAM_FIELD = b"event"  # each stream entry: {event: serialized audit_pb2.Event}
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")  # ASCII, so every verifier sorts keys the same way
# Keys that would put PHI or secrets in the ledger; refused outright, whatever the value.
FORBIDDEN_METADATA_KEYS = frozenset(
    {
        "query", "question", "answer", "text", "transcript", "content", "prompt", "password", "token",
        "access_token", "refresh_token", "name", "full_name", "patient", "patient_name", "dob", "birth_date",
        "ssn", "mrn", "address", "phone", "email", "notes", "clinical_context",
    }
)  # fmt: skip
# Identifiers that slip into free text (error messages, file names); replaced before an event leaves the process.
_REDACTIONS = (
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[SSN]"),
    (re.compile(r"(?<![\w-])(?:\+?\d{1,2}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}\b"), "[PHONE]"),
)

SUCCESS = audit_pb2.OUTCOME_SUCCESS
FAILURE = audit_pb2.OUTCOME_FAILURE

FLUSH_BATCH = 500  # events per flush attempt
RETRY_SECONDS = 1.0  # between flush attempts while the transport is down
CLOSE_SECONDS = 5.0  # how long shutdown waits for buffered events to leave

SENT = Counter("audit_client_events_sent_total", "Audit events handed to the transport.", ["transport"])
BUFFERED = Gauge("audit_client_events_buffered", "Audit events waiting in the local buffer.", ["transport"])
DROPPED = Counter(
    "audit_client_events_dropped_total",
    "Audit events lost: buffer full, refused by the audit service, or still buffered at shutdown.",
    ["transport", "reason"],
)


def redact(text: str) -> str:
    """`text` with email addresses, SSNs and phone numbers replaced by placeholders."""
    for pattern, placeholder in _REDACTIONS:
        text = pattern.sub(placeholder, text)
    return text


def check_metadata(metadata: dict[str, str], field: str = "metadata") -> dict[str, str]:
    """The metadata if it is safe to store; ServiceError (VALIDATION_ERROR, with the field) otherwise."""

    def refuse(description: str, reason: str) -> ServiceError:
        return ServiceError(
            Reason.VALIDATION_ERROR, f"{field}: {description}", violations=[FieldViolation(field, description, reason)]
        )

    if len(metadata) > AUDIT.metadata_entries:
        raise refuse(f"at most {AUDIT.metadata_entries} entries", "TOO_MANY_ENTRIES")
    for key, value in metadata.items():
        if not METADATA_KEY.match(key) or len(key) > AUDIT.metadata_key_chars:
            raise refuse(f"key {key[:64]!r} must be 1-{AUDIT.metadata_key_chars} of A-Z a-z 0-9 _ . -", "BAD_KEY")
        if key.lower() in FORBIDDEN_METADATA_KEYS:
            raise refuse(f"key {key!r} may carry PHI or secrets", "FORBIDDEN_KEY")
        if len(value) > AUDIT.metadata_value_chars:
            raise refuse(f"value of {key!r} longer than {AUDIT.metadata_value_chars} characters", "VALUE_TOO_LONG")
    return metadata


class AuditSink(Protocol):
    """Where events go: a Redis stream, an in-process queue, or AppendEvent."""

    async def send(self, event: audit_pb2.Event) -> None:
        """Accept one event without waiting for the audit service."""

    async def close(self) -> None:
        """Hand over what is still buffered (briefly), then stop."""


@dataclass(frozen=True)
class Pending:
    event: audit_pb2.Event
    bearer_token: str = ""  # only kept by the RpcSink: AppendEvent is authorised with the recording call's token


class BufferedSink:
    """A bounded, ordered local buffer with a background flusher; subclasses deliver batches.

    The flusher runs in an empty context, so it never carries the identity of whatever call happened to start it.
    """

    transport = ""

    def __init__(self, max_buffered: int) -> None:
        self._buffer: deque[Pending] = deque()
        self._max = max_buffered
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._outage_since: float | None = None

    async def _deliver(self, batch: list[Pending]) -> int:
        """Deliver from the head of `batch`; how many were handled (0 while the transport is down)."""
        raise NotImplementedError

    def _enqueue(self, item: Pending) -> None:
        if len(self._buffer) >= self._max:
            DROPPED.labels(self.transport, "buffer_full").inc()
            log.error(
                "audit buffer full; event dropped",
                extra={"transport": self.transport, "action": item.event.action, "event_id": item.event.event_id},
            )
            return
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("audit transport unavailable; buffering events locally", extra={"transport": self.transport})
        self._buffer.append(item)
        BUFFERED.labels(self.transport).set(len(self._buffer))
        if self._flusher is None or self._flusher.done():
            loop = asyncio.get_running_loop()
            self._flusher = loop.create_task(self._flush_forever(), context=contextvars.Context())
        self._wakeup.set()

    async def _flush_once(self) -> bool:
        """One attempt at the head of the buffer; False when nothing could be delivered."""
        batch = [self._buffer[i] for i in range(min(FLUSH_BATCH, len(self._buffer)))]
        handled = await self._deliver(batch)
        for _ in range(handled):
            self._buffer.popleft()
        BUFFERED.labels(self.transport).set(len(self._buffer))
        if not self._buffer and self._outage_since is not None:
            log.info(
                "buffered audit events flushed",
                extra={"transport": self.transport, "outage_seconds": round(time.monotonic() - self._outage_since, 1)},
            )
            self._outage_since = None
        return handled > 0

    async def _flush_forever(self) -> None:
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not await self._flush_once():
                await asyncio.sleep(RETRY_SECONDS)

    async def close(self) -> None:
        """Try to hand over what is buffered for a few seconds; count and log whatever is left."""
        if self._flusher is not None:
            self._flusher.cancel()
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._buffer and time.monotonic() < deadline:
            if not await self._flush_once():
                break
        if self._buffer:
            DROPPED.labels(self.transport, "shutdown").inc(len(self._buffer))
            log.error(
                "audit events still buffered at shutdown were lost",
                extra={"transport": self.transport, "count": len(self._buffer)},
            )
            self._buffer.clear()


class RedisStreamSink(BufferedSink):
    """XADD to the audit stream; the local buffer only while Redis is unreachable (or still being flushed)."""

    transport = "redis"

    def __init__(self, redis: RedisConnection, max_buffered: int) -> None:
        super().__init__(max_buffered)
        self._redis = redis
        self._stream = redis.key(STREAM)

    async def send(self, event: audit_pb2.Event) -> None:
        # Straight to Redis when nothing older is waiting (keeps the order); a remembered outage costs nothing.
        if not self._buffer and self._redis.available:
            try:
                await self._redis.client.xadd(self._stream, {STREAM_FIELD: event.SerializeToString()})
                SENT.labels(self.transport).inc()
                return
            except REDIS_ERRORS as exc:
                self._redis.mark_down(exc)
            except RedisError as exc:  # e.g. out of memory: Redis is up but refuses writes; never fail the caller
                log.warning("redis refused an audit event", extra={"error": type(exc).__name__})
        self._enqueue(Pending(event))

    async def _deliver(self, batch: list[Pending]) -> int:
        if not self._redis.available:
            return 0
        try:
            # A pipeline cut short may have added some entries: the ledger ignores the repeats by event id.
            async with self._redis.client.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.xadd(self._stream, {STREAM_FIELD: item.event.SerializeToString()})
                await pipe.execute()
        except REDIS_ERRORS as exc:
            self._redis.mark_down(exc)
            return 0
        except RedisError:
            return 0
        SENT.labels(self.transport).inc(len(batch))
        return len(batch)


class QueueSink:
    """Puts events on the process's in-process queue, which the audit service hosted here consumes."""

    transport = "queue"

    def __init__(self, queue: asyncio.Queue[audit_pb2.Event]) -> None:
        self.queue = queue

    async def send(self, event: audit_pb2.Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            DROPPED.labels(self.transport, "buffer_full").inc()
            log.error("audit queue full; event dropped", extra={"action": event.action, "event_id": event.event_id})
            return
        SENT.labels(self.transport).inc()

    async def close(self) -> None:
        """The audit service drained the queue when it stopped; count and log what arrived after that."""
        if left := self.queue.qsize():
            DROPPED.labels(self.transport, "shutdown").inc(left)
            log.error("audit events queued after the audit service stopped were lost", extra={"count": left})


class AuditClient:
    """Records events for one service."""

    def __init__(self, service: str, sink: AuditSink) -> None:
        self.service = service
        self._sink = sink

    async def record(
        self,
        action: str,
        *,
        success: bool = True,
        failure_reason: str = "",
        resource_type: str = "",
        resource_id: str = "",
        actor: Caller | None = None,
        actor_id: str = "",
        actor_email: str = "",
        actor_role: str = "",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Record one event; returns its id. The actor defaults to the authenticated caller of the request."""
        info = current_request()
        if actor is None and info is not None:
            actor = info.caller
        event = audit_pb2.Event(
            event_id=str(uuid.uuid4()),
            action=action,
            outcome=SUCCESS if success else FAILURE,
            failure_reason=failure_reason,
            actor=audit_pb2.Actor(
                id=actor_id or (actor.user_id if actor else ""),
                email=actor_email or (actor.email if actor else ""),
                role=actor_role or (actor.role if actor else ""),
            ),
            resource=audit_pb2.Resource(type=resource_type, id=resource_id),
            request_id=info.request_id if info else "",
            client_ip=info.client_ip if info else "",
            user_agent=(info.user_agent if info else "")[:512],
            service=self.service,
            method=info.method if info else "",
            metadata=check_metadata({key: redact(value) for key, value in (metadata or {}).items()}),
            event_time=timestamp_pb2.Timestamp(),
        )
        event.event_time.GetCurrentTime()
        await self._sink.send(event)
        return event.event_id
