"""The voice service end to end, through Envoy: recorded speech in, transcripts, a cited answer from a document
indexed by the real search service (rag's extractive answers), synthesized speech out; barge-in; refused configs;
limits; and a client that vanishes mid-stream, watched through the server's own metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2

from services.core.errors import Reason
from services.core.limits import RAG
from services.core.settings import ROOT
from services.core.status import error_of
from services.voice.audio import resample
from tests.e2e.test_search import watch
from tests.support.admin import create_admin
from tests.support.clients import Account, error_detail, error_reason, json_reason, register_and_login
from tests.support.mesh import Cluster, Server, free_port
from tests.support.voice import (
    SPEECH,
    ConverseStream,
    SlowChatModel,
    chunks,
    kind_is,
    recognition,
    utterance,
    word_errors,
)
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.common.v1 import clinical_pb2
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2, search_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

V = voice_pb2
# Tests that speak recorded utterances need the shared evaluation data; the rest run without it.
needs_speech = pytest.mark.skipif(not SPEECH.exists(), reason="../shared/eval/speech is absent")

# LJ001-0001 says: "Printing, in the only sense with which we are at present concerned, differs from most if not
# from all the arts and crafts represented in the Exhibition".
QUESTION_AUDIO = "lj_LJ001-0001"
BOOK = (
    "# Printing among the arts and crafts\n\n"
    "Printing differs from most if not from all the arts and crafts represented in the exhibition in being "
    "comparatively modern. The only sense of printing with which we are concerned is the art of making books by "
    "means of movable types. The Chinese took impressions from wood blocks engraved in relief for centuries before "
    "the woodcutters of the Netherlands did so by a similar process. The invention of movable metal letters in the "
    "middle of the fifteenth century may justly be considered as the invention of the art of printing.\n\n"
    "The earliest book printed with movable types, the Gutenberg Bible, has never been surpassed in the arts and "
    "crafts of printing."
)
TEXT_QUESTION = "How does printing differ from the other arts and crafts in the exhibition?"


@dataclass
class Library:
    """The printing document, indexed, and a plain account to ask about it."""

    user: Account
    other: Account
    document_id: str


@pytest.fixture(scope="module")
def library(embedded: Cluster) -> Library:
    with grpc.insecure_channel(embedded.servers[0].address) as channel:
        document_id = index_book(embedded, channel)
        return Library(register_and_login(channel), register_and_login(channel), document_id)


@pytest.fixture
async def voice(embedded: Cluster) -> AsyncIterator[voice_pb2_grpc.VoiceServiceStub]:
    """A VoiceService stub through Envoy (gRPC, as voice apps call it)."""
    assert embedded.envoy is not None
    async with grpc.aio.insecure_channel(embedded.envoy.address) as channel:
        yield voice_pb2_grpc.VoiceServiceStub(channel)


def config(**fields) -> voice_pb2.ConverseRequest:
    """A Converse config: 16 kHz in, 16 kHz speech out, interim results, barge-in."""
    base = {"recognition": recognition(16000), "synthesize_speech": True, "barge_in": True,
            "output_sample_rate_hertz": 16000}  # fmt: skip
    return V.ConverseRequest(config=V.ConverseConfig(**{**base, **fields}))


def pcm_of(messages: list[voice_pb2.ConverseResponse]) -> bytes:
    return b"".join(m.audio.audio_content for m in messages)


def assert_real_speech(pcm: bytes, rate: int, min_seconds: float) -> None:
    """The bytes are whole 16-bit samples that a WAV reader takes, and they hold sound, not silence."""
    assert len(pcm) % 2 == 0
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    with wave.open(io.BytesIO(buffer.getvalue())) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    assert len(samples) / rate >= min_seconds
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300


def session_events(audit: audit_pb2_grpc.AuditServiceStub, account: Account, session_id: str) -> list:
    """The ledger's start and end events of a voice session (fed asynchronously: polled for a while)."""
    query = audit_pb2.ListEventsRequest(
        filter=audit_pb2.EventFilter(action_prefix="voice.session", resource_id=session_id)
    )
    deadline = time.monotonic() + 30
    while len(events := audit.ListEvents(query, metadata=account.metadata).events) < 2:
        assert time.monotonic() < deadline, "the session's audit events never arrived"
        time.sleep(0.1)
    return list(events)


# --- the spoken question


@needs_speech
async def test_recorded_question_gets_transcripts_a_cited_answer_and_speech(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library, edge_channel: grpc.Channel
) -> None:
    spoken = utterance(QUESTION_AUDIO)
    stream = ConverseStream.open(voice, library.user.metadata, config())
    started = await stream.wait_for(kind_is("session_started"))
    conversation_id = started.message.session_started.conversation_id
    assert conversation_id and started.message.session_started.session_id

    await stream.send_audio(spoken.pcm, speed=1.0)  # at the pace of a live microphone
    await stream.send(V.ConverseRequest(control=V.CONTROL_ACTION_END_OF_UTTERANCE))
    final = await stream.wait_for(kind_is("transcript", turn=1, is_final=True))
    done = await stream.wait_for(kind_is("turn_completed", turn=1), within=90)
    await stream.finish()
    assert stream.error is None

    events = [m.speech_event.type for m in stream.of_kind("speech_event", 1)]
    assert events[0] == V.SPEECH_EVENT_TYPE_SPEECH_STARTED and V.SPEECH_EVENT_TYPE_SPEECH_ENDED in events
    interims = [m.transcript for m in stream.of_kind("transcript", 1) if not m.transcript.is_final]
    assert len(interims) >= 3 and all(0 <= t.stability < 1 for t in interims)
    assert len({t.text for t in interims}) == len(interims)  # each interim says something new
    errors, words = word_errors(spoken.text, final.message.transcript.text)
    assert errors / words <= 0.3
    assert 0 < final.message.transcript.confidence <= 1
    # The final transcript arrives right after the last audio, not after a silence window.
    assert final.at - stream.last_audio_sent_at < 1.5

    answer = "".join(m.answer_text.delta for m in stream.of_kind("answer_text", 1))
    assert "printing" in answer.lower()
    [cited] = stream.of_kind("citations", 1)
    assert library.document_id in {c.document_id for c in cited.citations.citations}

    audio = stream.of_kind("audio", 1)
    assert [m.audio.sequence for m in audio] == list(range(len(audio)))
    assert all(m.audio.sample_rate_hertz == 16000 and m.audio.encoding == V.AUDIO_ENCODING_LINEAR16 for m in audio)
    assert audio[0].audio.text and "[" not in audio[0].audio.text  # citation markers are not read aloud
    assert_real_speech(pcm_of(audio), 16000, min_seconds=1.0)

    completed = done.message.turn_completed
    assert not completed.cancelled and completed.message_id and completed.model_used == "extractive"
    assert completed.transcript == final.message.transcript.text
    timings = completed.timings
    assert 0 < timings.first_answer_text_ms <= timings.first_audio_ms <= timings.total_ms
    assert 0 < timings.final_transcript_ms < 1500 and 8000 < timings.utterance_ms < 11000
    # Answer audio is streamed as it is spoken (paced at real time), not delivered in one lump at the end.
    first_audio_at = next(r.at for r in stream.received if r.message.WhichOneof("response") == "audio")
    assert done.at - first_audio_at > 1.0

    # The question and the answer are stored in the caller's rag conversation.
    rag = rag_pb2_grpc.RagServiceStub(edge_channel)
    stored = rag.ListMessages(rag_pb2.ListMessagesRequest(conversation_id=conversation_id),
                              metadata=library.user.metadata).messages  # fmt: skip
    assert {m.role for m in stored} == {rag_pb2.MESSAGE_ROLE_USER, rag_pb2.MESSAGE_ROLE_ASSISTANT}
    assert completed.message_id in {m.id for m in stored}


async def test_text_turns_answer_in_an_existing_conversation_without_speech(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library, edge_channel: grpc.Channel
) -> None:
    rag = rag_pb2_grpc.RagServiceStub(edge_channel)
    conversation = rag.CreateConversation(rag_pb2.CreateConversationRequest(title="mine"),
                                          metadata=library.user.metadata).conversation  # fmt: skip
    stream = ConverseStream.open(voice, library.user.metadata,
                                 config(conversation_id=conversation.id, synthesize_speech=False))  # fmt: skip
    started = await stream.wait_for(kind_is("session_started"))
    assert started.message.session_started.conversation_id == conversation.id
    await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
    done = await stream.wait_for(kind_is("turn_completed", turn=1))
    await stream.send(V.ConverseRequest(text="And what was the earliest book printed with movable types?"))
    second = await stream.wait_for(kind_is("turn_completed", turn=2))
    await stream.finish()
    assert not stream.of_kind("audio") and not stream.of_kind("transcript")
    assert library.document_id in {c.document_id for m in stream.of_kind("citations", 1)
                                   for c in m.citations.citations}  # fmt: skip
    assert done.message.turn_completed.transcript == TEXT_QUESTION and not done.message.turn_completed.cancelled
    assert second.message.turn_completed.timings.first_audio_ms == 0

    # The session is in the audit ledger, start and end, with counts and times but none of the words.
    session_id = started.message.session_started.session_id
    events = await asyncio.to_thread(session_events, audit_pb2_grpc.AuditServiceStub(edge_channel), library.user,
                                     session_id)  # fmt: skip
    by_action = {e.action: e for e in events}
    assert set(by_action) == {"voice.session.start", "voice.session.end"}
    end = by_action["voice.session.end"]
    assert end.actor.id == library.user.user_id and end.outcome == audit_pb2.OUTCOME_SUCCESS
    assert end.metadata["turns"] == "2" and end.metadata["conversation_id"] == conversation.id
    assert int(end.metadata["duration_ms"]) > 0
    assert not any("printing" in value.lower() for e in events for value in e.metadata.values())

    # Another account cannot talk in this conversation: it does not exist for them.
    other = ConverseStream.open(voice, library.other.metadata, config(conversation_id=conversation.id))
    await other.ended()
    assert other.error is not None and other.error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(other.error) == "NOT_FOUND" and other.received == []


async def test_a_question_rag_refuses_fails_its_turn_with_rags_reason_and_the_session_goes_on(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library
) -> None:
    # Voice leaves the question's bounds to rag, whose refusal reaches the client as the turn's error.
    stream = ConverseStream.open(voice, library.user.metadata, config(synthesize_speech=False))
    await stream.wait_for(kind_is("session_started"))
    await stream.send(V.ConverseRequest(text="x" * (RAG.question_chars + 1)))
    refused = await stream.wait_for(kind_is("error", turn=1))
    await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
    answered = await stream.wait_for(kind_is("turn_completed", turn=2))
    await stream.finish()
    assert stream.error is None
    error = error_of(refused.message.error)
    assert error.status_code_name == "INVALID_ARGUMENT" and error.reason == Reason.VALIDATION_ERROR
    assert [(v.field, v.reason) for v in error.violations] == [("query", "TOO_LONG")]
    assert f"at most {RAG.question_chars} characters" in error.message
    assert answered.message.turn_completed.message_id and stream.of_kind("answer_text", 2)


async def test_a_clinical_context_rag_refuses_fails_each_turn_with_rags_field_and_the_session_goes_on(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library
) -> None:
    notes = clinical_pb2.ClinicalContext(notes="x" * (RAG.context_notes_chars + 1))
    stream = ConverseStream.open(voice, library.user.metadata, config(synthesize_speech=False, clinical_context=notes))
    await stream.wait_for(kind_is("session_started"))  # voice does not judge the context: rag does, per question
    for turn in (1, 2):
        await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
        await stream.wait_for(kind_is("turn_completed", turn=turn))
    await stream.finish()
    assert stream.error is None
    errors = [error_of(m.error) for m in stream.of_kind("error")]
    assert [m.turn for m in stream.of_kind("error")] == [1, 2]
    assert {(e.reason, e.status_code_name) for e in errors} == {(Reason.VALIDATION_ERROR, "INVALID_ARGUMENT")}
    assert {v.field for e in errors for v in e.violations} == {"clinical_context.notes"}
    assert not stream.of_kind("answer_text")


@needs_speech
async def test_speaking_over_the_answer_cancels_it_and_starts_the_next_turn(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library
) -> None:
    stream = ConverseStream.open(voice, library.user.metadata, config())
    await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
    await stream.wait_for(kind_is("audio", turn=1))  # the answer is playing
    interruption = utterance("ls_1089-134691-0000")  # "he could wait no longer"
    await stream.send_audio(interruption.pcm, speed=1.0)
    await stream.send(V.ConverseRequest(control=V.CONTROL_ACTION_END_OF_UTTERANCE))
    barge = await stream.wait_for(kind_is("speech_event", turn=1, type=V.SPEECH_EVENT_TYPE_BARGE_IN))
    cancelled = await stream.wait_for(kind_is("turn_completed", turn=1))
    await stream.wait_for(kind_is("audio", turn=2), within=90)
    stream.cancel()

    assert cancelled.message.turn_completed.cancelled
    order = [r.message for r in stream.received]
    at_barge = order.index(barge.message)
    # Not one more chunk of the interrupted answer after the barge-in event.
    assert not [m for m in order[at_barge:] if m.WhichOneof("response") == "audio" and m.turn == 1]
    assert order.index(cancelled.message) < order.index(stream.of_kind("speech_event", 2)[0])
    final = [m.transcript.text for m in stream.of_kind("transcript", 2) if m.transcript.is_final]
    assert final == ["he could wait no longer"]
    assert stream.of_kind("audio", 2)  # the new question was answered, aloud


@needs_speech
async def test_transcribe_streams_24khz_audio_utterance_by_utterance(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library
) -> None:
    first, second = utterance("ls_1089-134691-0000"), utterance("goforward")
    pcm = resample(first.pcm + bytes(32000) + second.pcm + bytes(32000), 16000, 24000)  # resampled back by the server

    async def requests() -> AsyncIterator[voice_pb2.TranscribeRequest]:
        yield V.TranscribeRequest(config=recognition(24000))
        for piece in chunks(pcm, 24000):
            yield V.TranscribeRequest(audio_content=piece)

    replies = [r async for r in voice.Transcribe(requests(), metadata=library.user.metadata)]
    finals = {r.utterance: r.transcript.text for r in replies if r.transcript.is_final}
    assert sorted(finals) == [1, 2]
    assert finals[1] == "he could wait no longer" and finals[2].startswith("go forward ten meters")
    assert any(not r.transcript.is_final and r.transcript.text for r in replies if r.HasField("transcript"))
    offsets = [r.speech_event.audio_offset_ms for r in replies if r.HasField("speech_event")]
    assert offsets == sorted(offsets) and len(offsets) == 4  # started/ended twice, in stream time


# --- refused configs and messages


BAD_CONVERSE_STARTS = {
    "audio_before_config": (V.ConverseRequest(audio_content=bytes(3200)), "config"),
    "unknown_encoding": (config(recognition=V.RecognitionConfig(encoding=7, sample_rate_hertz=16000)),
                         "config.recognition.encoding"),
    "unspecified_encoding": (config(recognition=V.RecognitionConfig(sample_rate_hertz=16000)),
                             "config.recognition.encoding"),
    "zero_sample_rate": (config(recognition=recognition(0)), "config.recognition.sample_rate_hertz"),
    "odd_sample_rate": (config(recognition=recognition(44100)), "config.recognition.sample_rate_hertz"),
    "unknown_language": (config(recognition=recognition(16000, language_code="tlh")),
                         "config.recognition.language_code"),
    "unknown_voice": (config(voice="klingon"), "config.voice"),
    "odd_output_rate": (config(output_sample_rate_hertz=11025), "config.output_sample_rate_hertz"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CONVERSE_STARTS))
async def test_bad_config_is_refused_before_any_audio(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library, case: str
) -> None:
    first, field_path = BAD_CONVERSE_STARTS[case]
    stream = ConverseStream.open(voice, library.user.metadata, first)
    await stream.ended()  # refused on the first message: the client never gets to send audio
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(stream.error) == "VALIDATION_ERROR"
    assert violated_field(stream.error) == field_path
    assert stream.received == []  # no session, no transcript: nothing was listened to


def violated_field(error: grpc.aio.AioRpcError) -> str:
    bad = error_detail(error, error_details_pb2.BadRequest)
    return bad.field_violations[0].field if bad else ""


BAD_LATER_MESSAGES = {
    "second_config": (config(), "config"),
    "oversized_chunk": (V.ConverseRequest(audio_content=bytes(32769)), "audio_content"),
    "unspecified_control": (V.ConverseRequest(control=V.CONTROL_ACTION_UNSPECIFIED), "control"),
    "empty_text": (V.ConverseRequest(text="   "), "text"),
    "empty_message": (V.ConverseRequest(), "request"),
}


@pytest.mark.parametrize("case", sorted(BAD_LATER_MESSAGES))
async def test_malformed_message_mid_stream_ends_it_with_invalid_argument(
    voice: voice_pb2_grpc.VoiceServiceStub, library: Library, case: str
) -> None:
    bad, expected = BAD_LATER_MESSAGES[case]
    stream = ConverseStream.open(voice, library.user.metadata, config())
    await stream.wait_for(kind_is("session_started"))
    await stream.send(bad)
    await stream.ended()
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_field(stream.error) == expected


async def test_voice_needs_a_valid_token(voice: voice_pb2_grpc.VoiceServiceStub) -> None:
    async def nothing() -> AsyncIterator[voice_pb2.ConverseRequest]:
        # Refused on its headers: a client that wrote meanwhile could see its own write fail instead of the status.
        await asyncio.Event().wait()
        yield V.ConverseRequest()

    call = voice.Converse(nothing(), metadata=(("authorization", "Bearer not-a-token"),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    call.cancel()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_voice_json_needs_a_token(edge_http: httpx.Client) -> None:
    assert edge_http.get("/v1/voices").status_code == 401
    assert edge_http.post("/v1/voice:synthesize", json={"text": "hello"}).status_code == 401


# --- Synthesize and ListVoices as JSON through Envoy


def test_synthesize_streams_base64_pcm_sentence_by_sentence_as_json(edge_http: httpx.Client, library: Library) -> None:
    text = "Metformin is first-line therapy [1]. Check kidney function every year. Stop it before contrast."
    reply = edge_http.post("/v1/voice:synthesize", json={"text": text, "sampleRateHertz": 24000},
                           headers=library.user.headers)  # fmt: skip
    assert reply.status_code == 200, reply.text
    chunks_ = [item["audio"] for item in reply.json()]
    assert [c.get("sequence", 0) for c in chunks_] == list(range(len(chunks_)))
    assert [c["text"] for c in chunks_ if c.get("text")] == [
        "Metformin is first-line therapy.", "Check kidney function every year.", "Stop it before contrast."
    ]  # fmt: skip
    assert {c["sampleRateHertz"] for c in chunks_} == {24000}
    assert_real_speech(b"".join(base64.b64decode(c["audioContent"]) for c in chunks_), 24000, min_seconds=3.0)

    empty = edge_http.post("/v1/voice:synthesize", json={"text": ""}, headers=library.user.headers)
    assert empty.status_code == 400 and json_reason(empty.json()) == "VALIDATION_ERROR"
    too_long = edge_http.post("/v1/voice:synthesize", json={"text": "a" * 5001}, headers=library.user.headers)
    assert too_long.status_code == 400


def test_list_voices_pages_through_every_voice_of_a_language(edge_http: httpx.Client, library: Library) -> None:
    names: list[str] = []
    token = ""
    while True:
        params = {"languageCode": "en", "pageSize": 3, **({"pageToken": token} if token else {})}
        page = edge_http.get("/v1/voices", params=params, headers=library.user.headers).json()
        names += [v["name"] for v in page["voices"]]
        assert all(v["engine"] == "espeak-ng" and v["naturalSampleRateHertz"] == 22050 for v in page["voices"])
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert "en-us" in names and "en-gb" in names and len(names) == len(set(names)) > 3
    assert all(n.startswith("en") for n in names)
    us = edge_http.get("/v1/voices", params={"languageCode": "en-US"}, headers=library.user.headers).json()
    assert [v["name"] for v in us["voices"]] == ["en-us", "en-us-nyc"]
    bad = edge_http.get("/v1/voices", params={"pageToken": "garbage"}, headers=library.user.headers)
    assert bad.status_code == 400 and json_reason(bad.json()) == "INVALID_PAGE_TOKEN"


# --- limits and vanishing clients, on a voice server of their own (short limits, metrics on)


@dataclass
class LimitedVoice:
    """A voice process with tight limits in front of the embedded system's auth and rag."""

    server: Server
    metrics_url: str


@pytest.fixture(scope="module")
def limited(embedded: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedVoice]:
    cluster = Cluster(tmp_path_factory.mktemp("voice-limits"), dict(embedded.env))
    upstream = embedded.servers[0].address
    metrics = free_port()
    server = cluster.start(
        "voice", metrics_port=metrics, AUTH_ADDR=upstream, RAG_ADDR=upstream, VOICE_RECOGNIZER_WORKERS="1",
        VOICE_IDLE_TIMEOUT_SECONDS="2", VOICE_MAX_SESSION_SECONDS="8", VOICE_MAX_SESSIONS_PER_USER="2",
    )  # fmt: skip
    try:
        yield LimitedVoice(server, f"http://127.0.0.1:{metrics}/metrics")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def one_recognizer(embedded: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A voice process with a single recognizer process (and the default session limits: a busy machine's recognizer
    restart must not run into a short session limit)."""
    cluster = Cluster(tmp_path_factory.mktemp("voice-one-recognizer"), dict(embedded.env))
    upstream = embedded.servers[0].address
    try:
        yield cluster.start("voice", AUTH_ADDR=upstream, RAG_ADDR=upstream, VOICE_RECOGNIZER_WORKERS="1")
    finally:
        cluster.stop()


def gauges(url: str) -> dict[str, float]:
    """The server's Prometheus samples, by name with labels."""
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - our own http:// metrics URL
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def session_footprint(url: str) -> tuple[float, float, float]:
    """(open Converse streams, session tasks, recognizer streams)."""
    g = gauges(url)
    return g.get('voice_sessions_active{method="Converse"}', 0), g["voice_session_tasks"], g["voice_recognizer_streams"]


@needs_speech
async def test_a_client_that_vanishes_mid_answer_leaves_nothing_behind(limited: LimitedVoice, library: Library) -> None:
    async with grpc.aio.insecure_channel(limited.server.address) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        stream = ConverseStream.open(stub, library.user.metadata, config(barge_in=False))
        await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
        await stream.wait_for(kind_is("audio", turn=1))  # an answer is being spoken ...
        await stream.send_audio(utterance(QUESTION_AUDIO).pcm[: 32 * 2000], speed=0)  # ... and the user is talking
        await stream.wait_for(kind_is("transcript", turn=2))
        busy = await asyncio.to_thread(session_footprint, limited.metrics_url)
        assert busy[0] == 1 and busy[1] >= 3 and busy[2] == 1
        stream.cancel()  # the phone loses signal
        async with asyncio.timeout(10):
            while True:
                if await asyncio.to_thread(session_footprint, limited.metrics_url) == (0, 0, 0):
                    break
                await asyncio.sleep(0.05)


async def test_idle_and_overlong_streams_are_ended(limited: LimitedVoice, library: Library) -> None:
    async with grpc.aio.insecure_channel(limited.server.address) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        idle = ConverseStream.open(stub, library.user.metadata, config(synthesize_speech=False))
        await idle.wait_for(kind_is("session_started"))
        await idle.ended(within=15)  # nothing sent: the server gives up after 2 s
        assert idle.error is not None and idle.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_reason(idle.error) == "IDLE_TIMEOUT"

        long = ConverseStream.open(stub, library.user.metadata, config(synthesize_speech=False))
        await long.send_audio(bytes(32000 * 82 // 10), speed=0)  # 8.2 s of audio in a stream allowed 8
        await long.ended()
        assert long.error is not None and long.error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_reason(long.error) == "SESSION_TOO_LONG"


async def test_one_account_holds_a_bounded_number_of_streams(limited: LimitedVoice, library: Library) -> None:
    async with grpc.aio.insecure_channel(limited.server.address) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        held = [ConverseStream.open(stub, library.other.metadata, config(synthesize_speech=False)) for _ in range(2)]
        for stream in held:
            await stream.wait_for(kind_is("session_started"))
        third = ConverseStream.open(stub, library.other.metadata, config(synthesize_speech=False))
        await third.ended()
        assert third.error is not None and third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(third.error) == "RATE_LIMITED"
        for stream in held:
            await stream.finish()
        again = ConverseStream.open(stub, library.other.metadata, config(synthesize_speech=False))
        await again.wait_for(kind_is("session_started"))
        await again.finish()


@needs_speech
def test_cli_talk_streams_a_wav_and_saves_the_answer(embedded: Cluster, library: Library, tmp_path: Path) -> None:
    assert embedded.envoy is not None
    out = tmp_path / "answer.wav"
    env = {**os.environ, **embedded.env, "VOICEASSIST_TOKEN": library.user.access_token}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "voice", "talk", str(utterance(QUESTION_AUDIO).path),
         "--address", embedded.envoy.address, "--out", str(out), "--speed", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "arts and crafts" in result.stdout and "[1]" in result.stdout
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 16000 and wav.getnframes() > 16000


# --- answers still being written: a system whose rag writes with a slow local model


@dataclass
class SlowSystem:
    """`serve all` with rag's local model at a slow stand-in endpoint, the printing document indexed."""

    server: Server
    model: SlowChatModel
    user: Account


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowSystem]:
    model = SlowChatModel()
    cluster = Cluster.create(tmp_path_factory.mktemp("voice-slow"), mesh=False,
                             RAG_LOCAL_BASE_URL=model.base_url, RAG_LOCAL_MODEL="slow")  # fmt: skip
    try:
        server = cluster.start("all")
        with grpc.insecure_channel(server.address) as channel:
            index_book(cluster, channel)
            yield SlowSystem(server, model, register_and_login(channel))
    finally:
        cluster.stop()
        model.stop()


def index_book(cluster: Cluster, channel: grpc.Channel) -> str:
    """Index the printing document as an admin of `cluster`; its id."""
    admin = create_admin(cluster, channel)
    search = search_pb2_grpc.SearchServiceStub(channel)
    meta = search_pb2.DocumentMetadata(
        title=f"Printing {uuid.uuid4().hex[:6]}", source_type="textbook", media_type="text/markdown"
    )
    doc = search.CreateDocument(search_pb2.CreateDocumentRequest(metadata=meta, text=BOOK), metadata=admin.metadata)
    final = watch(search, admin, doc.document.id)[-1]
    assert final.document.status == search_pb2.DOCUMENT_STATUS_INDEXED, final.document.error
    return doc.document.id


async def test_first_sentence_is_spoken_while_the_answer_is_still_being_written(slow: SlowSystem) -> None:
    slow.model.reset(["Printing is comparatively modern [1]. ", "It came after the other crafts [1]."], gap_seconds=3)
    async with grpc.aio.insecure_channel(slow.server.address) as channel:
        stream = ConverseStream.open(voice_pb2_grpc.VoiceServiceStub(channel), slow.user.metadata,
                                     config(barge_in=False))  # fmt: skip
        await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
        done = await stream.wait_for(kind_is("turn_completed", turn=1), within=60)
        stream.cancel()
    assert done.message.turn_completed.model_used.startswith("local")
    deltas = [r for r in stream.received if r.message.WhichOneof("response") == "answer_text"]
    first_audio = next(r for r in stream.received if r.message.WhichOneof("response") == "audio")
    assert "modern" in first_audio.message.audio.text
    assert first_audio.at < deltas[-1].at - 1.5  # spoken well before the model wrote its last words


@needs_speech
async def test_barge_in_cancels_the_answer_being_written(slow: SlowSystem) -> None:
    slow.model.reset(["Printing is comparatively modern [1]. "] + ["And there is more to say. "] * 5, gap_seconds=4)
    async with grpc.aio.insecure_channel(slow.server.address) as channel:
        stream = ConverseStream.open(voice_pb2_grpc.VoiceServiceStub(channel), slow.user.metadata, config())
        await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
        await stream.wait_for(kind_is("audio", turn=1))
        await stream.send_audio(utterance("ls_1089-134691-0000").pcm, speed=1.0)
        barge = await stream.wait_for(kind_is("speech_event", turn=1, type=V.SPEECH_EVENT_TYPE_BARGE_IN))
        done = await stream.wait_for(kind_is("turn_completed", turn=1))
        assert done.message.turn_completed.cancelled
        # The cancellation reached the model through rag: it was hung up on long before its answer was over.
        assert await asyncio.to_thread(slow.model.hung_up.wait, 10)
        assert not slow.model.finished.is_set()
        assert done.at - barge.at < 1.0
        stream.cancel()


def recognizer_pids(server: Server) -> list[int]:
    """The recognizer processes of a voice server (its children running the worker module)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(server.process.pid)], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return [int(line.split()[0]) for line in out.splitlines() if "sphinx_worker" in line]


@needs_speech
async def test_a_crashed_recognizer_costs_one_utterance_not_the_session(
    one_recognizer: Server, library: Library
) -> None:
    lost, kept = utterance(QUESTION_AUDIO), utterance("ls_1089-134691-0000")
    [pid] = recognizer_pids(one_recognizer)
    async with grpc.aio.insecure_channel(one_recognizer.address) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        stream = ConverseStream.open(stub, library.user.metadata, config(synthesize_speech=False))
        await stream.send_audio(lost.pcm[: 32 * 1500], speed=0)
        await stream.wait_for(kind_is("transcript", turn=1))  # decoding is under way ...
        os.kill(pid, signal.SIGKILL)  # ... when the recognizer process dies
        await stream.send_audio(lost.pcm[32 * 1500 : 32 * 2500] + bytes(32000), speed=0)
        problem = await stream.wait_for(kind_is("error", turn=1))
        assert problem.message.error.code == code_pb2.UNAVAILABLE
        await stream.send_audio(kept.pcm + bytes(32000), speed=0)
        final = await stream.wait_for(kind_is("transcript", is_final=True))
        assert final.message.transcript.text == "he could wait no longer"
        stream.cancel()
    [replacement] = recognizer_pids(one_recognizer)
    assert replacement != pid


@pytest.mark.mesh
async def test_converse_on_the_production_path(mesh: Cluster) -> None:
    """One process per service on PostgreSQL and Redis: voice reaches rag over the network, the token is checked
    against the Redis revocation list before the turn, the session lands in the PostgreSQL ledger."""
    assert mesh.envoy is not None
    with grpc.insecure_channel(mesh.envoy.address) as sync_channel:
        account = register_and_login(sync_channel)
        audit = audit_pb2_grpc.AuditServiceStub(sync_channel)
        async with grpc.aio.insecure_channel(mesh.envoy.address) as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)
            stream = ConverseStream.open(stub, account.metadata, config(output_sample_rate_hertz=8000))
            started = await stream.wait_for(kind_is("session_started"))
            await stream.send(V.ConverseRequest(text=TEXT_QUESTION))
            done = await stream.wait_for(kind_is("turn_completed", turn=1), within=90)
            await stream.finish()
        assert done.message.turn_completed.message_id and not done.message.turn_completed.cancelled
        audio = stream.of_kind("audio", 1)
        assert audio and {m.audio.sample_rate_hertz for m in audio} == {8000}
        events = await asyncio.to_thread(session_events, audit, account, started.message.session_started.session_id)
        assert {e.action for e in events} == {"voice.session.start", "voice.session.end"}
