"""Voice sessions: admission (limits per process and per account), audit events, metrics, and the tasks a session
runs, counted so that a session that ends for any reason is seen to leave none behind.

Audit events carry ids, durations and counts only: never audio, transcripts or answer text.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import Gauge, Histogram

from services.core.audit_client import AuditClient
from services.core.errors import Reason, ServiceError
from services.voice.settings import VoiceSettings

T = TypeVar("T")

SESSIONS_ACTIVE = Gauge("voice_sessions_active", "Voice streams open now, by method.", ["method"])
SESSION_TASKS = Gauge("voice_session_tasks", "Tasks running on behalf of voice streams.")
RECOGNIZER_STREAMS = Gauge("voice_recognizer_streams", "Recognition streams open in the recognizer processes.")
FINAL_TRANSCRIPT_SECONDS = Histogram(
    "voice_final_transcript_seconds",
    "Last audio chunk received to final transcript.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
)
FIRST_AUDIO_SECONDS = Histogram(
    "voice_first_audio_seconds",
    "End of utterance to the first answer audio chunk.",
    buckets=(0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2, 5),
)


def track(task: asyncio.Task[T]) -> asyncio.Task[T]:
    """Count `task` in the session-task gauge until it ends."""
    SESSION_TASKS.inc()
    task.add_done_callback(lambda _: SESSION_TASKS.dec())
    return task


def spawn(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Start a counted session task."""
    return track(asyncio.create_task(coro, name=name))


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait until they have ended."""
    live = [t for t in tasks if t is not None and not t.done()]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


@dataclass
class SessionRecord:
    """One open stream: what its audit events report."""

    session_id: str
    method: str
    user_id: str
    started: float = field(default_factory=time.monotonic)
    conversation_id: str = ""
    turns: int = 0
    audio_ms: float = 0.0


class SessionRegistry:
    """Admits streams within the limits, audits their start and end, keeps the gauges."""

    def __init__(self, settings: VoiceSettings, audit: AuditClient) -> None:
        self._settings = settings
        self._audit = audit
        self._open = 0
        self._per_user: Counter[str] = Counter()

    @asynccontextmanager
    async def session(self, method: str, user_id: str) -> AsyncIterator[SessionRecord]:
        """Hold a session slot while the block runs; RATE_LIMITED when the process or the account is full."""
        if self._open >= self._settings.max_sessions:
            raise ServiceError(
                Reason.RATE_LIMITED, "the voice service is at capacity; try again shortly", retry_after_seconds=2.0,
                metadata={"limit": "max_sessions"},
            )  # fmt: skip
        if self._per_user[user_id] >= self._settings.max_sessions_per_user:
            raise ServiceError(
                Reason.RATE_LIMITED,
                f"at most {self._settings.max_sessions_per_user} voice streams per account at once",
                retry_after_seconds=2.0,
                metadata={"limit": "max_sessions_per_user"},
            )
        record = SessionRecord(uuid.uuid4().hex, method, user_id)
        self._open += 1
        self._per_user[user_id] += 1
        SESSIONS_ACTIVE.labels(method).inc()
        outcome = "OK"
        try:
            await self._audit.record(
                "voice.session.start", resource_type="voice_session", resource_id=record.session_id,
                metadata={"method": method},
            )  # fmt: skip
            yield record
        except ServiceError as exc:
            outcome = exc.reason.value
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (a streaming handler is closed)
            outcome = "CLIENT_CANCELLED"
            raise
        except Exception:
            outcome = "INTERNAL"
            raise
        finally:
            self._open -= 1
            self._per_user[user_id] -= 1
            if self._per_user[user_id] <= 0:
                del self._per_user[user_id]
            SESSIONS_ACTIVE.labels(method).dec()
            await self._audit.record(
                "voice.session.end",
                success=outcome in ("OK", "CLIENT_CANCELLED"),
                failure_reason="" if outcome == "OK" else outcome,
                resource_type="voice_session",
                resource_id=record.session_id,
                metadata={
                    "method": method,
                    "conversation_id": record.conversation_id,
                    "duration_ms": str(round((time.monotonic() - record.started) * 1000)),
                    "audio_ms": str(round(record.audio_ms)),
                    "turns": str(record.turns),
                },
            )


async def next_message(
    messages: AsyncIterator[T], *, idle_seconds: float, busy: Callable[[], bool] = lambda: False
) -> T | None:
    """The next client message, None at the end of the stream. IDLE_TIMEOUT when nothing arrives for
    `idle_seconds` while `busy()` is false (an answer being spoken keeps a silent client's session open)."""
    # One read stays pending across idle checks: cancelling a read would break the request stream.
    pending = track(asyncio.ensure_future(anext(messages)))
    # A read that ends (the stream's end, a broken stream) after this wait was cancelled is nobody's to report.
    pending.add_done_callback(lambda read: read.cancelled() or read.exception())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=idle_seconds)
            if done:
                try:
                    return pending.result()
                except StopAsyncIteration:
                    return None
            if not busy():
                raise ServiceError(
                    Reason.IDLE_TIMEOUT, f"no message for {idle_seconds:g} s; closing the stream",
                    metadata={"limit_seconds": f"{idle_seconds:g}"},
                )  # fmt: skip
    finally:
        if not pending.done():
            pending.cancel()


class SessionClock:
    """Enforces the longest a stream may last, by wall clock and by the audio it sent."""

    def __init__(self, max_seconds: float) -> None:
        self._max = max_seconds
        self.deadline = asyncio.get_running_loop().time() + max_seconds

    def check(self, audio_ms: float = 0.0) -> None:
        """SESSION_TOO_LONG once the stream has lasted, or sent audio for, longer than allowed."""
        if audio_ms > self._max * 1000 or asyncio.get_running_loop().time() > self.deadline:
            raise self.expired()

    def expired(self) -> ServiceError:
        """The error that ends a stream that lasted too long."""
        return ServiceError(
            Reason.SESSION_TOO_LONG, f"a voice stream may last at most {self._max:g} s; open a new one",
            metadata={"limit_seconds": f"{self._max:g}"},
        )  # fmt: skip
