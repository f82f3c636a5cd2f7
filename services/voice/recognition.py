"""The speech-to-text engine interface: a recognizer opens streams; a stream decodes one utterance at a time.

The default engine is pocketsphinx in worker processes (`services.voice.sphinx`); another engine (a better
model, a remote service) only has to implement these two protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class RecognizerUnavailable(Exception):
    """The engine lost the stream (e.g. its worker process died) or is shutting down; open a new stream."""


@dataclass(frozen=True)
class Recognized:
    """The final text of one utterance."""

    text: str
    confidence: float  # 0 to 1


class RecognitionStream(Protocol):
    """Decodes the utterances of one session, one after another."""

    async def start_utterance(self) -> None:
        """Begin a new utterance."""

    async def feed(self, pcm: bytes, *, partial: bool) -> str | None:
        """Decode more audio of the utterance; with `partial`, the words recognized so far."""

    async def finish_utterance(self) -> Recognized:
        """End the utterance and return its final text."""

    async def close(self) -> None:
        """Release the stream's resources; safe to call twice."""


class SpeechRecognizer(Protocol):
    """A streaming speech-to-text engine."""

    sample_rate: int  # the rate audio must be fed at

    async def open_stream(self, hints: Sequence[str] = ()) -> RecognitionStream:
        """A stream whose vocabulary also holds the words of `hints` (e.g. drug names)."""

    def open_streams(self) -> int:
        """Streams open now (a gauge for tests and metrics)."""


def interim_stability(previous: str, current: str) -> float:
    """How likely `current` (an interim transcript) is to stay as it is, from how much of it survived since the
    previous interim: the share of its words that form an unchanged prefix, scaled below 1 (only a final
    transcript is certain)."""
    words = current.split()
    if not words:
        return 0.0
    before = previous.split()
    same = 0
    for old, new in zip(before, words, strict=False):
        if old != new:
            break
        same += 1
    return round(0.9 * same / len(words), 3)
