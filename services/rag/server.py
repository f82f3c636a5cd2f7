"""The rag service's gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.core import registry
from services.core.audit_client import AuditClient
from services.core.context import current_caller
from services.core.db import Database
from services.core.errors import invalid
from services.core.limits import SEARCH
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.settings import CoreSettings
from services.core.status import ends_with_status
from services.core.timestamps import to_timestamp
from services.rag.answers import (
    Answer,
    AnswerEvent,
    AnswerReady,
    AnswerService,
    AnswerWriter,
    ChatWriter,
    Citation,
    CitationsReady,
    Question,
    TextDelta,
    make_question,
)
from services.rag.chat_client import ChatClient, ChatEndpoint
from services.rag.conversations import Conversations, ConversationSettings, settings_of
from services.rag.phi import PhiDetector, PhiScanner, PhiType
from services.rag.prompts import AnswerStyle, ClinicalContext
from services.rag.retrieval import Retriever
from services.rag.routing import ModelKind
from services.rag.search_client import SearchRetriever
from services.rag.settings import RagSettings, rag_settings
from services.rag.store import ConversationRow, MessageRow, RagStore
from voiceassist.common.v1 import citation_pb2
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2_grpc

SPEC = registry.spec("rag")
MIGRATIONS = Path(__file__).parent / "migrations"

_STYLE_TO_PROTO = {
    AnswerStyle.CONCISE: rag_pb2.ANSWER_STYLE_CONCISE,
    AnswerStyle.DETAILED: rag_pb2.ANSWER_STYLE_DETAILED,
}
_STYLE_FROM_PROTO = {v: k for k, v in _STYLE_TO_PROTO.items()}
_ROLE_TO_PROTO = {"user": rag_pb2.MESSAGE_ROLE_USER, "assistant": rag_pb2.MESSAGE_ROLE_ASSISTANT}


def phi_type_message(kind: PhiType | str) -> rag_pb2.PhiType:
    """The proto enum value of a PHI category."""
    return rag_pb2.PhiType.Value(f"PHI_TYPE_{kind}")  # type: ignore[return-value]  # Value() is typed a plain int


def settings_message(settings: ConversationSettings) -> rag_pb2.ConversationSettings:
    """The proto form of conversation settings."""
    return rag_pb2.ConversationSettings(
        system_prompt=settings.system_prompt,
        answer_style=(
            _STYLE_TO_PROTO[settings.answer_style] if settings.answer_style else rag_pb2.ANSWER_STYLE_UNSPECIFIED
        ),
        specialty=settings.specialty,
    )


def settings_from(message: rag_pb2.ConversationSettings, field: str = "settings") -> ConversationSettings:
    """Domain settings from the proto; an unknown style is a client error."""
    if message.answer_style and message.answer_style not in _STYLE_FROM_PROTO:
        raise invalid(f"{field}.answer_style", "unknown answer style")
    return ConversationSettings(message.system_prompt, _STYLE_FROM_PROTO.get(message.answer_style), message.specialty)


def conversation_message(row: ConversationRow) -> rag_pb2.Conversation:
    """The proto form of a conversation."""
    return rag_pb2.Conversation(
        id=row.id,
        title=row.title,
        archived=row.archived,
        settings=settings_message(settings_of(row)),
        message_count=row.message_count,
        create_time=to_timestamp(row.created_at),
        update_time=to_timestamp(row.updated_at),
    )


def citation_message(citation: Citation) -> citation_pb2.Citation:
    """The proto form of a citation."""
    return citation_pb2.Citation(
        index=citation.index, document_id=citation.document_id, title=citation.title, chunk_id=citation.chunk_id,
        snippet=citation.snippet, page=citation.page, score=citation.score,
    )  # fmt: skip


def message_message(row: MessageRow) -> rag_pb2.Message:
    """The proto form of a stored message."""
    return rag_pb2.Message(
        id=row.id,
        conversation_id=row.conversation_id,
        role=_ROLE_TO_PROTO.get(row.role, rag_pb2.MESSAGE_ROLE_UNSPECIFIED),
        content=row.content,
        citations=[citation_message(Citation(**c)) for c in row.citations],
        model_used=row.model_used,
        phi_detected=row.phi_detected,
        phi_types=[phi_type_message(t) for t in row.phi_types],
        client_message_id=row.client_message_id or "",
        create_time=to_timestamp(row.created_at),
    )


def answer_message(answer: Answer) -> rag_pb2.AskResponse:
    """The proto form of an answer."""
    t = answer.timings
    return rag_pb2.AskResponse(
        message_id=answer.message_id,
        content=answer.content,
        citations=[citation_message(c) for c in answer.citations],
        model_used=answer.model_used,
        phi_detected=answer.phi_detected,
        phi_types=[phi_type_message(p) for p in answer.phi_types],
        routing_reason=answer.routing_reason,
        timings=rag_pb2.StageTimings(
            phi_ms=t.phi_ms,
            retrieval_ms=t.retrieval_ms,
            generation_ms=t.generation_ms,
            total_ms=t.total_ms,
            first_token_ms=t.first_token_ms,
        ),
        question_message_id=answer.question_message_id,
    )


def event_message(event: AnswerEvent) -> rag_pb2.StreamAskResponse:
    """One streamed event in proto form."""
    if isinstance(event, TextDelta):
        return rag_pb2.StreamAskResponse(delta=event.text)
    if isinstance(event, CitationsReady):
        return rag_pb2.StreamAskResponse(
            citations=rag_pb2.CitationList(citations=[citation_message(c) for c in event.citations])
        )
    assert isinstance(event, AnswerReady)
    return rag_pb2.StreamAskResponse(answer=answer_message(event.answer))


def question_from(request: rag_pb2.AskRequest | rag_pb2.StreamAskRequest) -> Question:
    """A validated Question from either request type."""
    context = None
    if request.HasField("clinical_context"):
        c = request.clinical_context
        context = ClinicalContext(
            specialty=c.specialty, age=c.age, sex=c.sex, medications=tuple(c.medications),
            conditions=tuple(c.conditions), allergies=tuple(c.allergies), notes=c.notes,
        )  # fmt: skip
    return make_question(request.conversation_id, request.query, request.client_message_id, context)


class RagServicer(rag_pb2_grpc.RagServiceServicer):
    """RagService over the Conversations and AnswerService use cases."""

    def __init__(self, conversations: Conversations, answers: AnswerService, phi: PhiScanner) -> None:
        self._conversations = conversations
        self._answers = answers
        self._phi = phi

    async def CreateConversation(
        self, request: rag_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.CreateConversationResponse:
        row = await self._conversations.create(current_caller(), request.title, settings_from(request.settings))
        return rag_pb2.CreateConversationResponse(conversation=conversation_message(row))

    async def GetConversation(
        self, request: rag_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.GetConversationResponse:
        row = await self._conversations.get(current_caller(), request.conversation_id)
        return rag_pb2.GetConversationResponse(conversation=conversation_message(row))

    async def ListConversations(
        self, request: rag_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.ListConversationsResponse:
        rows, token = await self._conversations.list_page(
            current_caller(), request.page_size, request.page_token, request.include_archived
        )
        return rag_pb2.ListConversationsResponse(
            conversations=[conversation_message(r) for r in rows], next_page_token=token
        )

    async def UpdateConversation(
        self, request: rag_pb2.UpdateConversationRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.UpdateConversationResponse:
        conversation = request.conversation
        row = await self._conversations.update(
            current_caller(),
            conversation.id,
            set(request.update_mask.paths),
            title=conversation.title,
            archived=conversation.archived,
            settings=settings_from(conversation.settings, "conversation.settings"),
        )
        return rag_pb2.UpdateConversationResponse(conversation=conversation_message(row))

    async def DeleteConversation(
        self, request: rag_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.DeleteConversationResponse:
        await self._conversations.delete(current_caller(), request.conversation_id)
        return rag_pb2.DeleteConversationResponse()

    async def ListMessages(
        self, request: rag_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.ListMessagesResponse:
        rows, token = await self._conversations.messages(
            current_caller(), request.conversation_id, request.page_size, request.page_token
        )
        return rag_pb2.ListMessagesResponse(messages=[message_message(r) for r in rows], next_page_token=token)

    async def Ask(self, request: rag_pb2.AskRequest, context: grpc.aio.ServicerContext) -> rag_pb2.AskResponse:
        answer = await self._answers.ask(current_caller(), question_from(request))
        return answer_message(answer)

    @ends_with_status(rag_pb2.StreamAskResponse)
    async def StreamAsk(
        self, request: rag_pb2.StreamAskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rag_pb2.StreamAskResponse]:
        caller, question = current_caller(), question_from(request)
        async for event in self._answers.stream(caller, question):
            yield event_message(event)

    async def DetectPhi(
        self, request: rag_pb2.DetectPhiRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.DetectPhiResponse:
        current_caller()
        if not request.text:
            raise invalid("text", "required")
        if len(request.text) > self._phi.max_chars:
            raise invalid("text", f"at most {self._phi.max_chars} characters", "TOO_LONG")
        scan = await self._phi.scan(request.text)
        return rag_pb2.DetectPhiResponse(
            phi_detected=scan.detected,
            entities=[
                rag_pb2.PhiEntity(type=phi_type_message(e.type), start=e.start, end=e.end, score=e.score)
                for e in scan.entities
            ],
            redacted_text=scan.redacted_text,
        )


def model_writers(settings: RagSettings) -> dict[ModelKind, AnswerWriter]:
    """Chat-completions writers for the configured endpoints (none configured: extractive answers only)."""
    writers: dict[ModelKind, AnswerWriter] = {}
    for kind, base_url, model, key in (
        (ModelKind.CLOUD, settings.cloud_base_url, settings.cloud_model, settings.cloud_api_key),
        (ModelKind.LOCAL, settings.local_base_url, settings.local_model, settings.local_api_key),
    ):
        if base_url:
            endpoint = ChatEndpoint(
                base_url=base_url, model=model, api_key=key.get_secret_value(),
                connect_timeout=settings.model_connect_timeout_seconds,
                read_timeout=settings.model_read_timeout_seconds,
                retries=settings.model_retries, max_tokens=settings.model_max_tokens,
                temperature=settings.model_temperature, breaker_failures=settings.breaker_failure_threshold,
                breaker_recovery_seconds=settings.breaker_recovery_seconds,
            )  # fmt: skip
            writers[kind] = ChatWriter(ChatClient(kind.value, endpoint))
    return writers


@dataclass
class Answering:
    """The rag service's use cases over its database, and what they hold open."""

    db: Database
    phi: PhiScanner
    conversations: Conversations
    answers: AnswerService
    writers: dict[ModelKind, AnswerWriter]

    async def close(self) -> None:
        for writer in self.writers.values():
            if isinstance(writer, ChatWriter):
                await writer.client.close()
        self.phi.close()
        await self.db.close()


async def build_answering(
    settings: RagSettings, core: CoreSettings, audit: AuditClient, retriever: Retriever
) -> Answering:
    """Answering wired from settings, over `retriever` (the search service; bench/peer/ searches in-process)."""
    db = Database("rag", core)
    await db.migrate(MIGRATIONS)
    detector = await asyncio.to_thread(PhiDetector.load, settings.phi_score_threshold)
    phi = PhiScanner(detector, settings.phi_workers, settings.phi_max_chars)
    store = RagStore(db)
    conversations = Conversations(store, audit)
    writers = model_writers(settings)
    answers = AnswerService(
        store, conversations, phi, retriever, writers, audit,
        retrieval_limit=min(settings.retrieval_limit, SEARCH.results.maximum), history_turns=settings.history_turns,
        answer_lease_seconds=settings.answer_lease_seconds,
        # A retry waits for another worker's answer only as long as its own call may last (Envoy's route timeout).
        answer_wait_seconds=registry.UNARY_TIMEOUT_SECONDS - 5,
    )  # fmt: skip
    return Answering(db, phi, conversations, answers, writers)


async def build(runtime: Runtime) -> Hosted:
    """The rag service, ready to add to a server."""
    settings = rag_settings()
    search_stub = functools.partial(runtime.channels.stub, "search", search_pb2_grpc.SearchServiceStub)
    search = SearchRetriever(search_stub, settings.retrieval_timeout_seconds)
    answering = await build_answering(settings, runtime.settings, runtime.audit("rag"), search)
    servicer = RagServicer(answering.conversations, answering.answers, answering.phi)
    return Hosted(
        SPEC,
        lambda server: rag_pb2_grpc.add_RagServiceServicer_to_server(servicer, server),
        probe=answering.db.ping,
        close=answering.close,
    )
