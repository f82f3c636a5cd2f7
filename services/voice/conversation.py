"""Converse: the state machine of a spoken conversation.

Three activities run side by side in one session, joined by a bounded outbox (`Outbox`) that the response stream
drains:

- the reader takes client messages (audio, END_OF_UTTERANCE, CANCEL_RESPONSE, text) in order, runs them
  through the listener and turns each final transcript (or text) into a question;
- the answerer takes questions one at a time (at most one waits) and runs a turn for each: the answer source
  streams text and citations; complete sentences go to the speaker while the answer is still arriving, so the
  first audio leaves before the whole answer is known; audio is paced at `audio_lead_ms` ahead of real time;
- the response stream yields the outbox's events, dropping answer text and audio of a withdrawn turn.

Barge-in: speech that starts while an answer is in progress or still playing on the client emits BARGE_IN,
cancels the turn (the answer source's call and the synthesis with it; queued audio is dropped), and listening
goes on with the new utterance. Without barge-in, a question asked during an answer waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.core.errors import Reason, ServiceError
from services.voice.audio import duration_ms
from services.voice.listening import (
    FinalText,
    InterimText,
    Listener,
    ListenEvent,
    ListenFailure,
    SpeechBegan,
    SpeechFinished,
)
from services.voice.outbox import Outbox
from services.voice.sessions import (
    FINAL_TRANSCRIPT_SECONDS,
    FIRST_AUDIO_SECONDS,
    SessionClock,
    SessionRecord,
    next_message,
    spawn,
    stop_tasks,
    track,
)
from services.voice.settings import VoiceSettings
from services.voice.synthesis import AudioPiece, SentenceSplitter, Speaker
from voiceassist.common.v1 import citation_pb2, clinical_pb2

log = logging.getLogger(__name__)

SENTENCE_QUEUE = 4  # sentences waiting for synthesis; the answer waits beyond that


# ---- what the client sends (parsed from the proto by the servicer)


@dataclass(frozen=True)
class AudioIn:
    """A chunk of the client's audio."""

    pcm: bytes


@dataclass(frozen=True)
class EndOfUtterance:
    """The client says the utterance is over."""


@dataclass(frozen=True)
class CancelResponse:
    """The client wants the answer in progress stopped."""


@dataclass(frozen=True)
class TextIn:
    """A typed question."""

    text: str


ClientMessage = AudioIn | EndOfUtterance | CancelResponse | TextIn


# ---- where answers come from (rag, through the servicer's client)


@dataclass(frozen=True)
class AnswerDelta:
    """More answer text."""

    text: str


@dataclass(frozen=True)
class AnswerSources:
    """The answer's citations, as the answer source gives them (passed through untouched)."""

    citations: tuple[citation_pb2.Citation, ...]


@dataclass(frozen=True)
class AnswerDone:
    """The answer is complete and stored."""

    message_id: str
    model_used: str
    phi_detected: bool


@dataclass(frozen=True)
class AnswerFailed:
    """The answer failed: the answer source's error, as it gave it (reason, code, field violations)."""

    error: ServiceError


AnswerEvent = AnswerDelta | AnswerSources | AnswerDone | AnswerFailed


class AnswerSource(Protocol):
    """Answers questions inside a conversation, as a stream."""

    def answer(
        self,
        *,
        conversation_id: str,
        question: str,
        clinical_context: clinical_pb2.ClinicalContext | None,
        client_message_id: str,
    ) -> AsyncIterator[AnswerEvent]:
        """Stream the answer to `question`."""


# ---- what the session sends back (turned into protos by the servicer)


@dataclass(frozen=True)
class SpeechSignal:
    """Voice activity: kind is "started", "ended" or "barge_in"."""

    turn: int
    kind: str
    offset_ms: int


@dataclass(frozen=True)
class TranscriptOut:
    """An interim or final transcript."""

    turn: int
    text: str
    is_final: bool
    stability: float
    confidence: float


@dataclass(frozen=True)
class AnswerTextOut:
    """A piece of answer text."""

    turn: int
    delta: str


@dataclass(frozen=True)
class CitationsOut:
    """The answer's citations."""

    turn: int
    citations: tuple[citation_pb2.Citation, ...]


@dataclass(frozen=True)
class AudioOut:
    """A chunk of answer audio, numbered from 0 in its turn."""

    turn: int
    piece: AudioPiece
    sequence: int


@dataclass(frozen=True)
class TurnTimes:
    """Where a turn's time went, in milliseconds (0 when a stage did not happen)."""

    final_transcript_ms: float
    first_answer_text_ms: float
    first_audio_ms: float
    total_ms: float
    utterance_ms: float


@dataclass(frozen=True)
class TurnDone:
    """A turn ended, answered or cancelled."""

    turn: int
    transcript: str
    message_id: str
    model_used: str
    phi_detected: bool
    cancelled: bool
    times: TurnTimes


@dataclass(frozen=True)
class Problem:
    """A recoverable error: the session goes on. A refused question keeps the answer source's reason and field
    violations, so the client learns what to change."""

    turn: int
    error: ServiceError


ConverseEvent = SpeechSignal | TranscriptOut | AnswerTextOut | CitationsOut | AudioOut | TurnDone | Problem


@dataclass(frozen=True)
class ConverseOptions:
    """A session's choices from its config."""

    conversation_id: str
    barge_in: bool
    clinical_context: clinical_pb2.ClinicalContext | None = None  # handed to the answer source with every question


@dataclass
class Question:
    """A question to answer: a final transcript or a typed text."""

    number: int
    text: str
    asked_at: float  # end of the utterance, or receipt of the text (time.perf_counter)
    final_transcript_ms: float = 0.0
    utterance_ms: float = 0.0


@dataclass
class Turn:
    """A question being answered."""

    question: Question
    task: asyncio.Task[None] | None = None
    first_text_at: float | None = None
    first_audio_at: float | None = None
    audio_ms: float = 0.0
    sequence: int = 0
    done: AnswerDone | None = None
    closed: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def _ms(since: float, until: float | None) -> float:
    return round((until - since) * 1000, 1) if until is not None else 0.0


class ConverseSession:
    """One Converse stream."""

    def __init__(
        self,
        *,
        options: ConverseOptions,
        listener: Listener,
        speaker: Speaker | None,
        answers: AnswerSource,
        settings: VoiceSettings,
        record: SessionRecord,
        authorize: Callable[[], Awaitable[None]],
    ) -> None:
        self._options = options
        self._listener = listener
        self._speaker = speaker
        self._answers = answers
        self._settings = settings
        self._record = record
        self._authorize = authorize
        self._outbox = Outbox(settings.outbox_messages, settings.outbox_audio_messages)
        self._questions: asyncio.Queue[Question] = asyncio.Queue(maxsize=1)
        self._asked = 0  # questions accepted; the next utterance belongs to turn _asked + 1
        self._current: Turn | None = None
        self._last_turn = 0
        self._withdrawn: set[int] = set()
        self._playing_until = 0.0  # estimated end of the last answer's playback on the client
        self._utterance_end = time.perf_counter()
        self._clock = SessionClock(settings.max_session_seconds)
        self._reader: asyncio.Task[None] | None = None
        self._answerer: asyncio.Task[None] | None = None

    async def run(self, messages: AsyncIterator[ClientMessage]) -> AsyncIterator[ConverseEvent]:
        """Serve the session: yields events until the client ends its stream and the last answer is done.
        Raises ServiceError for a fatal problem (bad message, idle or too long, revoked token)."""
        self._reader = spawn(self._read(messages), f"voice-read-{self._record.session_id}")
        self._answerer = spawn(self._answer_loop(), f"voice-answer-{self._record.session_id}")
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self._clock.deadline):
                        event = await self._outbox.get()
                except TimeoutError:
                    raise self._clock.expired() from None
                if event is None:
                    return
                if isinstance(event, AudioOut | AnswerTextOut | CitationsOut) and event.turn in self._withdrawn:
                    continue  # barge-in or CANCEL_RESPONSE: what was queued for the turn never leaves
                yield event
        finally:
            await self.close()

    def abort(self) -> None:
        """Cancel the session's tasks now (the client is gone); `close` finishes the cleanup."""
        for task in (self._reader, self._answerer, self._current.task if self._current else None):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """Stop every task of the session and release the recognizer stream."""
        await stop_tasks(self._reader, self._answerer)
        await self._listener.close()

    # ---- reader

    def _busy(self) -> bool:
        return self._current is not None or not self._questions.empty() or self._playing() or self._listener.in_speech

    def _playing(self) -> bool:
        return self._current is not None or time.perf_counter() < self._playing_until

    async def _read(self, messages: AsyncIterator[ClientMessage]) -> None:
        try:
            while True:
                message = await next_message(
                    messages, idle_seconds=self._settings.idle_timeout_seconds, busy=self._busy
                )
                if message is None:
                    break
                await self._handle(message)
            await self._listen(self._listener.end_utterance())  # the client is done: finish its last words
            await self._questions.join()  # and the answers still in progress
            self._outbox.close()
        except ServiceError as exc:
            self._outbox.fail(exc)
        except Exception as exc:
            log.exception("voice session reader failed")
            self._outbox.fail(exc)

    async def _handle(self, message: ClientMessage) -> None:
        if isinstance(message, AudioIn):
            self._clock.check(self._listener.audio_ms)
            await self._listen(self._listener.accept(message.pcm))
            self._record.audio_ms = self._listener.audio_ms
        elif isinstance(message, EndOfUtterance):
            await self._listen(self._listener.end_utterance())
        elif isinstance(message, CancelResponse):
            self._playing_until = 0.0
            await self._cancel_current()
        else:
            self._clock.check()
            await self._ask(Question(0, message.text, time.perf_counter()))

    async def _listen(self, events: AsyncIterator[ListenEvent]) -> None:
        async for event in events:
            turn = self._asked + 1
            if isinstance(event, SpeechBegan):
                if self._options.barge_in and self._playing():
                    await self._barge_in(event.offset_ms)
                await self._outbox.put(SpeechSignal(turn, "started", event.offset_ms))
            elif isinstance(event, SpeechFinished):
                self._utterance_end = event.at
                await self._outbox.put(SpeechSignal(turn, "ended", event.offset_ms))
            elif isinstance(event, InterimText):
                await self._outbox.put(TranscriptOut(turn, event.text, False, event.stability, 0.0))
            elif isinstance(event, FinalText):
                FINAL_TRANSCRIPT_SECONDS.observe(event.latency_ms / 1000)
                await self._outbox.put(TranscriptOut(turn, event.text, True, 1.0, event.confidence))
                question = Question(0, event.text, self._utterance_end, event.latency_ms, event.utterance_ms)
                await self._ask(question)
            elif isinstance(event, ListenFailure):
                await self._outbox.put(Problem(turn, ServiceError(Reason.BACKEND_UNAVAILABLE, event.message)))

    async def _barge_in(self, offset_ms: int) -> None:
        turn = self._current.question.number if self._current else self._last_turn
        await self._outbox.put(SpeechSignal(turn, "barge_in", offset_ms))
        self._playing_until = 0.0
        await self._cancel_current()

    async def _ask(self, question: Question) -> None:
        if self._questions.full():
            if not self._options.barge_in:
                waiting = "a question is already waiting for the answer in progress"
                await self._outbox.put(Problem(self._asked + 1, ServiceError(Reason.FAILED_PRECONDITION, waiting)))
                return
            replaced = self._questions.get_nowait()  # the newer question wins
            self._questions.task_done()
            nothing = TurnTimes(0.0, 0.0, 0.0, 0.0, 0.0)
            await self._outbox.put(TurnDone(replaced.number, replaced.text, "", "", False, True, nothing))
        if self._options.barge_in:
            await self._cancel_current()
        self._asked += 1
        self._record.turns = self._asked
        question.number = self._asked
        self._questions.put_nowait(question)

    async def _cancel_current(self) -> None:
        turn = self._current
        if turn is None or turn.task is None or turn.task.done():
            return
        self._withdrawn.add(turn.question.number)
        turn.task.cancel()
        await turn.finished.wait()

    # ---- answerer

    async def _answer_loop(self) -> None:
        try:
            while True:
                question = await self._questions.get()
                turn = self._current = Turn(question)
                self._last_turn = question.number
                try:
                    await self._authorize()  # a token revoked or expired since the stream opened ends the session
                    turn.task = spawn(self._answer(turn), f"voice-turn-{question.number}")
                    await asyncio.wait({turn.task})
                    if not turn.task.cancelled() and turn.task.exception() is not None:
                        await self._turn_failed(turn, turn.task.exception())
                    if not turn.closed:
                        await self._close_turn(turn, cancelled=turn.task.cancelled())
                finally:
                    await stop_tasks(turn.task)
                    self._current = None
                    turn.finished.set()
                    self._questions.task_done()
        except ServiceError as exc:
            self._outbox.fail(exc)
        except Exception as exc:
            log.exception("voice session answerer failed")
            self._outbox.fail(exc)

    async def _turn_failed(self, turn: Turn, exc: BaseException | None) -> None:
        log.error("voice turn failed", exc_info=exc)
        self._withdrawn.add(turn.question.number)
        message = "the answer failed; the session goes on"
        await self._outbox.put(Problem(turn.question.number, ServiceError(Reason.INTERNAL, message)))

    async def _answer(self, turn: Turn) -> None:
        if self._speaker is None:
            await self._fetch(turn, None)
        else:
            sentences: asyncio.Queue[str | None] = asyncio.Queue(maxsize=SENTENCE_QUEUE)
            async with asyncio.TaskGroup() as group:
                track(group.create_task(self._speak(turn, self._speaker, sentences)))
                await self._fetch(turn, sentences)
        await self._close_turn(turn, cancelled=False)

    async def _fetch(self, turn: Turn, sentences: asyncio.Queue[str | None] | None) -> None:
        number = turn.question.number
        splitter = SentenceSplitter()
        try:
            async with asyncio.timeout(self._settings.answer_timeout_seconds):
                stream = self._answers.answer(
                    conversation_id=self._options.conversation_id,
                    question=turn.question.text,
                    clinical_context=self._options.clinical_context,
                    client_message_id=f"voice-{self._record.session_id}-{number}",
                )
                async for event in stream:
                    if isinstance(event, AnswerDelta):
                        turn.first_text_at = turn.first_text_at or time.perf_counter()
                        await self._outbox.put(AnswerTextOut(number, event.text))
                        if sentences is not None:
                            for sentence in splitter.push(event.text):
                                await sentences.put(sentence)
                    elif isinstance(event, AnswerSources):
                        await self._outbox.put(CitationsOut(number, event.citations))
                    elif isinstance(event, AnswerDone):
                        turn.done = event
                    else:
                        await self._outbox.put(Problem(number, event.error))
        except TimeoutError:
            limit = self._settings.answer_timeout_seconds
            late = ServiceError(Reason.DEADLINE_EXCEEDED, f"no answer within {limit:g} s")
            await self._outbox.put(Problem(number, late))
        except ServiceError as exc:  # e.g. rag refusing the question (VALIDATION_ERROR): only this turn fails
            await self._outbox.put(Problem(number, exc))
        if sentences is not None:
            for sentence in splitter.flush():
                await sentences.put(sentence)
            await sentences.put(None)

    async def _speak(self, turn: Turn, speaker: Speaker, sentences: asyncio.Queue[str | None]) -> None:
        failed = False
        while (sentence := await sentences.get()) is not None:
            if failed:
                continue  # keep draining so the answer never waits on a dead speaker
            try:
                pieces = await speaker.speak(sentence)
            except ServiceError as exc:
                failed = True
                await self._outbox.put(Problem(turn.question.number, exc))
                continue
            for piece in pieces:
                await self._pace(turn)
                await self._outbox.put_audio(AudioOut(turn.question.number, piece, turn.sequence))
                if turn.first_audio_at is None:
                    turn.first_audio_at = time.perf_counter()
                    FIRST_AUDIO_SECONDS.observe(turn.first_audio_at - turn.question.asked_at)
                turn.sequence += 1
                turn.audio_ms += duration_ms(len(piece.pcm), piece.sample_rate)

    async def _pace(self, turn: Turn) -> None:
        """Keep answer audio at most `audio_lead_ms` ahead of its playback on the client, so barge-in can still
        withdraw what has not been sent."""
        if turn.first_audio_at is None:
            return
        played_ms = (time.perf_counter() - turn.first_audio_at) * 1000
        ahead = turn.audio_ms - played_ms - self._settings.audio_lead_ms
        if ahead > 0:
            await asyncio.sleep(ahead / 1000)

    async def _close_turn(self, turn: Turn, *, cancelled: bool) -> None:
        question = turn.question
        now = time.perf_counter()
        times = TurnTimes(
            final_transcript_ms=round(question.final_transcript_ms, 1),
            first_answer_text_ms=_ms(question.asked_at, turn.first_text_at),
            first_audio_ms=_ms(question.asked_at, turn.first_audio_at),
            total_ms=_ms(question.asked_at, now),
            utterance_ms=question.utterance_ms,
        )
        done = turn.done or AnswerDone("", "", False)
        await self._outbox.put(
            TurnDone(
                question.number, question.text, done.message_id, done.model_used, done.phi_detected, cancelled, times
            )
        )
        turn.closed = True
        if not cancelled and turn.first_audio_at is not None:
            self._playing_until = turn.first_audio_at + turn.audio_ms / 1000
