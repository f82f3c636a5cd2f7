"""Answers from the rag service, through its generated stub: the AnswerSource of Converse sessions.

The channel comes from the runtime's pool, which forwards the caller's bearer token and request id, so rag
authorises the same user (their conversations only) and logs the same request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core.errors import Reason, ServiceError
from services.voice.conversation import AnswerDelta, AnswerDone, AnswerEvent, AnswerFailed, AnswerSources
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc

CALL_TIMEOUT_SECONDS = 10.0
_KNOWN_REASONS = {r.value for r in Reason}


def _reason_of(status: status_pb2.Status | None) -> tuple[str, dict[str, str]]:
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    return "", {}


def downstream_error(exc: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """A failed call to rag as our own error: its reason and status kept when it is one of ours (NOT_FOUND for
    another account's conversation stays NOT_FOUND), BACKEND_UNAVAILABLE when rag cannot be reached."""
    code = exc.code()
    reason, metadata = _reason_of(rpc_status.from_call(exc))  # type: ignore[arg-type]
    if reason in _KNOWN_REASONS:
        return ServiceError(Reason(reason), exc.details() or what, metadata=metadata, code=code.name)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceError(Reason.BACKEND_UNAVAILABLE, f"{what}: the answer service is unavailable")
    return ServiceError(Reason.INTERNAL, f"{what} failed ({code.name})", code=code.name)


class RagAnswers:
    """Conversations and streamed answers from rag (implements conversation.AnswerSource)."""

    def __init__(self, channel: grpc.aio.Channel, answer_timeout: float) -> None:
        self._stub = rag_pb2_grpc.RagServiceStub(channel)
        self._answer_timeout = answer_timeout

    async def open_conversation(self, conversation_id: str, title: str) -> str:
        """The caller's conversation `conversation_id` (NOT_FOUND when it is not theirs), or a new one."""
        try:
            if conversation_id:
                request = rag_pb2.GetConversationRequest(conversation_id=conversation_id)
                reply = await self._stub.GetConversation(request, timeout=CALL_TIMEOUT_SECONDS)
            else:
                request = rag_pb2.CreateConversationRequest(title=title)
                reply = await self._stub.CreateConversation(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "opening the conversation") from None
        return reply.conversation.id

    async def answer(
        self, *, conversation_id: str, question: str, clinical_context: Any, client_message_id: str
    ) -> AsyncIterator[AnswerEvent]:
        """StreamAsk, event by event; the call is cancelled when the consumer stops early (barge-in)."""
        request = rag_pb2.StreamAskRequest(
            conversation_id=conversation_id,
            query=question,
            clinical_context=clinical_context,
            client_message_id=client_message_id,
        )
        call = self._stub.StreamAsk(request, timeout=self._answer_timeout)
        try:
            async for reply in call:
                kind = reply.WhichOneof("event")
                if kind == "delta":
                    yield AnswerDelta(reply.delta)
                elif kind == "citations":
                    yield AnswerSources(tuple(reply.citations.citations))
                elif kind == "answer":
                    yield AnswerDone(reply.answer.message_id, reply.answer.model_used, reply.answer.phi_detected)
                elif kind == "error":
                    reason, _ = _reason_of(reply.error)
                    code = code_pb2.Code.Name(reply.error.code) if reply.error.code in code_pb2.Code.values() else ""
                    yield AnswerFailed(reason or Reason.INTERNAL.value, reply.error.message, code or "INTERNAL")
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "answering") from None
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
