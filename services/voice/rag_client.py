"""Answers from the rag service, through its generated stub: the AnswerSource of Converse sessions.

The channel comes from the runtime's pool, which forwards the caller's bearer token and request id, so rag
authorises the same user (their conversations only) and logs the same request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from services.core.errors import Reason, ServiceError
from services.core.status import error_of, reason_of
from services.voice.conversation import AnswerDelta, AnswerDone, AnswerEvent, AnswerFailed, AnswerSources
from voiceassist.common.v1 import clinical_pb2
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc

CALL_TIMEOUT_SECONDS = 10.0


def downstream_error(exc: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """A failed call to rag as our own error: its reason and status kept when it is one of ours (NOT_FOUND for
    another account's conversation stays NOT_FOUND), BACKEND_UNAVAILABLE when rag cannot be reached."""
    code = exc.code()
    if reason_of(exc) is not None:
        return error_of(exc)  # rag's own error as rag sent it: reason, code, metadata, field violations
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceError(Reason.BACKEND_UNAVAILABLE, f"{what}: the answer service is unavailable")
    return ServiceError(Reason.INTERNAL, f"{what} failed ({code.name})", code=code.name)


class RagAnswers:
    """Conversations and streamed answers from rag (implements conversation.AnswerSource)."""

    def __init__(self, stub: Callable[[], rag_pb2_grpc.RagServiceStub], answer_timeout: float) -> None:
        self._stub = stub  # asked per call: the channel behind it is replaced when certificates renew
        self._answer_timeout = answer_timeout

    async def open_conversation(self, conversation_id: str, title: str) -> str:
        """The caller's conversation `conversation_id` (NOT_FOUND when it is not theirs), or a new one."""
        try:
            if conversation_id:
                request = rag_pb2.GetConversationRequest(conversation_id=conversation_id)
                reply = await self._stub().GetConversation(request, timeout=CALL_TIMEOUT_SECONDS)
            else:
                create = rag_pb2.CreateConversationRequest(title=title)
                reply = await self._stub().CreateConversation(create, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "opening the conversation") from None
        conversation: rag_pb2.Conversation = reply.conversation  # the generated stub's replies are untyped
        return conversation.id

    async def answer(
        self,
        *,
        conversation_id: str,
        question: str,
        clinical_context: clinical_pb2.ClinicalContext | None,
        client_message_id: str,
    ) -> AsyncIterator[AnswerEvent]:
        """StreamAsk, event by event; the call is cancelled when the consumer stops early (barge-in)."""
        request = rag_pb2.StreamAskRequest(
            conversation_id=conversation_id,
            query=question,
            clinical_context=clinical_context,
            client_message_id=client_message_id,
        )
        call = self._stub().StreamAsk(request, timeout=self._answer_timeout)
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
                    yield AnswerFailed(error_of(reply.error))
                    return  # the last message; the call's status says the same, it must not fail the turn twice
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "answering") from None
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
