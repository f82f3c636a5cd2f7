"""The one way every service records audit events.

`AuditClient.record()` builds the event (ids, time, request context, actor) and hands it to the process's sink
without waiting for the audit service: producers never block on it. Events never carry PHI: metadata keys that
name PHI are refused and values are bounded.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

from google.protobuf import timestamp_pb2

from services.core.context import Caller, current_request
from services.core.errors import Reason, ServiceError
from voiceassist.audit.v1 import audit_pb2

log = logging.getLogger("voiceassist.audit")

MAX_METADATA_ENTRIES = 32
MAX_METADATA_VALUE = 1024
# Keys that would put PHI or secrets in the ledger; refused outright, whatever the value.
FORBIDDEN_METADATA_KEYS = frozenset(
    {
        "query", "question", "answer", "text", "transcript", "content", "prompt", "password", "token",
        "access_token", "refresh_token", "name", "full_name", "patient", "patient_name", "dob", "birth_date",
        "ssn", "mrn", "address", "phone", "email", "notes", "clinical_context",
    }
)  # fmt: skip

SUCCESS = audit_pb2.OUTCOME_SUCCESS
FAILURE = audit_pb2.OUTCOME_FAILURE


class AuditSink(Protocol):
    """Where events go: a Redis stream, an in-process queue, or the log."""

    async def send(self, event: audit_pb2.Event) -> None:
        """Accept one event without blocking on the audit service."""


class LogSink:
    """Writes events to the log only. Used where no ledger is reachable at all."""

    async def send(self, event: audit_pb2.Event) -> None:
        log.info("audit event", extra={"action": event.action, "event_id": event.event_id, "outcome": event.outcome})


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata if it is safe to store; ServiceError (VALIDATION_ERROR) otherwise."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ServiceError(Reason.VALIDATION_ERROR, f"at most {MAX_METADATA_ENTRIES} metadata entries")
    for key, value in metadata.items():
        if key.lower() in FORBIDDEN_METADATA_KEYS:
            raise ServiceError(Reason.VALIDATION_ERROR, f"metadata key {key!r} may carry PHI or secrets")
        if len(key) > 64 or len(value) > MAX_METADATA_VALUE:
            raise ServiceError(Reason.VALIDATION_ERROR, f"metadata entry {key!r} too long")
    return metadata


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
            metadata=check_metadata(metadata or {}),
            event_time=timestamp_pb2.Timestamp(),
        )
        event.event_time.GetCurrentTime()
        await self._sink.send(event)
        return event.event_id
