"""The voice service's gRPC servicer: proto in, domain call, proto out.

Converse and Transcribe read the config first and refuse a bad one (INVALID_ARGUMENT, before any audio is
touched); then the domain session runs and its events become responses. Synthesize and ListVoices are plain
request/response over the speech engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TypeVar

import grpc

from services.core import registry
from services.core.context import current_caller, current_request
from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import VOICE
from services.core.pagination import decode_page_token, encode_page_token, page_size
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.status import ends_with_status, service_domain, to_status
from services.voice.conversation import (
    AnswerTextOut,
    AudioIn,
    AudioOut,
    CancelResponse,
    CitationsOut,
    ClientMessage,
    ConverseEvent,
    ConverseOptions,
    ConverseSession,
    EndOfUtterance,
    Problem,
    SpeechSignal,
    TextIn,
    TranscriptOut,
    TurnDone,
)
from services.voice.listening import (
    FinalText,
    InterimText,
    Listener,
    ListenEvent,
    ListenFailure,
    ListenOptions,
    SpeechBegan,
    SpeechFinished,
    listen_options,
)
from services.voice.pronunciation import Pronouncer
from services.voice.rag_client import RagAnswers
from services.voice.recognition import RecognizerUnavailable, SpeechRecognizer
from services.voice.sessions import RECOGNIZER_STREAMS, SessionRegistry
from services.voice.settings import VoiceSettings, voice_settings
from services.voice.sphinx import SphinxRecognizer
from services.voice.synthesis import (
    AudioPiece,
    EspeakSynthesizer,
    Speaker,
    SpeechSynthesizer,
    Voice,
    sentences_of,
    speech_options,
)
from services.voice.transcription import transcribe
from voiceassist.rag.v1 import rag_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

log = logging.getLogger(__name__)
SPEC = registry.spec("voice")
DOMAIN = service_domain(SPEC.name)

_SPEECH_EVENTS = {
    "started": voice_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED,
    "ended": voice_pb2.SPEECH_EVENT_TYPE_SPEECH_ENDED,
    "barge_in": voice_pb2.SPEECH_EVENT_TYPE_BARGE_IN,
}


# ---- requests in


_Request = TypeVar("_Request", voice_pb2.ConverseRequest, voice_pb2.TranscribeRequest)


async def first_message(requests: AsyncIterator[_Request], wait_seconds: float) -> _Request:
    """The stream's first message; VALIDATION_ERROR when none comes in time."""
    try:
        async with asyncio.timeout(wait_seconds):
            return await anext(requests)
    except StopAsyncIteration:
        raise invalid("config", "the stream ended before its config message", "CONFIG_REQUIRED") from None
    except TimeoutError:
        raise invalid("config", f"no config message within {wait_seconds:g} s", "CONFIG_REQUIRED") from None


def recognition_options(config: voice_pb2.RecognitionConfig, field: str) -> ListenOptions:
    """Validated listening options from a RecognitionConfig."""
    encoding = (
        voice_pb2.AudioEncoding.Name(config.encoding) if config.encoding in voice_pb2.AudioEncoding.values() else ""
    )
    return listen_options(
        encoding=encoding,
        sample_rate=config.sample_rate_hertz,
        language=config.language_code,
        interim_results=config.interim_results,
        hints=list(config.phrase_hints),
        field=field,
    )


def _audio(request: voice_pb2.ConverseRequest | voice_pb2.TranscribeRequest, max_bytes: int) -> AudioIn:
    if len(request.audio_content) > max_bytes:
        raise invalid("audio_content", f"at most {max_bytes} bytes per message", "CHUNK_TOO_LARGE")
    return AudioIn(request.audio_content)


def _control(action: int, allowed: tuple[int, ...]) -> ClientMessage:
    if action not in allowed:
        names = " or ".join(voice_pb2.ControlAction.Name(a) for a in allowed)
        raise invalid("control", f"must be {names}", "UNKNOWN_CONTROL")
    return EndOfUtterance() if action == voice_pb2.CONTROL_ACTION_END_OF_UTTERANCE else CancelResponse()


async def converse_messages(
    requests: AsyncIterator[voice_pb2.ConverseRequest], max_bytes: int
) -> AsyncIterator[ClientMessage]:
    """The messages after the config, as domain messages; VALIDATION_ERROR for a malformed one."""
    controls = (voice_pb2.CONTROL_ACTION_END_OF_UTTERANCE, voice_pb2.CONTROL_ACTION_CANCEL_RESPONSE)
    async for request in requests:
        kind = request.WhichOneof("request")
        if kind == "audio_content":
            yield _audio(request, max_bytes)
        elif kind == "control":
            yield _control(request.control, controls)
        elif kind == "text":
            text = request.text.strip()
            if not text:  # a malformed message; the question's bounds are rag's, its refusal ends only the turn
                raise invalid("text", "empty: a text turn carries a question")
            yield TextIn(text)
        elif kind == "config":
            raise invalid("config", "only the first message may carry the config", "CONFIG_REPEATED")
        else:
            raise invalid("request", "empty message: set audio_content, control or text")


async def transcribe_messages(
    requests: AsyncIterator[voice_pb2.TranscribeRequest], max_bytes: int
) -> AsyncIterator[ClientMessage]:
    """The messages after the config, as domain messages; VALIDATION_ERROR for a malformed one."""
    async for request in requests:
        kind = request.WhichOneof("request")
        if kind == "audio_content":
            yield _audio(request, max_bytes)
        elif kind == "control":
            yield _control(request.control, (voice_pb2.CONTROL_ACTION_END_OF_UTTERANCE,))
        elif kind == "config":
            raise invalid("config", "only the first message may carry the config", "CONFIG_REPEATED")
        else:
            raise invalid("request", "empty message: set audio_content or control")


# ---- responses out


def audio_chunk(piece: AudioPiece, sequence: int) -> voice_pb2.AudioChunk:
    """The proto form of a synthesized chunk."""
    return voice_pb2.AudioChunk(
        audio_content=piece.pcm,
        sequence=sequence,
        encoding=voice_pb2.AUDIO_ENCODING_LINEAR16,
        sample_rate_hertz=piece.sample_rate,
        text=piece.text,
    )


def converse_response(event: ConverseEvent) -> voice_pb2.ConverseResponse:
    """The proto form of a Converse event."""
    response = voice_pb2.ConverseResponse(turn=event.turn)
    if isinstance(event, SpeechSignal):
        response.speech_event.type = _SPEECH_EVENTS[event.kind]
        response.speech_event.audio_offset_ms = event.offset_ms
    elif isinstance(event, TranscriptOut):
        response.transcript.CopyFrom(
            voice_pb2.Transcript(
                text=event.text, is_final=event.is_final, stability=event.stability, confidence=event.confidence
            )
        )
    elif isinstance(event, AnswerTextOut):
        response.answer_text.delta = event.delta
    elif isinstance(event, CitationsOut):
        response.citations.citations.extend(event.citations)
    elif isinstance(event, AudioOut):
        response.audio.CopyFrom(audio_chunk(event.piece, event.sequence))
    elif isinstance(event, TurnDone):
        response.turn_completed.CopyFrom(
            voice_pb2.TurnCompleted(
                transcript=event.transcript,
                message_id=event.message_id,
                model_used=event.model_used,
                phi_detected=event.phi_detected,
                cancelled=event.cancelled,
                timings=voice_pb2.TurnTimings(**asdict(event.times)),
            )
        )
    elif isinstance(event, Problem):
        response.error.CopyFrom(to_status(event.error, DOMAIN))
    return response


def transcribe_response(utterance: int, event: ListenEvent) -> voice_pb2.TranscribeResponse:
    """The proto form of a listening event."""
    response = voice_pb2.TranscribeResponse(utterance=utterance)
    if isinstance(event, SpeechBegan | SpeechFinished):
        kind = "started" if isinstance(event, SpeechBegan) else "ended"
        response.speech_event.CopyFrom(
            voice_pb2.SpeechEvent(type=_SPEECH_EVENTS[kind], audio_offset_ms=event.offset_ms)
        )
    elif isinstance(event, InterimText):
        response.transcript.CopyFrom(voice_pb2.Transcript(text=event.text, stability=event.stability))
    elif isinstance(event, FinalText):
        response.transcript.CopyFrom(
            voice_pb2.Transcript(text=event.text, is_final=True, stability=1.0, confidence=event.confidence)
        )
    elif isinstance(event, ListenFailure):
        response.error.CopyFrom(to_status(ServiceError(Reason.BACKEND_UNAVAILABLE, event.message), DOMAIN))
    return response


def voice_message(voice: Voice) -> voice_pb2.Voice:
    """The proto form of a voice."""
    return voice_pb2.Voice(
        name=voice.name,
        language_codes=list(voice.language_codes),
        natural_sample_rate_hertz=voice.natural_sample_rate,
        engine=voice.engine,
    )


def speaks(voice: Voice, language: str) -> bool:
    """True when `voice` speaks `language` ("en" matches every English voice, "en-US" only American ones)."""
    wanted = language.lower()
    return any(code.lower() == wanted or code.lower().startswith(f"{wanted}-") for code in voice.language_codes)


# ---- the servicer


class VoiceServicer(voice_pb2_grpc.VoiceServiceServicer):
    """VoiceService over the listening, conversation and synthesis domain."""

    def __init__(
        self,
        runtime: Runtime,
        settings: VoiceSettings,
        recognizer: SpeechRecognizer,
        synthesizer: SpeechSynthesizer,
        answers: RagAnswers,
        sessions: SessionRegistry,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._recognizer = recognizer
        self._synthesizer = synthesizer
        self._answers = answers
        self._sessions = sessions

    async def _listener(self, options: ListenOptions) -> Listener:
        listener = Listener(self._recognizer, options, self._settings)
        try:
            await listener.open()
        except RecognizerUnavailable:
            raise ServiceError(Reason.BACKEND_UNAVAILABLE, "speech recognition is unavailable; try again") from None
        return listener

    @ends_with_status(voice_pb2.ConverseResponse)
    async def Converse(
        self, request_iterator: AsyncIterator[voice_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[voice_pb2.ConverseResponse]:
        caller = current_caller()
        settings = self._settings
        first = await first_message(request_iterator, settings.config_timeout_seconds)
        if first.WhichOneof("request") != "config":
            raise invalid("config", "the first message must carry the config", "CONFIG_REQUIRED")
        config = first.config
        listen = recognition_options(config.recognition, "config.recognition")
        speech = None
        if config.synthesize_speech:
            speech = await speech_options(
                self._synthesizer, config.voice, config.output_sample_rate_hertz,
                default_voice=settings.tts_default_voice, field="config.voice",
                rate_field="config.output_sample_rate_hertz",
            )  # fmt: skip
        # The interceptor sets the request before any handler runs.
        token = current_request().bearer_token  # type: ignore[union-attr]

        async def authorize() -> None:
            await self._runtime.token_verifier.verify(token)

        async with self._sessions.session("Converse", caller.user_id) as record:
            conversation_id = await self._answers.open_conversation(config.conversation_id, settings.conversation_title)
            record.conversation_id = conversation_id
            listener = await self._listener(listen)
            try:
                session = ConverseSession(
                    options=ConverseOptions(
                        conversation_id,
                        barge_in=config.barge_in,
                        clinical_context=config.clinical_context if config.HasField("clinical_context") else None,
                    ),
                    listener=listener,
                    speaker=Speaker(self._synthesizer, speech, settings.tts_chunk_ms) if speech else None,
                    answers=self._answers,
                    settings=settings,
                    record=record,
                    authorize=authorize,
                )
                # grpc's stubs want an instance of their private callback class here, not any callable.
                context.add_done_callback(lambda _: session.abort())  # type: ignore[arg-type]
                yield voice_pb2.ConverseResponse(
                    session_started=voice_pb2.SessionStarted(
                        conversation_id=conversation_id, session_id=record.session_id
                    )
                )
                async for event in session.run(converse_messages(request_iterator, settings.max_chunk_bytes)):
                    yield converse_response(event)
            finally:
                await listener.close()

    @ends_with_status(voice_pb2.TranscribeResponse)
    async def Transcribe(
        self, request_iterator: AsyncIterator[voice_pb2.TranscribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[voice_pb2.TranscribeResponse]:
        caller = current_caller()
        first = await first_message(request_iterator, self._settings.config_timeout_seconds)
        if first.WhichOneof("request") != "config":
            raise invalid("config", "the first message must carry the config", "CONFIG_REQUIRED")
        options = recognition_options(first.config, "config")
        async with self._sessions.session("Transcribe", caller.user_id) as record:
            listener = await self._listener(options)
            try:
                messages = transcribe_messages(request_iterator, self._settings.max_chunk_bytes)
                async for heard in transcribe(listener, messages, self._settings, record):
                    yield transcribe_response(heard.utterance, heard.event)
            finally:
                await listener.close()

    @ends_with_status(voice_pb2.SynthesizeResponse)
    async def Synthesize(
        self, request: voice_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[voice_pb2.SynthesizeResponse]:
        current_caller()
        text = request.text.strip()
        if not text or len(text) > VOICE.synthesis_text_chars:
            raise invalid("text", f"must be 1 to {VOICE.synthesis_text_chars} characters")
        if request.encoding not in (voice_pb2.AUDIO_ENCODING_UNSPECIFIED, voice_pb2.AUDIO_ENCODING_LINEAR16):
            raise invalid("encoding", "must be AUDIO_ENCODING_LINEAR16", "UNSUPPORTED_ENCODING")
        options = await speech_options(
            self._synthesizer, request.voice, request.sample_rate_hertz,
            default_voice=self._settings.tts_default_voice, field="voice", rate_field="sample_rate_hertz",
        )  # fmt: skip
        speaker = Speaker(self._synthesizer, options, self._settings.tts_chunk_ms)
        sequence = 0
        for sentence in sentences_of(text):
            for piece in await speaker.speak(sentence):
                yield voice_pb2.SynthesizeResponse(audio=audio_chunk(piece, sequence))
                sequence += 1

    async def ListVoices(
        self, request: voice_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> voice_pb2.ListVoicesResponse:
        current_caller()
        size = page_size(request.page_size, VOICE.list_voices)
        language = request.language_code.strip()
        if len(language) > VOICE.language_tag_chars or not all(c.isalnum() or c == "-" for c in language):
            raise invalid("language_code", "must be a BCP-47 language tag such as en-US")
        query = {"language_code": language.lower()}
        cursor = decode_page_token(request.page_token, query)
        voices = [v for v in await self._synthesizer.voices() if not language or speaks(v, language)]
        if cursor is not None:
            voices = [v for v in voices if v.name > str(cursor[0])]
        page = voices[:size]
        token = encode_page_token([page[-1].name], query) if len(voices) > size else ""
        return voice_pb2.ListVoicesResponse(voices=[voice_message(v) for v in page], next_page_token=token)


async def build(runtime: Runtime) -> Hosted:
    """The voice service, ready to add to a server: recognizer processes started, voices listed."""
    settings = voice_settings()
    recognizer = SphinxRecognizer(settings, Pronouncer(settings.espeak_binary))
    await recognizer.start()
    RECOGNIZER_STREAMS.set_function(recognizer.open_streams)
    synthesizer = EspeakSynthesizer(
        settings.espeak_binary, settings.tts_words_per_minute, settings.tts_max_processes, settings.tts_timeout_seconds
    )
    servicer = VoiceServicer(
        runtime,
        settings,
        recognizer,
        synthesizer,
        RagAnswers(lambda: runtime.channels.stub("rag", rag_pb2_grpc.RagServiceStub), settings.answer_timeout_seconds),
        SessionRegistry(settings, runtime.audit("voice")),
    )
    return Hosted(
        SPEC,
        lambda server: voice_pb2_grpc.add_VoiceServiceServicer_to_server(servicer, server),
        probe=recognizer.healthy,
        close=recognizer.close,
    )
