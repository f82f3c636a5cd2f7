"""Listening: one stream's speech-to-text pipeline, shared by Transcribe and Converse.

Client audio (8-48 kHz) is resampled to the recognizer's rate, the endpointer finds utterances in it, and only
the audio inside utterances goes to the recognizer, in pieces of `stt_feed_ms`. Interim transcripts come back
at most every `interim_interval_ms` of audio; the final one when the utterance ends. A recognizer that fails
costs the utterance in progress, never the session: a new stream is opened for the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.core.errors import invalid
from services.core.limits import VOICE
from services.voice.audio import INPUT_RATES, StreamResampler, duration_ms
from services.voice.endpointing import (
    Endpointer,
    EndpointerConfig,
    EndpointEvent,
    SpeechAudio,
    SpeechEnded,
    SpeechStarted,
)
from services.voice.recognition import (
    RecognitionStream,
    RecognizerUnavailable,
    SpeechRecognizer,
    interim_stability,
)
from services.voice.settings import VoiceSettings

log = logging.getLogger(__name__)

LANGUAGES = ("en-US",)


@dataclass(frozen=True)
class ListenOptions:
    """What the client's audio is and what it wants back."""

    sample_rate: int
    language: str = "en-US"
    interim_results: bool = False
    hints: tuple[str, ...] = ()


def listen_options(
    *, encoding: str, sample_rate: int, language: str, interim_results: bool, hints: list[str], field: str
) -> ListenOptions:
    """Validated listening options from a RecognitionConfig (`encoding` is the enum value's name, `field` the
    config's path for error messages); VALIDATION_ERROR names the first bad field."""
    if encoding != "AUDIO_ENCODING_LINEAR16":
        raise invalid(f"{field}.encoding", "must be AUDIO_ENCODING_LINEAR16", reason="UNSUPPORTED_ENCODING")
    if sample_rate not in INPUT_RATES:
        raise invalid(
            f"{field}.sample_rate_hertz", f"must be one of {', '.join(map(str, INPUT_RATES))}", "UNSUPPORTED_RATE"
        )
    chosen = next((code for code in LANGUAGES if code.lower() == (language or "en-US").lower()), None)
    if chosen is None:
        raise invalid(f"{field}.language_code", f"must be one of {', '.join(LANGUAGES)}", "UNSUPPORTED_LANGUAGE")
    if len(hints) > VOICE.phrase_hints:
        raise invalid(f"{field}.phrase_hints", f"at most {VOICE.phrase_hints} phrases")
    for i, hint in enumerate(hints):
        if not hint.strip() or len(hint) > VOICE.phrase_hint_chars:
            raise invalid(f"{field}.phrase_hints[{i}]", f"must be 1 to {VOICE.phrase_hint_chars} characters")
    return ListenOptions(sample_rate, chosen, interim_results, tuple(hints))


@dataclass(frozen=True)
class SpeechBegan:
    """Voice activity started at `offset_ms` of the stream's audio."""

    offset_ms: int


@dataclass(frozen=True)
class SpeechFinished:
    """The utterance ended at `offset_ms`; `at` is when that was decided (time.perf_counter)."""

    offset_ms: int
    at: float


@dataclass(frozen=True)
class InterimText:
    """The words recognized so far in the utterance."""

    text: str
    stability: float


@dataclass(frozen=True)
class FinalText:
    """The utterance's final transcript; `latency_ms` runs from the last audio chunk received to now."""

    text: str
    confidence: float
    latency_ms: float
    utterance_ms: float


@dataclass(frozen=True)
class ListenFailure:
    """The recognizer failed; the utterance in progress is lost, listening goes on."""

    message: str


ListenEvent = SpeechBegan | SpeechFinished | InterimText | FinalText | ListenFailure


class Listener:
    """Speech-to-text for one stream: feed it audio, get speech events and transcripts."""

    def __init__(self, recognizer: SpeechRecognizer, options: ListenOptions, settings: VoiceSettings) -> None:
        self._recognizer = recognizer
        self._options = options
        rate = recognizer.sample_rate
        self._resampler = StreamResampler(options.sample_rate, rate)
        self._endpointer = Endpointer(
            EndpointerConfig(
                sample_rate=rate,
                aggressiveness=settings.vad_aggressiveness,
                speech_start_ms=settings.speech_start_ms,
                silence_window_ms=settings.silence_window_ms,
                preroll_ms=settings.preroll_ms,
                max_utterance_ms=int(settings.max_utterance_seconds * 1000),
            )
        )
        self._feed_bytes = rate * settings.stt_feed_ms // 1000 * 2
        self._interim_ms = settings.interim_interval_ms
        self._stream: RecognitionStream | None = None
        self._buffer = bytearray()
        self._failed = False  # the recognizer failed during this utterance: ignore the rest of it
        self._since_interim_ms = 0.0
        self._last_interim = ""
        self._started_ms = 0
        self._last_chunk_at = time.perf_counter()
        self.audio_ms = 0.0  # client audio received, by its length

    @property
    def in_speech(self) -> bool:
        """True while an utterance is in progress."""
        return self._endpointer.in_speech

    async def open(self) -> None:
        """Open the recognition stream (raises RecognizerUnavailable when no recognizer runs)."""
        self._stream = await self._recognizer.open_stream(self._options.hints)

    async def accept(self, pcm: bytes) -> AsyncIterator[ListenEvent]:
        """Take a chunk of client audio; yields what it caused, as soon as each is known."""
        self._last_chunk_at = time.perf_counter()
        self.audio_ms += duration_ms(len(pcm), self._options.sample_rate)
        for event in self._endpointer.push(self._resampler.push(pcm)):
            async for out in self._on(event):
                yield out

    async def end_utterance(self) -> AsyncIterator[ListenEvent]:
        """The client says the utterance is over (END_OF_UTTERANCE, or the end of its stream)."""
        tail = self._endpointer.push(self._resampler.flush())
        for event in [*tail, *self._endpointer.end()]:
            async for out in self._on(event):
                yield out

    async def close(self) -> None:
        """Release the recognition stream."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()

    async def _on(self, event: EndpointEvent) -> AsyncIterator[ListenEvent]:
        if isinstance(event, SpeechStarted):
            yield SpeechBegan(event.offset_ms)
            self._started_ms = event.offset_ms
            self._buffer = bytearray(event.audio)
            self._since_interim_ms, self._last_interim = 0.0, ""
            try:
                await self._start()
            except RecognizerUnavailable as exc:
                yield await self._lose(exc)
                return
            if len(self._buffer) >= self._feed_bytes:
                async for out in self._feed():
                    yield out
        elif isinstance(event, SpeechAudio):
            self._buffer += event.audio
            if len(self._buffer) >= self._feed_bytes:
                async for out in self._feed():
                    yield out
        elif isinstance(event, SpeechEnded):
            yield SpeechFinished(event.offset_ms, time.perf_counter())
            async for out in self._finish(event.offset_ms):
                yield out

    async def _start(self) -> None:
        self._failed = False
        if self._stream is None:
            await self.open()
        assert self._stream is not None
        await self._stream.start_utterance()

    async def _feed(self, *, last: bool = False) -> AsyncIterator[ListenEvent]:
        pcm, self._buffer = bytes(self._buffer), bytearray()
        if self._failed or self._stream is None or not pcm:
            return
        self._since_interim_ms += duration_ms(len(pcm), self._recognizer.sample_rate)
        partial = self._options.interim_results and not last and self._since_interim_ms >= self._interim_ms
        text: str | None = None
        try:
            text = await self._stream.feed(pcm, partial=partial)
        except RecognizerUnavailable as exc:
            yield await self._lose(exc)
            return
        if partial:
            self._since_interim_ms = 0.0
            if text and text != self._last_interim:
                yield InterimText(text, interim_stability(self._last_interim, text))
                self._last_interim = text

    async def _finish(self, ended_ms: int) -> AsyncIterator[ListenEvent]:
        async for out in self._feed(last=True):
            yield out
        if self._failed or self._stream is None:
            return
        try:
            result = await self._stream.finish_utterance()
        except RecognizerUnavailable as exc:
            yield await self._lose(exc)
            return
        if result.text:
            latency = (time.perf_counter() - self._last_chunk_at) * 1000
            yield FinalText(result.text, result.confidence, latency, ended_ms - self._started_ms)

    async def _lose(self, exc: RecognizerUnavailable) -> ListenFailure:
        log.warning("recognizer failed; utterance lost", extra={"error": str(exc)})
        self._failed = True
        await self.close()  # a fresh stream (likely in another process) is opened for the next utterance
        return ListenFailure("speech recognition failed; please repeat that")
