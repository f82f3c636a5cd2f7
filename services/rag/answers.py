"""The answer pipeline: PHI detection, knowledge base search, model routing, generation with citations, storage.

`AnswerService.stream` yields text deltas, then the citations, then the stored answer; `ask` is the same pipeline
collected. A client message id makes a question idempotent: the first request stores the question with a lease on
writing its answer; a repeat (or a concurrent duplicate) waits for that answer and replays it; if the lease runs out
(the worker crashed) or is released (the answer failed), the repeat takes the question over. Audit events say what
happened (model, routing rule, PHI categories, counts) and never carry the question or answer text.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Protocol

from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.db import utcnow
from services.core.errors import Reason, ServiceError, invalid, not_found
from services.rag.chat_client import ChatClient, ModelStreamBroken, ModelUnavailable
from services.rag.conversations import Conversations, clean_specialty, clean_text, settings_of
from services.rag.extractive import ExtractiveGenerator
from services.rag.phi import PhiScanner, PhiType, names_checkable
from services.rag.prompts import AnswerStyle, ClinicalContext, PromptInput, Turn, build_messages
from services.rag.retrieval import Passage, RetrievalFailed, Retriever
from services.rag.routing import ModelKind, Route, plan_routes
from services.rag.store import ConversationGone, ConversationRow, MessageRow, RagStore

MAX_QUERY = 4000
MAX_SEARCH_QUERY = 2000  # the search service's limit
MAX_CLIENT_MESSAGE_ID = 128
MAX_NOTES = 2000
MAX_LIST_ITEMS = 50
MAX_ITEM = 200
SNIPPET_CHARS = 500
POLL_SECONDS = 0.1
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


def _bounded_items(items: list[str], field: str) -> tuple[str, ...]:
    if len(items) > MAX_LIST_ITEMS:
        raise invalid(field, f"at most {MAX_LIST_ITEMS} entries")
    return tuple(v for v in (clean_text(i, field, MAX_ITEM, single_line=True) for i in items) if v)


def make_question(
    conversation_id: str,
    query: str,
    client_message_id: str,
    context: dict | None,
) -> Question:
    """A validated Question. `context` holds ClinicalContext's fields (lists as lists) or is None."""
    query = clean_text(query, "query", MAX_QUERY)
    if not query:
        raise invalid("query", "required")
    if len(client_message_id) > MAX_CLIENT_MESSAGE_ID or not client_message_id.isprintable():
        raise invalid("client_message_id", f"at most {MAX_CLIENT_MESSAGE_ID} printable characters")
    clinical = None
    if context:
        age = int(context.get("age", 0))
        if not 0 <= age <= 150:
            raise invalid("clinical_context.age", "must be between 0 and 150")
        clinical = ClinicalContext(
            specialty=clean_specialty(context.get("specialty", ""), "clinical_context.specialty"),
            age=age,
            sex=clean_text(context.get("sex", ""), "clinical_context.sex", 32, single_line=True),
            medications=_bounded_items(list(context.get("medications", ())), "clinical_context.medications"),
            conditions=_bounded_items(list(context.get("conditions", ())), "clinical_context.conditions"),
            allergies=_bounded_items(list(context.get("allergies", ())), "clinical_context.allergies"),
            notes=clean_text(context.get("notes", ""), "clinical_context.notes", MAX_NOTES),
        )
        if clinical == ClinicalContext():
            clinical = None
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


def stored_answer(question: MessageRow, answer: MessageRow) -> Answer:
    """The Answer a stored question/answer pair replays as."""
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
    row: MessageRow | None = None  # the stored question


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
        """Deltas, then citations, then the stored answer."""
        run = _Run(question, await self._conversations.get(caller, question.conversation_id), time.perf_counter())
        stored = await self._claim(run) if question.client_message_id else None
        if stored is not None:
            await self._audit_answer(run.conversation, stored, replayed=True)
            async for event in _replay(stored):
                yield event
            return
        renewing = asyncio.create_task(self._keep_lease(run)) if question.client_message_id else None
        try:
            async for event in self._answer(run):
                yield event
        except BaseException as exc:
            if run.row is not None:
                # Let a retry take the question over at once (shielded: this may be a cancellation).
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._store.release_question(run.row.seq))
            if isinstance(exc, Exception):
                reason = exc.reason.value if isinstance(exc, ServiceError) else Reason.INTERNAL.value
                await self._audit.record(
                    "rag.answer", success=False, failure_reason=reason, resource_type="conversation",
                    resource_id=run.conversation.id,
                )  # fmt: skip
            raise
        finally:
            if renewing is not None:
                renewing.cancel()

    async def _keep_lease(self, run: _Run) -> None:
        """Renew this worker's claim on the question while it writes the answer, so that a retry waits for it; a
        crashed worker stops renewing and a retry takes the question over within one lease."""
        every = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            if run.row is not None:
                with contextlib.suppress(Exception):  # a missed renewal costs at most a duplicate answer attempt
                    await self._store.renew_lease(run.row.seq, utcnow() + self._lease)

    async def _claim(self, run: _Run) -> Answer | None:
        """For a question with a client message id: the stored answer to replay, or None when this request is to
        answer it (`run.row` is then the stored question, if one exists already)."""
        question = run.question
        deadline = time.monotonic() + self._wait_seconds
        while True:
            asked, answered = await self._store.message_pair(question.conversation_id, question.client_message_id)
            if asked is not None and asked.content != question.query:
                raise ServiceError(
                    Reason.ALREADY_EXISTS,
                    "client_message_id was already used for a different question in this conversation",
                    metadata={"field": "client_message_id"},
                )
            if asked is not None and answered is not None:
                return stored_answer(asked, answered)
            if asked is None:
                return None  # nobody asked it yet: _answer stores it (or finds a concurrent duplicate)
            if await self._store.claim_question(asked.seq, utcnow() + self._lease):
                run.row = asked
                return None
            if time.monotonic() > deadline:
                raise ServiceError(
                    Reason.DEADLINE_EXCEEDED, "the answer to this client_message_id is still being written",
                    retry_after_seconds=1.0,
                )  # fmt: skip
            await asyncio.sleep(POLL_SECONDS)

    async def _answer(self, run: _Run) -> AsyncIterator[AnswerEvent]:
        question, conversation = run.question, run.conversation
        phi_started = time.perf_counter()
        scans = await asyncio.gather(
            self._phi.scan(question.query),
            self._phi.scan(question.clinical_context.describe() if question.clinical_context else ""),
        )
        found = {t for scan in scans for t in scan.types}
        run.phi_types = [t for t in PhiType if t in found]
        run.timings.phi_ms = _ms(phi_started)

        if run.row is None:
            run.row = await self._store_question(run)
            if run.row is None:  # a concurrent duplicate stored it first: wait for its answer
                stored = await self._claim(run)
                if stored is not None:
                    async for event in _replay(stored):
                        yield event
                    return
        phi = bool(run.phi_types)
        await self._audit.record(
            "rag.question", resource_type="conversation", resource_id=conversation.id,
            metadata={"message_id": run.row.id, "phi_detected": str(phi).lower(),
                      "phi_types": ",".join(run.phi_types)},
        )  # fmt: skip

        retrieval_started = time.perf_counter()
        passages = await self._retrieve(question, conversation)
        run.timings.retrieval_ms = _ms(retrieval_started)

        settings = settings_of(conversation)
        cloud, local = ModelKind.CLOUD in self._writers, ModelKind.LOCAL in self._writers
        checkable = names_checkable(question.query)
        routes = (
            plan_routes(phi, cloud, local, checkable)
            if passages
            else [Route(ModelKind.EXTRACTIVE, "no_passages_found")]
        )
        history = await self._store.recent_messages(conversation.id, self._history_turns, run.row.seq)

        generation_started = time.perf_counter()
        parts: list[str] = []
        route, writer = None, None
        for candidate in routes:
            writer = self._writers[candidate.kind]
            prompt = _prompt_for(
                candidate.kind, question, passages, settings.answer_style, settings.system_prompt, history
            )
            try:
                async for delta in writer.stream(prompt):
                    if not parts:
                        route = candidate
                        run.timings.first_token_ms = _ms(run.started)
                    parts.append(delta)
                    yield TextDelta(delta)
            except ModelUnavailable:
                if parts:  # pragma: no cover - ModelUnavailable only happens before the first token
                    raise
                continue
            except ModelStreamBroken:
                raise ServiceError(
                    Reason.BACKEND_UNAVAILABLE, "the model stopped in the middle of the answer; ask again",
                    retry_after_seconds=1.0, metadata={"model": writer.model_label},
                ) from None  # fmt: skip
            if parts:
                break
        if route is None or writer is None:
            raise ServiceError(
                Reason.INTERNAL, "no model produced an answer"
            )  # pragma: no cover - extractive always does
        run.timings.generation_ms = _ms(generation_started)

        content = "".join(parts)
        citations = cite(content, passages)
        yield CitationsReady(citations)
        answer = await self._store_answer(run, content, citations, writer.model_label, route.reason)
        await self._audit_answer(conversation, answer, replayed=False)
        yield AnswerReady(answer)

    async def _store_question(self, run: _Run) -> MessageRow | None:
        question = run.question
        row = MessageRow(
            conversation_id=question.conversation_id,
            role="user",
            content=question.query,
            citations=[],
            phi_detected=bool(run.phi_types),
            phi_types=[t.value for t in run.phi_types],
            client_message_id=question.client_message_id or None,
            answer_lease_until=utcnow() + self._lease,
        )
        try:
            return await self._store.add_message(row)
        except ConversationGone:
            raise not_found("conversation", question.conversation_id) from None

    async def _retrieve(self, question: Question, conversation: ConversationRow) -> list[Passage]:
        """Passages for the question, in the question's (or else the conversation's) specialty; when that
        specialty has nothing, from the whole knowledge base."""
        specialty = (question.clinical_context.specialty if question.clinical_context else "") or conversation.specialty
        query = question.query[:MAX_SEARCH_QUERY]
        try:
            passages = await self._retriever.retrieve(query, specialty, self._retrieval_limit)
            if not passages and specialty:
                passages = await self._retriever.retrieve(query, "", self._retrieval_limit)
        except RetrievalFailed as exc:
            raise ServiceError(
                Reason.BACKEND_UNAVAILABLE, f"knowledge base search failed: {exc}", retry_after_seconds=1.0
            ) from None
        return passages

    async def _store_answer(
        self, run: _Run, content: str, citations: list[Citation], model: str, reason: str
    ) -> Answer:
        assert run.row is not None
        run.timings.total_ms = _ms(run.started)
        row = MessageRow(
            conversation_id=run.question.conversation_id,
            role="assistant",
            content=content,
            citations=[asdict(c) for c in citations],
            model_used=model,
            phi_detected=bool(run.phi_types),
            phi_types=[t.value for t in run.phi_types],
            client_message_id=run.question.client_message_id or None,
            routing_reason=reason,
            timings=asdict(run.timings),
        )
        try:
            stored = await self._store.add_message(row)
        except ConversationGone:
            raise not_found("conversation", run.question.conversation_id) from None
        if stored is None:  # a worker that took the question over finished first: its answer is the answer
            asked, answered = await self._store.message_pair(
                run.question.conversation_id, run.question.client_message_id
            )
            if asked is None or answered is None:
                raise ServiceError(Reason.INTERNAL, "answer lost in a takeover race")  # pragma: no cover
            return stored_answer(asked, answered)
        return stored_answer(run.row, stored)

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


async def _replay(answer: Answer) -> AsyncIterator[AnswerEvent]:
    yield TextDelta(answer.content)
    yield CitationsReady(answer.citations)
    yield AnswerReady(answer)
