"""Voice clients for tests and benchmarks: recorded speech from ../shared/eval/speech, a Converse stream driven
from a test (requests from a queue, every response recorded), word error rate, and a slow streaming chat model
(the stand-in for a local model) to watch answers that are still being written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import socket
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc

from services.core.settings import ROOT
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

V = voice_pb2
SPEECH = Path(os.environ.get("VOICEASSIST_EVAL_SPEECH", ROOT.parent / "shared" / "eval" / "speech"))
CHUNK_MS = 100


@dataclass(frozen=True)
class Utterance:
    """One recorded utterance and its reference transcript."""

    id: str
    path: Path
    text: str
    duration_s: float

    @property
    def pcm(self) -> bytes:
        """Its 16 kHz 16-bit mono samples."""
        with wave.open(str(self.path)) as wav:
            return wav.readframes(wav.getnframes())


def utterances() -> list[Utterance]:
    """Every utterance of the evaluation set (empty when ../shared/eval/speech is absent)."""
    manifest = SPEECH / "manifest.jsonl"
    if not manifest.exists():
        return []
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [Utterance(r["id"], SPEECH / r["audio"], r["text"], r["duration_s"]) for r in rows]


def utterance(utterance_id: str) -> Utterance:
    """One utterance by id."""
    return next(u for u in utterances() if u.id == utterance_id)


def normalized_words(text: str) -> list[str]:
    """Upper-cased words without punctuation (the scoring convention of ../shared/eval)."""
    return re.sub(r"[^A-Z0-9' ]", " ", text.upper().replace("-", " ")).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length)."""
    ref, hyp = normalized_words(reference), normalized_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        previous, row[0] = row[:], i
        for j in range(1, len(hyp) + 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref[i - 1] != hyp[j - 1]))
    return row[-1], len(ref)


def recognition(rate: int = 16000, interim: bool = True, **fields) -> voice_pb2.RecognitionConfig:
    """A LINEAR16 recognition config."""
    return V.RecognitionConfig(encoding=V.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate, interim_results=interim,
                               **fields)  # fmt: skip


def chunks(pcm: bytes, rate: int = 16000, ms: int = CHUNK_MS) -> list[bytes]:
    """`pcm` cut into `ms` pieces."""
    step = rate * ms // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


@dataclass
class Received:
    """A response and when it arrived (time.perf_counter)."""

    at: float
    message: voice_pb2.ConverseResponse


@dataclass
class ConverseStream:
    """A Converse call driven from a test: requests go in through `send`, every response is kept with its time."""

    call: grpc.aio.StreamStreamCall
    outgoing: asyncio.Queue
    received: list[Received] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None
    last_audio_sent_at: float = 0.0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task | None = None

    @classmethod
    def open(cls, stub: voice_pb2_grpc.VoiceServiceStub, metadata, first: voice_pb2.ConverseRequest) -> ConverseStream:
        """Start the call with `first` (usually the config)."""
        outgoing: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[voice_pb2.ConverseRequest]:
            yield first
            while (item := await outgoing.get()) is not None:
                yield item

        stream = cls(stub.Converse(requests(), metadata=metadata), outgoing)
        stream._reader = asyncio.create_task(stream._read())
        return stream

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.received.append(Received(time.perf_counter(), message))
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def send(self, request: voice_pb2.ConverseRequest) -> None:
        """Queue one request."""
        await self.outgoing.put(request)

    async def send_audio(self, pcm: bytes, rate: int = 16000, speed: float = 1.0) -> None:
        """Send audio in 100 ms chunks at `speed` times real time (0: all at once)."""
        started = time.perf_counter()
        for n, piece in enumerate(chunks(pcm, rate)):
            if speed > 0:
                await asyncio.sleep(max(0.0, started + n * CHUNK_MS / 1000 / speed - time.perf_counter()))
            await self.send(V.ConverseRequest(audio_content=piece))
            self.last_audio_sent_at = time.perf_counter()

    async def wait_for(self, matches: Callable[[voice_pb2.ConverseResponse], bool], within: float = 60) -> Received:
        """The first response that `matches`, waiting for it; AssertionError when the stream ends without one."""
        async with asyncio.timeout(within):
            seen = 0
            while True:
                for item in self.received[seen:]:
                    if matches(item.message):
                        return item
                seen = len(self.received)
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"stream ended ({self.error and self.error.code()}) without the response")
                self._changed.clear()
                await self._changed.wait()

    async def finish(self, within: float = 60) -> None:
        """Half-close and wait until the server ends the stream."""
        await self.outgoing.put(None)
        await self.ended(within)

    async def ended(self, within: float = 60) -> None:
        """Wait until the server ends the stream (then stop the request side too)."""
        assert self._reader is not None
        async with asyncio.timeout(within):
            await self._reader
        self.outgoing.put_nowait(None)

    def cancel(self) -> None:
        """Drop the call, as a client that disappears."""
        self.call.cancel()

    def of_kind(self, kind: str, turn: int | None = None) -> list[voice_pb2.ConverseResponse]:
        """Every response carrying `kind` (in `turn`, when given)."""
        return [
            r.message
            for r in self.received
            if r.message.WhichOneof("response") == kind and (turn is None or r.message.turn == turn)
        ]


def kind_is(kind: str, turn: int | None = None, **checks) -> Callable[[voice_pb2.ConverseResponse], bool]:
    """A `wait_for` matcher: the response carries `kind` (in `turn`), and `getattr(payload, k) == v` for `checks`."""

    def matches(message: voice_pb2.ConverseResponse) -> bool:
        if message.WhichOneof("response") != kind or (turn is not None and message.turn != turn):
            return False
        payload = getattr(message, kind)
        return all(getattr(payload, k) == v for k, v in checks.items())

    return matches


class SlowChatModel:
    """An OpenAI-compatible streaming chat endpoint that answers slowly, standing in for a local model: it sends
    `pieces` with `gap_seconds` between them, and notes whether its client hung up before the end (as rag does when
    its caller cancels the answer)."""

    def __init__(self) -> None:
        self.pieces: list[str] = ["Printing is comparatively modern [1]."]
        self.gap_seconds = 0.0
        self.hung_up = threading.Event()
        self.finished = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        """What RAG_LOCAL_BASE_URL should be."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reset(self, pieces: list[str], gap_seconds: float) -> None:
        """How to answer next."""
        self.pieces, self.gap_seconds = pieces, gap_seconds
        self.hung_up.clear()
        self.finished.clear()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _peer_gone(self, seconds: float) -> bool:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    if select.select([self.connection], [], [], 0.05)[0]:
                        try:
                            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                                return True
                        except OSError:
                            return True
                return False

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for n, piece in enumerate(model.pieces):
                    if n and self._peer_gone(model.gap_seconds):
                        model.hung_up.set()
                        return
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                model.finished.set()

        return Handler
