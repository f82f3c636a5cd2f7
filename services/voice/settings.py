"""Settings of the voice service (environment variables prefixed VOICE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.limits import VOICE
from services.core.settings import ServiceSettings


class VoiceSettings(ServiceSettings):
    """Engines, endpointing, limits and flow control of voice sessions."""

    model_config = SettingsConfigDict(env_prefix="VOICE_", env_file=".env", extra="ignore", frozen=True)

    # speech-to-text
    recognizer_workers: int = Field(
        0, description="Recognizer processes (pocketsphinx holds the GIL, so decoding runs in them); 0 = one per CPU."
    )
    recognizer_idle_decoders: int = Field(
        2, description="Warm decoders each recognizer process keeps ready (about 90 MB each)."
    )
    recognizer_timeout_seconds: float = Field(
        10.0, description="Longest a recognizer process may take for one step before the stream is failed."
    )
    stt_max_hmm_per_frame: int = Field(
        5000, description="pocketsphinx maxhmmpf: the search beam cap; lower is faster, higher more accurate."
    )
    stt_second_pass: bool = Field(
        False, description="pocketsphinx fwdflat pass at the end of each utterance (slower finals, no gain measured)."
    )
    stt_feed_ms: int = Field(100, description="Audio gathered before it is handed to the recognizer.")
    interim_interval_ms: int = Field(200, description="Least audio between two interim transcripts.")
    vocabulary_file: Path | None = Field(
        None, description="Extra terms (one per line) added to the recognizer next to the shipped medical vocabulary."
    )
    # endpointing
    vad_aggressiveness: int = Field(2, ge=0, le=3, description="webrtcvad mode: 0 (lenient) to 3 (strict on speech).")
    speech_start_ms: int = Field(
        240, description="Window in which mostly voiced audio starts an utterance (and interrupts an answer)."
    )
    silence_window_ms: int = Field(600, description="Silence after speech that ends an utterance.")
    preroll_ms: int = Field(300, description="Audio kept from before speech started and handed to the recognizer.")
    max_utterance_seconds: float = Field(30.0, description="An utterance longer than this is ended and recognized.")
    # text-to-speech
    tts_default_voice: str = Field("en-us", description="Voice used when a request names none (see ListVoices).")
    tts_words_per_minute: int = Field(175, description="Speaking rate of synthesized answers.")
    tts_chunk_ms: int = Field(200, description="Length of each synthesized audio message.")
    audio_lead_ms: int = Field(
        1500, description="How far ahead of real time Converse sends answer audio; barge-in withdraws the rest."
    )
    tts_max_processes: int = Field(4, description="espeak-ng processes running at once across all sessions.")
    tts_timeout_seconds: float = Field(10.0, description="Longest synthesis of one sentence.")
    espeak_binary: str = Field("espeak-ng", description="The espeak-ng executable.")
    # sessions
    max_sessions: int = Field(64, description="Voice streams (Converse and Transcribe) one process serves at once.")
    max_sessions_per_user: int = Field(4, description="Voice streams one account may hold open at once.")
    max_session_seconds: float = Field(1800.0, description="Longest a stream may last (wall clock or audio).")
    idle_timeout_seconds: float = Field(
        30.0, description="A stream that sends nothing for this long, with no answer in progress, is closed."
    )
    config_timeout_seconds: float = Field(10.0, description="Time a client has to send the config message.")
    max_chunk_bytes: int = Field(VOICE.audio_chunk_bytes, description="Largest audio message accepted.")
    outbox_messages: int = Field(64, description="Responses buffered for a slow reader before the session waits.")
    outbox_audio_messages: int = Field(
        16, description="Audio responses buffered for a slow reader (kept below outbox_messages so events pass)."
    )
    answer_timeout_seconds: float = Field(60.0, description="Longest one answer from rag may take.")
    conversation_title: str = Field("Voice conversation", description="Title of conversations a session creates.")


@lru_cache
def voice_settings() -> VoiceSettings:
    """The process-wide voice settings (read once)."""
    return VoiceSettings()
