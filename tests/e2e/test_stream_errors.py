"""Every server-streaming RPC ends the same way on an error after its first message: a last message whose `error`
is the google.rpc.Status, then the call's status is that same error. gRPC clients see both; JSON clients behind
Envoy, who cannot see trailers, see the last element of the JSON array (NDJSON for ExportEvents).

Each RPC fails for a real reason: a document deleted while it is watched, a model that drops the connection
mid-answer, a damaged ledger row, a speech engine that cannot speak one sentence, a voice stream left idle.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from services.core.status import status_of
from tests.e2e.test_audit import damaged_second_event
from tests.e2e.test_search import watch
from tests.support.admin import create_admin
from tests.support.clients import Account, error_reason, json_reason, register_and_login
from tests.support.fake_llm import Behaviour, FakeChatModel
from tests.support.mesh import Cluster, Envoy
from tests.support.voice import chunks, recognition
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2, search_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

# A topic no other test's corpus or question touches, so this document changes no other test's answers.
BOOK = (
    "# Exertional heat stroke\n\nExertional heat stroke is treated by cooling at once: cold water immersion lowers "
    "the core temperature fastest, and cooling comes before transport to hospital."
)
QUESTION = "How is exertional heat stroke treated?"
UNSPEAKABLE = "unspeakable"
# espeak-ng, except that a sentence with UNSPEAKABLE in it fails as a broken engine would (exit 1, no audio).
ESPEAK = """#!/bin/sh
[ "$1" = "--voices" ] && exec {espeak} "$@"
text=$(cat)
case "$text" in *{word}*) echo "cannot speak this sentence" >&2; exit 1;; esac
printf '%s' "$text" | {espeak} "$@"
"""


@dataclass
class System:
    """rag (fake cloud model), search (no indexing workers: documents stay PENDING) and voice (failing engine, 2 s
    idle timeout) processes of their own behind their own Envoy, with the embedded system's auth and audit."""

    envoy: Envoy
    model: FakeChatModel
    user: Account
    admin: Account


@pytest.fixture(scope="module")
def system(embedded: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    workdir: Path = tmp_path_factory.mktemp("stream-errors")
    espeak = workdir / "espeak-ng"
    espeak.write_text(ESPEAK.format(espeak=shutil.which("espeak-ng"), word=UNSPEAKABLE))
    espeak.chmod(0o755)
    model = FakeChatModel("cloud").start()
    cluster = Cluster.create(workdir, mesh=False, DATA_DIR=str(workdir / "data"))
    shared = embedded.servers[0]
    for name in ("auth", "audit", "search", "rag"):
        cluster.point_at(name, shared)  # rag reads the shared, indexed knowledge base; voice opens shared conversations
    try:
        with grpc.insecure_channel(shared.address) as channel:
            admin, user = create_admin(embedded, channel), register_and_login(channel)
            search = search_pb2_grpc.SearchServiceStub(channel)
            meta = search_pb2.DocumentMetadata(title=f"Heat stroke {uuid.uuid4().hex[:6]}", source_type="guideline",
                                               media_type="text/markdown")  # fmt: skip
            made = search.CreateDocument(search_pb2.CreateDocumentRequest(metadata=meta, text=BOOK),
                                         metadata=admin.metadata)  # fmt: skip
            assert watch(search, admin, made.document.id)[-1].document.status == search_pb2.DOCUMENT_STATUS_INDEXED
        rag = cluster.start(
            "rag", RAG_CLOUD_BASE_URL=model.base_url, RAG_CLOUD_MODEL="cloud", RAG_MODEL_RETRIES="0",
            RAG_BREAKER_FAILURE_THRESHOLD="100",
        )  # fmt: skip
        search_server = cluster.start("search", SEARCH_INDEX_WORKERS="0")
        voice = cluster.start(
            "voice", VOICE_ESPEAK_BINARY=str(espeak), VOICE_IDLE_TIMEOUT_SECONDS="2", VOICE_RECOGNIZER_WORKERS="1"
        )
        envoy = cluster.start_envoy(
            {"auth": shared, "audit": shared, "search": search_server, "rag": rag, "voice": voice}
        )
        yield System(envoy, model, user, admin)
    finally:
        cluster.stop()
        model.stop()


@pytest.fixture
def channel(system: System) -> Iterator[grpc.Channel]:
    """gRPC through the system's Envoy."""
    with grpc.insecure_channel(system.envoy.address) as channel:
        yield channel


@pytest.fixture
def http(system: System) -> Iterator[httpx.Client]:
    """JSON through the system's Envoy."""
    with httpx.Client(base_url=system.envoy.http, timeout=60) as client:
        yield client


def until_error(call: Iterable) -> tuple[list, grpc.RpcError]:
    """Every message of a gRPC stream and the error that ended it (AssertionError when it ended OK)."""
    messages = []
    try:
        for message in call:
            messages.append(message)
    except grpc.RpcError as error:
        return messages, error
    raise AssertionError(f"the stream ended OK after {len(messages)} messages")


def assert_grpc_ending(messages: list, error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    """Messages came before the error; the last one carries only the error, which is the call's status too."""
    assert len(messages) >= 2, messages
    assert not any(m.HasField("error") for m in messages[:-1])
    last = messages[-1]
    assert [field.name for field, _ in last.ListFields()] == ["error"], last
    assert error.code() == code and error_reason(error) == reason, (error.code(), error.details())
    assert last.error == status_of(error)  # code, message, ErrorInfo (reason, domain, metadata): the same


def assert_json_ending(elements: list[dict], code: grpc.StatusCode, reason: str) -> dict:
    """The last element of a JSON stream is the error, and only that; the elements before it are not."""
    assert len(elements) >= 2, elements
    assert not any("error" in e for e in elements[:-1])
    assert [key for key, value in elements[-1].items() if value] == ["error"], elements[-1]  # zeros are printed
    error = elements[-1]["error"]
    assert error["code"] == code.value[0] and json_reason(error) == reason, error
    return error


# --- rag StreamAsk: the model drops the connection after two pieces


def test_stream_ask_ends_with_the_models_failure(system: System, channel: grpc.Channel, http: httpx.Client) -> None:
    rag = rag_pb2_grpc.RagServiceStub(channel)
    user = system.user

    def ask(key: str) -> rag_pb2.StreamAskRequest:
        made = rag.CreateConversation(rag_pb2.CreateConversationRequest(), metadata=user.metadata).conversation
        return rag_pb2.StreamAskRequest(conversation_id=made.id, query=QUESTION, client_message_id=key)

    system.model.reset(Behaviour(break_after=2))
    messages, error = until_error(rag.StreamAsk(ask(uuid.uuid4().hex), metadata=user.metadata, timeout=60))
    assert [m.delta for m in messages[:-1]] == system.model.behaviour.pieces[:2]
    assert_grpc_ending(messages, error, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")

    request = ask(uuid.uuid4().hex)
    url = f"/v1/conversations/{request.conversation_id}:streamAsk"
    reply = http.post(url, json={"query": QUESTION, "clientMessageId": request.client_message_id}, headers=user.headers)
    assert reply.status_code == 200, reply.text  # the answer had begun
    assert_json_ending(reply.json(), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")


# --- search WatchDocument: the watched document is deleted (nothing indexes it, so it stays PENDING)


def _pending_document(search: search_pb2_grpc.SearchServiceStub, admin: Account) -> str:
    meta = search_pb2.DocumentMetadata(title="Never indexed", media_type="text/plain")
    request = search_pb2.CreateDocumentRequest(metadata=meta, text=f"Soon deleted. {uuid.uuid4().hex}")
    return search.CreateDocument(request, metadata=admin.metadata).document.id


def test_watch_document_ends_with_not_found_when_the_document_is_deleted(
    system: System, channel: grpc.Channel, http: httpx.Client
) -> None:
    search, admin = search_pb2_grpc.SearchServiceStub(channel), system.admin
    document_id = _pending_document(search, admin)
    call = search.WatchDocument(search_pb2.WatchDocumentRequest(document_id=document_id), metadata=admin.metadata,
                                timeout=60)  # fmt: skip
    first = next(call)
    assert first.document.status == search_pb2.DOCUMENT_STATUS_PENDING
    search.DeleteDocument(search_pb2.DeleteDocumentRequest(document_id=document_id), metadata=admin.metadata)
    messages, error = until_error(call)
    assert_grpc_ending([first, *messages], error, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")

    document_id = _pending_document(search, admin)
    with http.stream("GET", f"/v1/documents/{document_id}:watch", headers=admin.headers) as reply:
        assert reply.status_code == 200
        pieces = reply.iter_text()
        body = next(pieces)  # the current state, sent at once
        search.DeleteDocument(search_pb2.DeleteDocumentRequest(document_id=document_id), metadata=admin.metadata)
        body += "".join(pieces)
    elements = json.loads(body)
    assert elements[0]["document"]["status"] == "DOCUMENT_STATUS_PENDING"
    error = assert_json_ending(elements, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert document_id in error["message"]


# --- voice Synthesize: the engine fails on the second sentence


def test_synthesize_ends_with_the_engines_failure(system: System, channel: grpc.Channel, http: httpx.Client) -> None:
    voice, user = voice_pb2_grpc.VoiceServiceStub(channel), system.user
    text = f"Beta blockers slow the heart. This sentence is {UNSPEAKABLE}."
    call = voice.Synthesize(voice_pb2.SynthesizeRequest(text=text), metadata=user.metadata, timeout=60)
    messages, error = until_error(call)
    assert all(m.audio.audio_content for m in messages[:-1])
    assert_grpc_ending(messages, error, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")

    reply = http.post("/v1/voice:synthesize", json={"text": text}, headers=user.headers)
    assert reply.status_code == 200, reply.text
    assert_json_ending(reply.json(), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")


# --- voice Converse and Transcribe (gRPC only): the client goes quiet, the server gives up after 2 s


def held_open(first: Iterable, release: threading.Event) -> Iterator:
    """`first`, then nothing until `release`: a client that keeps its side of the stream open and says no more."""
    yield from first
    release.wait(30)


def test_converse_ends_with_idle_timeout(system: System, channel: grpc.Channel) -> None:
    voice, release = voice_pb2_grpc.VoiceServiceStub(channel), threading.Event()
    config = voice_pb2.ConverseConfig(recognition=recognition(16000))
    requests = held_open([voice_pb2.ConverseRequest(config=config)], release)
    try:
        messages, error = until_error(voice.Converse(requests, metadata=system.user.metadata, timeout=60))
    finally:
        release.set()
    assert messages[0].HasField("session_started")
    assert_grpc_ending(messages, error, grpc.StatusCode.DEADLINE_EXCEEDED, "IDLE_TIMEOUT")


def test_transcribe_ends_with_idle_timeout_after_the_speech_it_heard(system: System, channel: grpc.Channel) -> None:
    voice, release = voice_pb2_grpc.VoiceServiceStub(channel), threading.Event()
    speak = voice_pb2.SynthesizeRequest(text="Beta blockers slow the heart.", sample_rate_hertz=16000)
    spoken = voice.Synthesize(speak, metadata=system.user.metadata, timeout=60)
    pcm = b"".join(m.audio.audio_content for m in spoken) + bytes(16000 * 2)  # then a second of silence
    first = [voice_pb2.TranscribeRequest(config=recognition(16000))]
    first += [voice_pb2.TranscribeRequest(audio_content=piece) for piece in chunks(pcm)]
    try:
        call = voice.Transcribe(held_open(first, release), metadata=system.user.metadata, timeout=60)
        messages, error = until_error(call)
    finally:
        release.set()
    assert any(m.HasField("speech_event") for m in messages[:-1])
    assert_grpc_ending(messages, error, grpc.StatusCode.DEADLINE_EXCEEDED, "IDLE_TIMEOUT")


# --- audit ExportEvents: a damaged ledger row (the shared mesh, on PostgreSQL)


def test_export_events_ends_with_ledger_damaged(mesh: Cluster, mesh_http: httpx.Client) -> None:
    assert mesh.envoy is not None
    with damaged_second_event(mesh, mesh_http) as (account, first, _), grpc.insecure_channel(mesh.envoy.address) as ch:
        call = audit_pb2_grpc.AuditServiceStub(ch).ExportEvents(
            audit_pb2.ExportEventsRequest(), metadata=account.metadata, timeout=30
        )
        messages, error = until_error(call)
        assert messages[0].event.event_id == first["eventId"]
        assert_grpc_ending(messages, error, grpc.StatusCode.DATA_LOSS, "LEDGER_DAMAGED")

        with mesh_http.stream("GET", "/v1/audit/events:export", headers=account.headers) as reply:
            assert reply.status_code == 200
            lines = [json.loads(line) for line in reply.iter_lines() if line]
        assert_json_ending(lines, grpc.StatusCode.DATA_LOSS, "LEDGER_DAMAGED")
