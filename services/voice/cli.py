"""`voiceassist voice ...`: talk to the voice service from a terminal, through Envoy (or any gRPC address).

Signing in: --token / --email and the token cache, as for every client (services/core/cli_login.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from services.core.cli_login import Metadata, SignIn, sign_in_options
from services.voice.audio import INPUT_RATES, OUTPUT_RATES, SAMPLE_WIDTH, read_wav, resample, wav_bytes
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

CHUNK_MS = 100
T = TypeVar("T")
V = voice_pb2


def load_wav(path: Path) -> tuple[bytes, int]:
    """16-bit mono PCM of a WAV file at a rate the service takes (other rates are converted here)."""
    try:
        pcm, rate = read_wav(path.read_bytes())
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    if rate not in INPUT_RATES:
        pcm, rate = resample(pcm, rate, 16000), 16000
    return pcm, rate


async def paced_audio(pcm: bytes, rate: int, speed: float) -> AsyncIterator[bytes]:
    """The audio in 100 ms chunks, sent at `speed` times real time (0: as fast as the stream takes them)."""
    step = rate * CHUNK_MS // 1000 * SAMPLE_WIDTH
    started = time.perf_counter()
    for n, start in enumerate(range(0, len(pcm), step)):
        if speed > 0:
            due = started + n * CHUNK_MS / 1000 / speed
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        yield pcm[start : start + step]


@asynccontextmanager
async def connect(sign_in: SignIn) -> AsyncIterator[tuple[voice_pb2_grpc.VoiceServiceStub, Metadata]]:
    """A VoiceService stub at the sign-in's address and the metadata that authenticates its calls."""
    metadata = await asyncio.to_thread(sign_in.metadata)  # may sign in (a blocking call, or a password prompt)
    async with sign_in.aio_channel() as channel:
        yield voice_pb2_grpc.VoiceServiceStub(channel), metadata


def _execute(run: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None


def _show_transcript(transcript: voice_pb2.Transcript, prefix: str) -> None:
    if transcript.is_final:
        click.echo(f"\r{prefix}{transcript.text}  (confidence {transcript.confidence:.2f})" + " " * 10)
    else:
        click.echo(f"\r{prefix}{transcript.text} ...", nl=False)


@click.group()
def voice() -> None:
    """Speak with the assistant: conversations, transcription, speech synthesis."""


@voice.command("talk")
@click.argument("wav_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@sign_in_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("answer.wav"), show_default=True,
              help="Where to write the answer audio.")  # fmt: skip
@click.option("--voice", "voice_name", default="", help="Voice to answer with (see `voiceassist voice voices`).")
@click.option("--output-rate", type=click.Choice([str(r) for r in OUTPUT_RATES]), default="16000", show_default=True)
@click.option("--conversation", default="", help="Ask in this conversation (default: a new one).")
@click.option("--speed", default=1.0, show_default=True, help="Audio sent at this multiple of real time (0: at once).")
def talk_command(wav_file: Path, sign_in: SignIn, out: Path, voice_name: str, output_rate: str, conversation: str,
                 speed: float) -> None:  # fmt: skip
    """Stream WAV_FILE as a spoken question; print transcripts and the answer; save the answer's audio."""
    pcm, rate = load_wav(wav_file)
    config = V.ConverseConfig(
        recognition=V.RecognitionConfig(encoding=V.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate,
                                        interim_results=True),
        conversation_id=conversation, voice=voice_name, synthesize_speech=True, barge_in=False,
        output_sample_rate_hertz=int(output_rate),
    )  # fmt: skip

    async def requests() -> AsyncIterator[voice_pb2.ConverseRequest]:
        yield V.ConverseRequest(config=config)
        async for chunk in paced_audio(pcm, rate, speed):
            yield V.ConverseRequest(audio_content=chunk)
        yield V.ConverseRequest(control=V.CONTROL_ACTION_END_OF_UTTERANCE)

    async def run() -> tuple[bytes, int]:
        audio = bytearray()
        audio_rate = int(output_rate)
        async with connect(sign_in) as (stub, metadata):
            call = stub.Converse(requests(), metadata=metadata)
            async for reply in call:
                kind = reply.WhichOneof("response")
                if kind == "session_started":
                    click.echo(f"conversation {reply.session_started.conversation_id}")
                elif kind == "transcript":
                    _show_transcript(reply.transcript, "you: ")
                elif kind == "answer_text":
                    click.echo(reply.answer_text.delta, nl=False)
                elif kind == "citations":
                    click.echo("")
                    for c in reply.citations.citations:
                        page = f", page {c.page}" if c.page else ""
                        click.echo(f"  [{c.index}] {c.title}{page}")
                elif kind == "audio":
                    audio += reply.audio.audio_content
                    audio_rate = reply.audio.sample_rate_hertz
                elif kind == "error":
                    click.echo(f"\nerror: {reply.error.message}", err=True)
                elif kind == "turn_completed":
                    t = reply.turn_completed.timings
                    click.echo(f"turn done: final transcript {t.final_transcript_ms:.0f} ms after the last audio, "
                               f"first answer audio {t.first_audio_ms:.0f} ms after the end of speech")  # fmt: skip
                    call.cancel()  # one question per run
                    break
        return bytes(audio), audio_rate

    audio, audio_rate = _execute(run)
    out.write_bytes(wav_bytes(audio, audio_rate))
    click.echo(f"answer audio: {len(audio) / SAMPLE_WIDTH / audio_rate:.1f} s written to {out}")


@voice.command("transcribe")
@click.argument("wav_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@sign_in_options
@click.option("--speed", default=1.0, show_default=True, help="Audio sent at this multiple of real time (0: at once).")
def transcribe_command(wav_file: Path, sign_in: SignIn, speed: float) -> None:
    """Stream WAV_FILE and print what was said, utterance by utterance."""
    pcm, rate = load_wav(wav_file)
    config = V.RecognitionConfig(encoding=V.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate, interim_results=True)

    async def requests() -> AsyncIterator[voice_pb2.TranscribeRequest]:
        yield V.TranscribeRequest(config=config)
        async for chunk in paced_audio(pcm, rate, speed):
            yield V.TranscribeRequest(audio_content=chunk)

    async def run() -> None:
        async with connect(sign_in) as (stub, metadata):
            async for reply in stub.Transcribe(requests(), metadata=metadata):
                if reply.WhichOneof("response") == "transcript":
                    _show_transcript(reply.transcript, f"[{reply.utterance}] ")
                elif reply.WhichOneof("response") == "error":
                    click.echo(f"\nerror: {reply.error.message}", err=True)

    _execute(run)


@voice.command("say")
@click.argument("text")
@sign_in_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("speech.wav"), show_default=True)
@click.option("--voice", "voice_name", default="", help="Voice (see `voiceassist voice voices`).")
def say_command(text: str, sign_in: SignIn, out: Path, voice_name: str) -> None:
    """Synthesize TEXT to a WAV file."""

    async def run() -> tuple[bytes, int]:
        async with connect(sign_in) as (stub, metadata):
            request = V.SynthesizeRequest(text=text, voice=voice_name)
            audio, rate = bytearray(), 22050
            async for reply in stub.Synthesize(request, metadata=metadata):
                audio += reply.audio.audio_content
                rate = reply.audio.sample_rate_hertz
        return bytes(audio), rate

    audio, rate = _execute(run)
    out.write_bytes(wav_bytes(audio, rate))
    click.echo(f"{len(audio) / SAMPLE_WIDTH / rate:.1f} s written to {out}")


@voice.command("voices")
@sign_in_options
@click.option("--language", default="", help="Only voices for this language, e.g. en or en-US.")
def voices_command(sign_in: SignIn, language: str) -> None:
    """List the voices answers can be spoken with."""

    async def run() -> None:
        async with connect(sign_in) as (stub, metadata):
            token = ""
            while True:
                request = V.ListVoicesRequest(language_code=language, page_size=100, page_token=token)
                page = await stub.ListVoices(request, metadata=metadata, timeout=30)
                for v in page.voices:
                    click.echo(f"{v.name:<20} {', '.join(v.language_codes):<30} {v.engine}")
                token = page.next_page_token
                if not token:
                    return

    _execute(run)
