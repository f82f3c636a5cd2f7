"""What an audit event may carry: the client's redaction and metadata rules, the service's checks, visibility."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import timestamp_pb2

from services.audit.events import EventQuery, as_own_event, check_event
from services.core.audit_client import check_metadata, redact
from services.core.context import Caller
from services.core.errors import Reason, ServiceError
from voiceassist.audit.v1 import audit_pb2


def test_free_text_loses_emails_phone_numbers_and_ssns() -> None:
    text = "mail jane.doe+x@example.org or call (555) 123-4567 / +1 555.123.4567, ssn 078-05-1120; id 3f2a-99"
    assert redact(text) == "mail [EMAIL] or call [PHONE] / [PHONE], ssn [SSN]; id 3f2a-99"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({f"k{i}": "v" for i in range(33)}, "TOO_MANY_ENTRIES"),
        ({"Patient_Name": "x"}, "FORBIDDEN_KEY"),
        ({"note": "x" * 1025}, "VALUE_TOO_LONG"),
        ({"bad key": "x"}, "BAD_KEY"),
        ({"k" * 65: "x"}, "BAD_KEY"),
    ],
)
def test_metadata_rules_name_the_field_and_the_rule(metadata: dict[str, str], reason: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_metadata(metadata, field="event.metadata")
    assert caught.value.reason == Reason.VALIDATION_ERROR
    assert [(v.field, v.reason) for v in caught.value.violations] == [("event.metadata", reason)]


def _event(**fields) -> audit_pb2.Event:
    base = {"event_id": str(uuid.uuid4()), "action": "auth.login.success", "outcome": audit_pb2.OUTCOME_SUCCESS}
    return audit_pb2.Event(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"event_id": "nope"}, "event.event_id"),
        ({"action": ""}, "event.action"),
        ({"action": "Auth Login"}, "event.action"),
        ({"outcome": audit_pb2.OUTCOME_UNSPECIFIED}, "event.outcome"),
        ({"actor": audit_pb2.Actor(role="root")}, "event.actor.role"),
        ({"request_id": "a\x00b"}, "event.request_id"),  # PostgreSQL text cannot hold NUL: refused, not INTERNAL
        ({"metadata": {"k": "\x00"}}, "event.metadata"),
        ({"user_agent": "u" * 513}, "event.user_agent"),
        ({"event_time": timestamp_pb2.Timestamp(seconds=4_102_444_800)}, "event.event_time"),  # 2100
        ({"event_time": timestamp_pb2.Timestamp(seconds=1)}, "event.event_time"),
    ],
)
def test_bad_events_are_validation_errors_naming_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_event(_event(**fields))
    assert caught.value.reason == Reason.VALIDATION_ERROR and caught.value.violations[0].field == field


def test_a_good_event_is_normalised_for_the_ledger() -> None:
    event_id = uuid.uuid4()
    checked = check_event(_event(event_id=str(event_id).upper(), metadata={"b": "2", "a": "1"}), appended_by="adm")
    assert checked.event_id == str(event_id) and checked.metadata == '{"a":"1","b":"2"}'
    assert checked.appended_by == "adm" and checked.event_time_us > 0  # unset time: the server's clock


def test_users_append_only_their_own_events_with_the_role_from_their_token() -> None:
    user = Caller(user_id="u-1", role="user")
    mine = _event(actor=audit_pb2.Actor(role="admin", email="boss@example.org"))
    as_own_event(mine, user)
    assert mine.actor == audit_pb2.Actor(id="u-1", role="user")
    with pytest.raises(ServiceError) as caught:
        as_own_event(_event(actor=audit_pb2.Actor(id="u-2")), user)
    assert caught.value.reason == Reason.PERMISSION_DENIED


def test_queries_narrow_to_what_the_caller_may_see() -> None:
    user, viewer = Caller(user_id="u-1", role="user"), Caller(user_id="v-1", role="viewer")
    assert EventQuery(action_prefix="auth.").visible_to(user) == EventQuery(actor_id="u-1", action_prefix="auth.")
    assert EventQuery(actor_id="u-2").visible_to(user) is None
    assert EventQuery(actor_id="u-2").visible_to(viewer) == EventQuery(actor_id="u-2")
    with pytest.raises(ServiceError):
        EventQuery(start_us=2, end_us=1).check()
