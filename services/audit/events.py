"""What an event is before the ledger numbers it: the checks every submitted event passes, whether it came from
the Redis stream, the in-process queue or AppendEvent, and the filter and visibility rules of queries."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from services.audit.ledger_proofs import metadata_json, timestamp_micros
from services.core.audit_client import check_metadata
from services.core.context import Caller
from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import AUDIT
from voiceassist.audit.v1 import audit_pb2

SUCCESS, FAILURE = 1, 2  # audit.v1.Outcome numbers
ACTION = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
ROLES = frozenset({"", "user", "viewer", "admin", "service"})
MAX_FUTURE_MICROS = 300 * 1_000_000  # producers' clocks may run ahead a little, not more
MIN_EVENT_TIME_MICROS = 946_684_800 * 1_000_000  # 2000-01-01: anything earlier is an unset or broken clock


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A checked event, in the ledger's terms (times in microseconds, metadata as its canonical JSON)."""

    event_id: str
    event_time_us: int
    actor_id: str
    actor_email: str
    actor_role: str
    action: str
    resource_type: str
    resource_id: str
    outcome: int
    failure_reason: str
    request_id: str
    client_ip: str
    user_agent: str
    service: str
    method: str
    metadata: str
    appended_by: str


def now_micros() -> int:
    """The current time in microseconds since the epoch."""
    return time.time_ns() // 1000


def _text(field: str, value: str, prefix: str) -> str:
    if "\x00" in value:
        raise invalid(prefix + field, "must not contain NUL characters")
    if len(value) > AUDIT.event_text_chars[field]:
        raise invalid(prefix + field, f"at most {AUDIT.event_text_chars[field]} characters")
    return value


def check_event(event: audit_pb2.Event, *, appended_by: str = "", prefix: str = "event.") -> NewEvent:
    """The event as the ledger will store it; ServiceError (VALIDATION_ERROR naming the field) when it breaks a
    rule. Output-only fields (sequence, hashes, commit time) are ignored."""
    try:
        event_id = str(uuid.UUID(event.event_id))
    except ValueError:
        raise invalid(prefix + "event_id", "must be a UUID chosen by the producer") from None
    if not event.action:
        raise invalid(prefix + "action", "required")
    if not ACTION.match(event.action):
        raise invalid(prefix + "action", "dotted lower-case words, e.g. auth.login.success")
    if event.outcome not in (SUCCESS, FAILURE):
        raise invalid(prefix + "outcome", "OUTCOME_SUCCESS or OUTCOME_FAILURE")
    if event.actor.role not in ROLES:
        raise invalid(prefix + "actor.role", "user, viewer, admin or service")
    now = now_micros()
    event_time = timestamp_micros(event.event_time) if event.HasField("event_time") else now
    if event_time > now + MAX_FUTURE_MICROS:
        raise invalid(prefix + "event_time", "is in the future")
    if event_time < MIN_EVENT_TIME_MICROS:
        raise invalid(prefix + "event_time", "is before 2000")
    for key, value in event.metadata.items():
        if "\x00" in key or "\x00" in value:
            raise invalid(prefix + "metadata", "must not contain NUL characters")
    metadata = check_metadata(dict(event.metadata), field=prefix + "metadata")
    return NewEvent(
        event_id=event_id,
        event_time_us=event_time,
        actor_id=_text("actor.id", event.actor.id, prefix),
        actor_email=_text("actor.email", event.actor.email, prefix),
        actor_role=event.actor.role,
        action=event.action,
        resource_type=_text("resource.type", event.resource.type, prefix),
        resource_id=_text("resource.id", event.resource.id, prefix),
        outcome=int(event.outcome),
        failure_reason=_text("failure_reason", event.failure_reason, prefix),
        request_id=_text("request_id", event.request_id, prefix),
        client_ip=_text("client_ip", event.client_ip, prefix),
        user_agent=_text("user_agent", event.user_agent, prefix),
        service=_text("service", event.service, prefix),
        method=_text("method", event.method, prefix),
        metadata=metadata_json(metadata),
        appended_by=appended_by,
    )


def may_append_any(caller: Caller) -> bool:
    """Admins and services attest events for anyone; everybody else only for themselves."""
    return caller.role in ("admin", "service")


def as_own_event(event: audit_pb2.Event, caller: Caller) -> None:
    """Make `event` (from a caller who is neither admin nor service) an event they performed:
    PERMISSION_DENIED when it names another actor; the actor's role comes from their token, not from them."""
    if event.actor.id and event.actor.id != caller.user_id:
        raise ServiceError(
            Reason.PERMISSION_DENIED, "only admins and services may record events performed by someone else"
        )
    event.actor.id = caller.user_id
    event.actor.role = caller.role
    event.actor.email = ""


@dataclass(frozen=True)
class EventQuery:
    """Which events a query selects; every set field must match. Times are microseconds, end exclusive."""

    actor_id: str = ""
    action_prefix: str = ""
    resource_type: str = ""
    resource_id: str = ""
    outcome: int = 0
    start_us: int | None = None
    end_us: int | None = None
    request_id: str = ""

    def check(self, prefix: str = "filter.") -> EventQuery:
        """Itself, when every value is within bounds; VALIDATION_ERROR naming the field otherwise."""
        for name in ("actor_id", "action_prefix", "resource_type", "resource_id", "request_id"):
            value = getattr(self, name)
            if len(value) > AUDIT.filter_chars or "\x00" in value:
                raise invalid(prefix + name, f"at most {AUDIT.filter_chars} characters, no NUL")
        if self.outcome not in (0, SUCCESS, FAILURE):
            raise invalid(prefix + "outcome", "unknown outcome")
        if self.start_us is not None and self.end_us is not None and self.start_us >= self.end_us:
            raise invalid(prefix + "end_time", "must be after start_time")
        return self

    def visible_to(self, caller: Caller) -> EventQuery | None:
        """The query narrowed to what `caller` may see (admins and viewers everything, others their own events);
        None when it can match nothing they may see (not an error: existence never leaks)."""
        if caller.can_oversee:
            return self
        if self.actor_id and self.actor_id != caller.user_id:
            return None
        return replace(self, actor_id=caller.user_id)

    def fingerprint(self) -> dict[str, Any]:
        """What a page token is bound to."""
        return dict(self.__dict__)
