"""The rich-status codec both ways, and how a response stream ends on an error (services.core.status)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format

from services.core.context import RequestInfo, set_request
from services.core.errors import FieldViolation, Reason, ServiceError
from services.core.status import ends_with_status, error_info, error_of, reason_of, to_status
from voiceassist.voice.v1 import voice_pb2

SYNTHESIZE = "/voiceassist.voice.v1.VoiceService/Synthesize"


def test_an_error_survives_the_proto_and_its_json_form() -> None:
    sent = ServiceError(
        Reason.RATE_LIMITED, "slow down", violations=[FieldViolation("text", "too long", "TOO_LONG")],
        retry_after_seconds=2.5, metadata={"limit": "5"},
    )  # fmt: skip
    status = to_status(sent, "voice.voiceassist")
    assert error_info(status).domain == "voice.voiceassist"
    for received in (error_of(status), error_of(json_format.MessageToDict(status))):
        assert (received.reason, received.message, received.status_code_name) == (
            Reason.RATE_LIMITED, "slow down", "RESOURCE_EXHAUSTED",
        )  # fmt: skip
        assert received.violations == sent.violations and received.metadata == sent.metadata
        assert received.retry_after_seconds == 2.5


def test_a_reason_not_ours_keeps_its_code_and_is_told_in_our_words() -> None:
    proxy = {"code": 8, "message": "quota", "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED", "domain": "example.com"}
    ]}  # fmt: skip
    assert reason_of(proxy) is None and error_info(proxy).reason == "RATE_LIMIT_EXCEEDED"
    error = error_of(proxy)
    assert (error.reason, error.status_code_name) == (Reason.RATE_LIMITED, "RESOURCE_EXHAUSTED")
    bare = error_of({"code": 14, "message": "connection refused"})
    assert (bare.reason, bare.status_code_name) == (Reason.BACKEND_UNAVAILABLE, "UNAVAILABLE")
    assert error_of({"code": 15, "message": "?"}).reason is Reason.INTERNAL  # DATA_LOSS stands for no reason


class _Speaker:
    """A servicer double: one chunk, then whatever `fail` raises."""

    def __init__(self, fail: Exception, first: bool = True) -> None:
        self._fail = fail
        self._first = first

    @ends_with_status(voice_pb2.SynthesizeResponse)
    async def Synthesize(self, request, context) -> AsyncIterator[voice_pb2.SynthesizeResponse]:
        if self._first:
            yield voice_pb2.SynthesizeResponse(audio=voice_pb2.AudioChunk(audio_content=b"\0\0", sequence=0))
        raise self._fail


async def _drain(servicer: _Speaker) -> tuple[list[voice_pb2.SynthesizeResponse], Exception]:
    set_request(RequestInfo(request_id="rid-7", method=SYNTHESIZE))
    messages = []
    with pytest.raises(Exception) as raised:
        async for message in servicer.Synthesize(voice_pb2.SynthesizeRequest(), None):
            messages.append(message)
    return messages, raised.value


async def test_an_error_after_the_first_message_is_the_last_message_and_then_the_status() -> None:
    refused = ServiceError(Reason.BACKEND_UNAVAILABLE, "speech synthesis failed")
    messages, raised = await _drain(_Speaker(refused))
    assert raised is refused and messages[0].audio.audio_content
    assert messages[-1].error == to_status(refused, "voice.voiceassist")


async def test_a_crash_after_the_first_message_is_internal_with_the_request_id_only() -> None:
    messages, raised = await _drain(_Speaker(RuntimeError("secret: the database password is hunter2")))
    assert isinstance(raised, ServiceError) and raised.reason is Reason.INTERNAL
    assert raised.message == "internal error; request id rid-7" and "hunter2" not in str(messages[-1])
    assert messages[-1].error == to_status(raised, "voice.voiceassist")  # what the interceptor answers with


async def test_an_error_before_the_first_message_is_only_the_status() -> None:
    refused = ServiceError(Reason.VALIDATION_ERROR, "text: required")
    messages, raised = await _drain(_Speaker(refused, first=False))
    assert raised is refused and messages == []
