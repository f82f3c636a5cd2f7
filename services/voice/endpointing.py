"""Endpointing: where utterances start and end in a stream of 16 kHz audio, decided by webrtcvad frame by frame.

An utterance starts when most frames of a short window are voiced (`speech_start_ms`); the frames of a pre-roll
before it go to the recognizer too, so the first phoneme is not cut. It ends after `silence_window_ms` without a
voiced frame, when the client says so (END_OF_UTTERANCE) or when it grows past `max_utterance_ms`. Only audio
inside utterances reaches the recognizer: silence costs no decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import webrtcvad

from services.voice.audio import SAMPLE_WIDTH

START_RATIO = 0.7  # share of voiced frames in the start window that starts an utterance
MIN_FORCED_VOICED_FRAMES = 3  # END_OF_UTTERANCE before the start window filled: this many voiced frames count


@dataclass(frozen=True)
class SpeechStarted:
    """An utterance began at `offset_ms` of the stream; `audio` is its pre-roll and first frames."""

    offset_ms: int
    audio: bytes


@dataclass(frozen=True)
class SpeechAudio:
    """More audio of the utterance in progress."""

    audio: bytes


@dataclass(frozen=True)
class SpeechEnded:
    """The utterance ended at `offset_ms` (the end of its last voiced frame); `reason` says what ended it."""

    offset_ms: int
    reason: str  # "silence", "client" (END_OF_UTTERANCE or end of stream), "max_length"


EndpointEvent = SpeechStarted | SpeechAudio | SpeechEnded


@dataclass(frozen=True)
class EndpointerConfig:
    """Timing of the endpointer, in milliseconds."""

    sample_rate: int = 16000
    frame_ms: int = 30
    aggressiveness: int = 2
    speech_start_ms: int = 240
    silence_window_ms: int = 600
    preroll_ms: int = 300
    max_utterance_ms: int = 30000


class Endpointer:
    """Splits a stream of 16-bit mono audio into utterances (one instance per stream)."""

    def __init__(self, config: EndpointerConfig) -> None:
        self._config = config
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._frame_bytes = config.sample_rate * config.frame_ms // 1000 * SAMPLE_WIDTH
        self._start_frames = max(1, config.speech_start_ms // config.frame_ms)
        self._silence_frames = max(1, config.silence_window_ms // config.frame_ms)
        self._max_frames = max(1, config.max_utterance_ms // config.frame_ms)
        preroll_frames = max(self._start_frames, config.preroll_ms // config.frame_ms + self._start_frames)
        self._recent: deque[tuple[bytes, bool]] = deque(maxlen=preroll_frames)
        self._pending = b""
        self._frames_seen = 0
        self._in_speech = False
        self._utterance_frames = 0
        self._silent_run = 0

    @property
    def in_speech(self) -> bool:
        """True between the start and the end of an utterance."""
        return self._in_speech

    @property
    def offset_ms(self) -> int:
        """Audio examined so far, in milliseconds."""
        return self._frames_seen * self._config.frame_ms

    def push(self, pcm: bytes) -> list[EndpointEvent]:
        """Examine more audio; the events it causes, in order (audio of one call is merged into one event)."""
        data = self._pending + pcm
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        events: list[EndpointEvent] = []
        speech = bytearray()
        for start in range(0, whole, self._frame_bytes):
            frame = data[start : start + self._frame_bytes]
            voiced = self._vad.is_speech(frame, self._config.sample_rate)
            self._frames_seen += 1
            if self._in_speech:
                speech += frame
                self._utterance_frames += 1
                self._silent_run = 0 if voiced else self._silent_run + 1
                if self._silent_run >= self._silence_frames:
                    events += self._close(speech, "silence", trailing=self._silent_run)
                    speech = bytearray()
                elif self._utterance_frames >= self._max_frames:
                    events += self._close(speech, "max_length", trailing=self._silent_run)
                    speech = bytearray()
            else:
                self._recent.append((frame, voiced))
                window = list(self._recent)[-self._start_frames :]
                if len(window) == self._start_frames and sum(v for _, v in window) >= START_RATIO * len(window):
                    events.append(self._open())
        if speech:
            events.append(SpeechAudio(bytes(speech)))
        return events

    def end(self) -> list[EndpointEvent]:
        """The client ended the utterance: close the one in progress, or make one of a short burst of speech
        that had not yet filled the start window. No events when there was no speech."""
        events: list[EndpointEvent] = []
        if not self._in_speech:
            if sum(v for _, v in self._recent) < MIN_FORCED_VOICED_FRAMES:
                self._recent.clear()
                return events
            events.append(self._open())
        tail = self._pending
        self._pending = b""
        return [*events, *self._close(bytearray(tail), "client", trailing=self._silent_run)]

    def _open(self) -> SpeechStarted:
        frames = list(self._recent)
        first_voiced = next(i for i, (_, v) in enumerate(frames) if v)
        offset = (self._frames_seen - len(frames) + first_voiced) * self._config.frame_ms
        audio = b"".join(f for f, _ in frames)
        self._recent.clear()
        self._in_speech = True
        self._utterance_frames = len(frames)
        self._silent_run = 0
        return SpeechStarted(offset, audio)

    def _close(self, speech: bytearray, reason: str, trailing: int) -> list[EndpointEvent]:
        events: list[EndpointEvent] = [SpeechAudio(bytes(speech))] if speech else []
        self._in_speech = False
        self._utterance_frames = 0
        self._silent_run = 0
        offset = (self._frames_seen - trailing) * self._config.frame_ms
        return [*events, SpeechEnded(offset, reason)]
