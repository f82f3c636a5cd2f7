"""Transcribe: speech-to-text only. Client messages are handled in order; the stream's own pace is the flow control
(a slow reader stops the reading of audio, and gRPC pushes back on the client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.core.errors import invalid
from services.voice.conversation import AudioIn, ClientMessage, EndOfUtterance
from services.voice.listening import FinalText, Listener, ListenEvent, SpeechBegan
from services.voice.sessions import FINAL_TRANSCRIPT_SECONDS, SessionClock, SessionRecord, next_message
from services.voice.settings import VoiceSettings


@dataclass(frozen=True)
class Heard:
    """A listening event and the utterance (from 1) it belongs to."""

    utterance: int
    event: ListenEvent


async def transcribe(
    listener: Listener, messages: AsyncIterator[ClientMessage], settings: VoiceSettings, record: SessionRecord
) -> AsyncIterator[Heard]:
    """Listen until the client ends its stream; the end finishes the utterance in progress."""
    clock = SessionClock(settings.max_session_seconds)
    utterance = 0
    idle = settings.idle_timeout_seconds
    while True:
        message = await next_message(messages, idle_seconds=idle, busy=lambda: listener.in_speech)
        if message is None:
            events = listener.end_utterance()
        elif isinstance(message, AudioIn):
            clock.check(listener.audio_ms)
            events = listener.accept(message.pcm)
        elif isinstance(message, EndOfUtterance):
            events = listener.end_utterance()
        else:
            raise invalid("control", "only CONTROL_ACTION_END_OF_UTTERANCE applies to Transcribe")
        async for event in events:
            if isinstance(event, SpeechBegan):
                utterance += 1
            elif isinstance(event, FinalText):
                FINAL_TRANSCRIPT_SECONDS.observe(event.latency_ms / 1000)
            yield Heard(max(utterance, 1), event)
        record.audio_ms = listener.audio_ms
        if message is None:
            return
