"""Voice: accuracy and speed of the voice service on real recorded speech, end to end through Envoy.

- WER (upper-cased, punctuation-free words) and real-time factor of Transcribe over all 47 utterances of
  ../shared/eval/speech, sent as fast as the stream takes them (RTF = time to the last final / audio length);
- last audio chunk -> final transcript, with audio paced at real time and END_OF_UTTERANCE right after it;
- end of utterance -> first answer audio chunk in Converse (extractive generator, a document indexed for the
  questions), measured by the client from sending END_OF_UTTERANCE, and by the server (TurnTimings);
- how many concurrent real-time streams the service sustains on this machine: N streams of paced speech at once;
  a stream keeps up while its finals arrive within KEEP_UP_MS of its last chunk and no error ends it.

Needs ../shared/eval/speech; skips cleanly without it. Other helpers' work shares the two cores: the table
reports the load average around each part, so noisy numbers can be recognized.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from bench.common import RUNS, embedded_system, median, percentile, table
from tests.support.admin import create_admin
from tests.support.clients import Account, register_and_login
from tests.support.voice import (
    ConverseStream,
    Utterance,
    chunks,
    kind_is,
    recognition,
    utterances,
    word_errors,
)
from voiceassist.search.v1 import search_pb2, search_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

V = voice_pb2
LATENCY_PARALLEL = 4  # paced streams at once while measuring final-transcript latency
FIRST_AUDIO_QUESTIONS = 8  # spoken questions for the first-audio latency
CONCURRENCY_LEVELS = (1, 2, 4, 8, 10, 12, 16)
STREAM_SECONDS = 15.0  # paced speech per stream in the concurrency test
KEEP_UP_MS = 1000.0  # a final later than this after the last chunk means the stream fell behind


def book(corpus: list[Utterance]) -> str:
    """A document the spoken questions are about: William Morris's essay on printing, whose sentences the LJSpeech
    utterances read."""
    return "# Printing\n\n" + " ".join(u.text for u in corpus if u.id.startswith("lj_"))


def load() -> str:
    """The 1-minute load average, for the noise column."""
    return f"{os.getloadavg()[0]:.2f}"


async def transcribe(stub, metadata, pcm: bytes, speed: float) -> tuple[str, float, float, float]:
    """Stream `pcm` through Transcribe, then END_OF_UTTERANCE. Returns (joined finals, seconds from the first
    message to the end, last chunk sent -> last final in ms, lag in ms: last final after the moment the last chunk
    was due at `speed`, which also counts a stream the server slowed down by not reading)."""
    pieces = chunks(pcm)
    state = {"last_chunk": 0.0, "due": 0.0}

    async def requests() -> AsyncIterator[voice_pb2.TranscribeRequest]:
        yield V.TranscribeRequest(config=recognition(16000, interim=True))
        started = time.perf_counter()
        state["due"] = started + (len(pieces) - 1) * 0.1 / speed if speed else started
        for n, piece in enumerate(pieces):
            if speed:
                await asyncio.sleep(max(0.0, started + n * 0.1 / speed - time.perf_counter()))
            yield V.TranscribeRequest(audio_content=piece)
            state["last_chunk"] = time.perf_counter()
        yield V.TranscribeRequest(control=V.CONTROL_ACTION_END_OF_UTTERANCE)

    finals, last_final = [], 0.0
    started = time.perf_counter()
    async for reply in stub.Transcribe(requests(), metadata=metadata):
        if reply.transcript.is_final:
            finals.append(reply.transcript.text)
            last_final = time.perf_counter()
    ended = time.perf_counter()
    last_final = last_final or ended
    latency = (last_final - state["last_chunk"]) * 1000
    return " ".join(finals), ended - started, latency, (last_final - state["due"]) * 1000


async def accuracy(stub, metadata, corpus: list[Utterance]) -> tuple[float, float]:
    """WER and RTF over the corpus, utterance after utterance at full speed."""
    errors = words = 0
    seconds = audio = 0.0
    for item in corpus:
        text, took, _, _ = await transcribe(stub, metadata, item.pcm, speed=0)
        e, n = word_errors(item.text, text)
        errors, words = errors + e, words + n
        seconds, audio = seconds + took, audio + item.duration_s
    return errors / words, seconds / audio


async def final_latency(stub, metadata, corpus: list[Utterance]) -> list[float]:
    """Last chunk -> final transcript (ms) for every utterance, paced at real time, a few streams at once."""
    slots = asyncio.Semaphore(LATENCY_PARALLEL)
    found: list[float] = []

    async def one(item: Utterance) -> None:
        async with slots:
            _, _, latency, _ = await transcribe(stub, metadata, item.pcm, speed=1.0)
            found.append(latency)

    await asyncio.gather(*(one(u) for u in corpus))
    return found


def index_book(address: str, admin: Account, text: str) -> None:
    with grpc.insecure_channel(address) as channel:
        search = search_pb2_grpc.SearchServiceStub(channel)
        meta = search_pb2.DocumentMetadata(
            title=f"Printing {uuid.uuid4().hex[:6]}", source_type="textbook", media_type="text/markdown"
        )
        doc = search.CreateDocument(search_pb2.CreateDocumentRequest(metadata=meta, text=text), metadata=admin.metadata)
        updates = list(
            search.WatchDocument(
                search_pb2.WatchDocumentRequest(document_id=doc.document.id), metadata=admin.metadata, timeout=300
            )
        )
        if updates[-1].document.status != search_pb2.DOCUMENT_STATUS_INDEXED:
            raise RuntimeError(f"the benchmark document was not indexed: {updates[-1].document.error}")


async def first_audio(stub, metadata, questions: list[Utterance]) -> tuple[list[float], list[float], int]:
    """Per spoken question: (client ms from END_OF_UTTERANCE to the first audio, server first_audio_ms, cited)."""
    client_ms, server_ms, cited = [], [], 0
    for question in questions:
        config = V.ConverseConfig(
            recognition=recognition(16000, interim=True),
            synthesize_speech=True,
            barge_in=False,
            output_sample_rate_hertz=16000,
        )
        stream = ConverseStream.open(stub, metadata, V.ConverseRequest(config=config))
        await stream.wait_for(kind_is("session_started"))
        await stream.send_audio(question.pcm, speed=1.0)
        await stream.send(V.ConverseRequest(control=V.CONTROL_ACTION_END_OF_UTTERANCE))
        end_sent = time.perf_counter()
        audio = await stream.wait_for(kind_is("audio", turn=1), within=60)
        done = await stream.wait_for(kind_is("turn_completed", turn=1), within=120)
        stream.cancel()
        client_ms.append((audio.at - end_sent) * 1000)
        server_ms.append(done.message.turn_completed.timings.first_audio_ms)
        cited += bool(stream.of_kind("citations", 1) and stream.of_kind("citations", 1)[0].citations.citations)
    return client_ms, server_ms, cited


async def concurrency(
    stub, speakers: list[Account], corpus: list[Utterance]
) -> list[tuple[int, float, float, int, bool]]:
    """Per level: (streams, p50 and max lag in ms, errors, kept up). A stream's lag is how long after its last
    chunk was due its last final arrived. Each stream is another account (one account may hold only a few)."""
    speech = b"".join(u.pcm + bytes(16000) for u in corpus)  # utterances with half a second of silence between
    size = int(STREAM_SECONDS * 32000)
    rows = []
    for level in CONCURRENCY_LEVELS:
        offsets = [i * len(speech) // level for i in range(level)]  # every stream says something different
        clips = [(speech + speech)[o : o + size] for o in offsets]
        streams = (transcribe(stub, speakers[i].metadata, clip, speed=1.0) for i, clip in enumerate(clips))
        results = await asyncio.gather(*streams, return_exceptions=True)
        errors = sum(isinstance(r, BaseException) for r in results)
        lags = [r[3] for r in results if not isinstance(r, BaseException)]
        worst = max(lags) if lags else float("inf")
        kept_up = errors == 0 and worst <= KEEP_UP_MS
        rows.append((level, statistics.median(lags) if lags else float("inf"), worst, errors, kept_up))
        if not kept_up and level >= 8:
            break
    return rows


def main() -> None:
    corpus = utterances()
    if not corpus:
        print("\nvoice: ../shared/eval/speech is absent; skipped")
        return
    with embedded_system() as system:
        assert system.envoy is not None
        server = system.servers[0]
        with grpc.insecure_channel(server.address) as channel:
            speakers = [register_and_login(channel) for _ in range(max(CONCURRENCY_LEVELS))]
            admin = create_admin(system, channel)
        index_book(server.address, admin, book(corpus))
        asyncio.run(run(system.envoy.address, speakers, corpus))


async def run(address: str, speakers: list[Account], corpus: list[Utterance]) -> None:
    rows: list[tuple[str, str]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        metadata = speakers[0].metadata

        before = load()
        wers, rtfs = [], []
        for _ in range(RUNS):
            wer, rtf = await accuracy(stub, metadata, corpus)
            wers.append(wer)
            rtfs.append(rtf)
        rows.append(
            (
                f"WER, {len(corpus)} utterances, {sum(u.duration_s for u in corpus):.0f} s (target <= 0.30)",
                f"{median(wers):.3f}",
            )
        )
        rows.append(
            (
                f"real-time factor, full speed through Envoy (median of {RUNS}; runs)",
                f"{median(rtfs):.3f} ({', '.join(f'{r:.3f}' for r in rtfs)})",
            )
        )
        rows.append(("  load average before / after", f"{before} / {load()}"))

        before = load()
        finals = await final_latency(stub, metadata, corpus)
        rows.append(
            (
                f"last chunk -> final p50 / p95, real-time pace, {LATENCY_PARALLEL} streams (target p50 <= 250)",
                f"{median(finals):.0f} / {percentile(finals, 95):.0f} ms ({len(finals)} utterances)",
            )
        )
        rows.append(("  load average before / after", f"{before} / {load()}"))

        before = load()
        questions = sorted((u for u in corpus if u.id.startswith("lj_")), key=lambda u: u.duration_s)
        client_ms, server_ms, cited = await first_audio(stub, metadata, questions[:FIRST_AUDIO_QUESTIONS])
        rows.append(
            (
                "end of utterance -> first answer audio p50 / p95, client (target p50 <= 800)",
                f"{median(client_ms):.0f} / {percentile(client_ms, 95):.0f} ms",
            )
        )
        rows.append(
            (
                "  same, server TurnTimings.first_audio_ms p50 / p95",
                f"{median(server_ms):.0f} / {percentile(server_ms, 95):.0f} ms",
            )
        )
        rows.append(("  spoken questions answered with citations of the essay", f"{cited} of {len(client_ms)}"))
        rows.append(("  load average before / after", f"{before} / {load()}"))

        before = load()
        levels = await concurrency(stub, speakers, corpus)
        for level, p50, worst, errors, kept_up in levels:
            verdict = "keeps up" if kept_up else "falls behind"
            rows.append(
                (
                    f"{level:>2} real-time streams: lag of the last final p50 / max",
                    f"{p50:.0f} / {worst:.0f} ms, {errors} errors, {verdict}",
                )
            )
        sustained = max((lv for lv, *_, ok in levels if ok), default=0)
        rows.append(
            (f"concurrent real-time streams sustained (target >= 8; final within {KEEP_UP_MS:.0f} ms)", str(sustained))
        )
        rows.append(("  load average before / after", f"{before} / {load()}"))
    table("voice (embedded mode through Envoy, 2 cores shared with other work; pocketsphinx in 2 processes)", rows)


if __name__ == "__main__":
    main()
