"""The answer pipeline: PHI detection, knowledge base search, model routing, generation with citations, storage.

`AnswerService.stream` yields text deltas, then the citations, then the stored answer; `ask` is the same pipeline
collected. A client message id makes a question idempotent (see idempotency.py): a repeat replays the stored answer.
Audit events say what happened (model, routing rule, PHI categories, counts) and never carry the question or answer
text.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Protocol

from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import RAG, SEARCH
from services.rag.chat_client import ChatClient, ModelStreamBroken, ModelUnavailable
from services.rag.conversations import Conversations, clean_specialty, clean_text, settings_of
from services.rag.extractive import ExtractiveGenerator
from services.rag.idempotency import AnswerLease, Exchange
from services.rag.phi import PhiScanner, PhiType, names_checkable
from services.rag.prompts import AnswerStyle, ClinicalContext, PromptInput, Turn, build_messages
from services.rag.retrieval import Passage, RetrievalFailed, Retriever
from services.rag.routing import ModelKind, Route, plan_routes
from services.rag.store import ConversationRow, MessageRow, RagStore

SNIPPET_CHARS = 500
_MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


@dataclass(frozen=True)
class Question:
    """An Ask request, validated."""

    conversation_id: str
    query: str
    clinical_context: ClinicalContext | None = None
    client_message_id: str = ""


@dataclass(frozen=True)
class Citation:
    """A source of an answer: the passage behind marker [index]."""

    index: int
    document_id: str
    title: str
    chunk_id: str
    snippet: str
    page: int
    score: float


@dataclass
class Timings:
    """Milliseconds per stage."""

    phi_ms: float = 0.0
    retrieval_ms: float = 0.0
    generation_ms: float = 0.0
    total_ms: float = 0.0
    first_token_ms: float = 0.0


@dataclass(frozen=True)
class Answer:
    """A stored answer, as Ask returns it."""

    message_id: str
    question_message_id: str
    content: str
    citations: list[Citation]
    model_used: str
    phi_detected: bool
    phi_types: list[PhiType]
    routing_reason: str
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class TextDelta:
    """The next piece of answer text."""

    text: str


@dataclass(frozen=True)
class CitationsReady:
    """The answer's sources, after the last delta."""

    citations: list[Citation]


@dataclass(frozen=True)
class AnswerReady:
    """The complete stored answer; the last event."""

    answer: Answer


AnswerEvent = TextDelta | CitationsReady | AnswerReady


class AnswerWriter(Protocol):
    """Writes an answer from a prompt, as a stream of text deltas."""

    @property
    def model_label(self) -> str:
        """What `model_used` records."""
        ...

    def stream(self, prompt: PromptInput) -> AsyncIterator[str]:
        """The answer's deltas."""
        ...


class ChatWriter:
    """An AnswerWriter over a chat-completions model."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    @property
    def model_label(self) -> str:
        """e.g. "cloud:gpt-4o-mini"."""
        return self.client.model_label

    def stream(self, prompt: PromptInput) -> AsyncIterator[str]:
        """The model's deltas for the prompt's chat messages."""
        return self.client.stream(build_messages(prompt))


def _bounded_items(items: Sequence[str], field: str) -> tuple[str, ...]:
    if len(items) > RAG.context_items:
        raise invalid(field, f"at most {RAG.context_items} entries")
    return tuple(v for v in (clean_text(i, field, RAG.context_item_chars, single_line=True) for i in items) if v)


def _clean_context(context: ClinicalContext) -> ClinicalContext | None:
    """The clinical context with its fields bounded and trimmed; None when nothing is left."""
    if not 0 <= context.age <= RAG.context_max_age:
        raise invalid("clinical_context.age", f"must be between 0 and {RAG.context_max_age}")
    clean = ClinicalContext(
        specialty=clean_specialty(context.specialty, "clinical_context.specialty"),
        age=context.age,
        sex=clean_text(context.sex, "clinical_context.sex", RAG.context_sex_chars, single_line=True),
        medications=_bounded_items(context.medications, "clinical_context.medications"),
        conditions=_bounded_items(context.conditions, "clinical_context.conditions"),
        allergies=_bounded_items(context.allergies, "clinical_context.allergies"),
        notes=clean_text(context.notes, "clinical_context.notes", RAG.context_notes_chars),
    )
    return None if clean == ClinicalContext() else clean


def make_question(
    conversation_id: str,
    query: str,
    client_message_id: str,
    context: ClinicalContext | None,
) -> Question:
    """A validated Question; `context` as the client sent it (None when it sent none)."""
    query = clean_text(query, "query", RAG.question_chars)
    if not query:
        raise invalid("query", "required")
    if len(client_message_id) > RAG.client_message_id_chars or not client_message_id.isprintable():
        raise invalid("client_message_id", f"at most {RAG.client_message_id_chars} printable characters")
    clinical = _clean_context(context) if context is not None else None
    return Question(conversation_id, query, clinical, client_message_id.strip())


def cite(content: str, passages: list[Passage]) -> list[Citation]:
    """The passages the answer's [n] markers point at, in marker order; markers past the list are ignored."""
    numbers: list[int] = []
    for match in _MARKER.finditer(content):
        for part in match.group(1).split(","):
            n = int(part)
            if 1 <= n <= len(passages) and n not in numbers:
                numbers.append(n)
    return [
        Citation(n, p.document_id, p.title, p.chunk_id, p.text[:SNIPPET_CHARS], p.page, p.score)
        for n, p in ((n, passages[n - 1]) for n in numbers)
    ]


def stored_answer(exchange: Exchange) -> Answer:
    """The Answer a stored question/answer pair replays as."""
    question, answer = exchange
    return Answer(
        message_id=answer.id,
        question_message_id=question.id,
        content=answer.content,
        citations=[Citation(**c) for c in answer.citations],
        model_used=answer.model_used,
        phi_detected=answer.phi_detected,
        phi_types=[PhiType(t) for t in answer.phi_types],
        routing_reason=answer.routing_reason,
        timings=Timings(**answer.timings),
    )


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


@dataclass
class _Run:
    """One pipeline run's working state."""

    question: Question
    conversation: ConversationRow
    started: float
    timings: Timings = field(default_factory=Timings)
    phi_types: list[PhiType] = field(default_factory=list)
    route: Route | None = None  # the route whose model wrote the answer
    model_label: str = ""


class AnswerService:
    """Answers questions inside conversations."""

    def __init__(
        self,
        store: RagStore,
        conversations: Conversations,
        phi: PhiScanner,
        retriever: Retriever,
        writers: dict[ModelKind, AnswerWriter],
        audit: AuditClient,
        *,
        retrieval_limit: int,
        history_turns: int,
        answer_lease_seconds: float,
        answer_wait_seconds: float,
    ) -> None:
        self._store = store
        self._conversations = conversations
        self._phi = phi
        self._retriever = retriever
        self._writers = {ModelKind.EXTRACTIVE: ExtractiveGenerator(), **writers}
        self._audit = audit
        self._retrieval_limit = retrieval_limit
        self._history_turns = history_turns
        self._lease = timedelta(seconds=answer_lease_seconds)
        self._wait_seconds = answer_wait_seconds

    async def ask(self, caller: Caller, question: Question) -> Answer:
        """The whole answer at once."""
        async for event in self.stream(caller, question):
            if isinstance(event, AnswerReady):
                return event.answer
        raise ServiceError(Reason.INTERNAL, "the answer pipeline ended without an answer")  # pragma: no cover

    async def stream(self, caller: Caller, question: Question) -> AsyncIterator[AnswerEvent]:
        """Deltas, then citations, then the stored answer. `question` is validated (make_question); a repeat of an
        answered question replays its answer, anything else goes through `_answer` under this request's lease."""
        run = _Run(question, await self._conversations.get(caller, question.conversation_id), time.perf_counter())
        lease = AnswerLease(
            self._store, question.conversation_id, question.client_message_id, question.query, self._lease,
            self._wait_seconds,
        )  # fmt: skip
        stored = await lease.claim()
        if stored is not None:
            async for event in self._replay(run.conversation, stored):
                yield event
            return
        try:
            async with lease.held():
                async for event in self._answer(run, lease):
                    yield event
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ServiceError) else Reason.INTERNAL
            await self._audit.record(
                "rag.answer", success=False, failure_reason=reason.value, resource_type="conversation",
                resource_id=run.conversation.id,
            )  # fmt: skip
            raise

    async def _answer(self, run: _Run, lease: AnswerLease) -> AsyncIterator[AnswerEvent]:
        """PHI scan, store the question, retrieve, generate, store the answer."""
        await self._scan_phi(run)
        asked = await lease.store_question(self._row(run, "user", run.question.query))
        if isinstance(asked, Exchange):  # a concurrent duplicate stored the question first, and has answered it since
            async for event in self._replay(run.conversation, asked):
                yield event
            return
        await self._audit.record(
            "rag.question", resource_type="conversation", resource_id=run.conversation.id,
            metadata={"message_id": asked.id, "phi_detected": str(bool(run.phi_types)).lower(),
                      "phi_types": ",".join(run.phi_types)},
        )  # fmt: skip

        retrieval_started = time.perf_counter()
        passages = await self._retrieve(run.question, run.conversation)
        run.timings.retrieval_ms = _ms(retrieval_started)

        history = await self._store.recent_messages(run.conversation.id, self._history_turns, asked.seq)
        parts: list[str] = []
        async for delta in self._generate(run, passages, history):
            parts.append(delta)
            yield TextDelta(delta)

        content = "".join(parts)
        citations = cite(content, passages)
        yield CitationsReady(citations)
        run.timings.total_ms = _ms(run.started)
        assert run.route is not None  # _generate ends with a route or raises
        exchange = await lease.store_answer(
            self._row(run, "assistant", content, citations, model_used=run.model_label,
                      routing_reason=run.route.reason, timings=asdict(run.timings))
        )  # fmt: skip
        answer = stored_answer(exchange)
        await self._audit_answer(run.conversation, answer, replayed=False)
        yield AnswerReady(answer)

    async def _scan_phi(self, run: _Run) -> None:
        """The PHI categories in the question and its clinical context, into `run`."""
        started = time.perf_counter()
        context = run.question.clinical_context
        scans = await asyncio.gather(
            self._phi.scan(run.question.query), self._phi.scan(context.describe() if context else "")
        )
        found = {t for scan in scans for t in scan.types}
        run.phi_types = [t for t in PhiType if t in found]
        run.timings.phi_ms = _ms(started)

    async def _generate(self, run: _Run, passages: list[Passage], history: list[MessageRow]) -> AsyncIterator[str]:
        """The answer's deltas from the first planned model that writes any (PHI never goes to the cloud); the route
        taken goes into `run`."""
        question, settings = run.question, settings_of(run.conversation)
        cloud, local = ModelKind.CLOUD in self._writers, ModelKind.LOCAL in self._writers
        routes = (
            plan_routes(bool(run.phi_types), cloud, local, names_checkable(question.query))
            if passages
            else [Route(ModelKind.EXTRACTIVE, "no_passages_found")]
        )
        started = time.perf_counter()
        for route in routes:
            writer = self._writers[route.kind]
            prompt = _prompt_for(route.kind, question, passages, settings.answer_style, settings.system_prompt, history)
            try:
                async for delta in writer.stream(prompt):
                    if run.route is None:
                        run.route, run.model_label = route, writer.model_label
                        run.timings.first_token_ms = _ms(run.started)
                    yield delta
            except ModelUnavailable:
                if run.route is not None:  # pragma: no cover - ModelUnavailable only happens before the first token
                    raise
                continue
            except ModelStreamBroken:
                raise ServiceError(
                    Reason.BACKEND_UNAVAILABLE, "the model stopped in the middle of the answer; ask again",
                    retry_after_seconds=1.0, metadata={"model": writer.model_label},
                ) from None  # fmt: skip
            if run.route is not None:
                break
        if run.route is None:  # pragma: no cover - extractive always writes
            raise ServiceError(Reason.INTERNAL, "no model produced an answer")
        run.timings.generation_ms = _ms(started)

    def _row(
        self, run: _Run, role: str, content: str, citations: Sequence[Citation] = (), **answer_fields: object
    ) -> MessageRow:
        """A message of this run (the question, or with citations and `answer_fields` its answer) to store."""
        return MessageRow(
            conversation_id=run.question.conversation_id, role=role, content=content,
            citations=[asdict(c) for c in citations],
            phi_detected=bool(run.phi_types), phi_types=[t.value for t in run.phi_types],
            client_message_id=run.question.client_message_id or None, **answer_fields,
        )  # fmt: skip

    async def _retrieve(self, question: Question, conversation: ConversationRow) -> list[Passage]:
        """Passages for the question, in the question's (or else the conversation's) specialty; when that
        specialty has nothing, from the whole knowledge base."""
        specialty = (question.clinical_context.specialty if question.clinical_context else "") or conversation.specialty
        query = question.query[: SEARCH.query_chars]  # a longer question still searches, on its beginning
        try:
            passages = await self._retriever.retrieve(query, specialty, self._retrieval_limit)
            if not passages and specialty:
                passages = await self._retriever.retrieve(query, "", self._retrieval_limit)
        except RetrievalFailed as exc:
            raise ServiceError(
                Reason.BACKEND_UNAVAILABLE, f"knowledge base search failed: {exc}", retry_after_seconds=1.0
            ) from None
        return passages

    async def _replay(self, conversation: ConversationRow, exchange: Exchange) -> AsyncIterator[AnswerEvent]:
        """A stored answer as the events of one that is being written."""
        answer = stored_answer(exchange)
        await self._audit_answer(conversation, answer, replayed=True)
        yield TextDelta(answer.content)
        yield CitationsReady(answer.citations)
        yield AnswerReady(answer)

    async def _audit_answer(self, conversation: ConversationRow, answer: Answer, *, replayed: bool) -> None:
        await self._audit.record(
            "rag.answer", resource_type="conversation", resource_id=conversation.id,
            metadata={"message_id": answer.message_id, "question_message_id": answer.question_message_id,
                      "model_used": answer.model_used, "routing_reason": answer.routing_reason,
                      "phi_detected": str(answer.phi_detected).lower(), "phi_types": ",".join(answer.phi_types),
                      "citations": str(len(answer.citations)), "replayed": str(replayed).lower(),
                      "total_ms": str(answer.timings.total_ms)},
        )  # fmt: skip


def _prompt_for(
    kind: ModelKind,
    question: Question,
    passages: list[Passage],
    style: AnswerStyle | None,
    system_prompt: str,
    history: list[MessageRow],
) -> PromptInput:
    """The prompt a model of `kind` may see. The cloud model never gets the clinical context (PHI by nature) nor
    earlier turns that held PHI or could hide names; the extractive generator needs no history."""
    if kind is ModelKind.CLOUD:
        history = [m for m in history if not m.phi_detected and names_checkable(m.content)]
    turns = [] if kind is ModelKind.EXTRACTIVE else [Turn(m.role, m.content) for m in history]
    return PromptInput(
        query=question.query,
        passages=passages,
        style=style or AnswerStyle.CONCISE,
        system_prompt=system_prompt,
        clinical_context=None if kind is ModelKind.CLOUD else question.clinical_context,
        history=turns,
    )
