"""Voice plumbing on real audio: endpointing (webrtcvad) on recorded speech, streaming resampling, sentence
splitting for synthesis, the session outbox's flow control, interim stability."""

from __future__ import annotations

import asyncio
import math
import wave

import numpy as np
import pytest

from services.core.settings import ROOT
from services.voice.audio import StreamResampler, read_wav, wav_bytes
from services.voice.endpointing import Endpointer, EndpointerConfig, SpeechAudio, SpeechEnded, SpeechStarted
from services.voice.outbox import Outbox
from services.voice.recognition import interim_stability
from services.voice.synthesis import SentenceSplitter, sentences_of, speakable

SPEECH = ROOT.parent / "shared" / "eval" / "speech" / "wav16k"
needs_speech = pytest.mark.skipif(not SPEECH.exists(), reason="../shared/eval/speech is absent")


def utterance(name: str = "ls_1089-134691-0000") -> bytes:
    with wave.open(str(SPEECH / f"{name}.wav")) as wav:
        return wav.readframes(wav.getnframes())


def silence(ms: int, rate: int = 16000) -> bytes:
    return bytes(rate * ms // 1000 * 2)


def push_in_chunks(endpointer: Endpointer, pcm: bytes, chunk: int = 3200) -> list:
    events = []
    for i in range(0, len(pcm), chunk):
        events += endpointer.push(pcm[i : i + chunk])
    return events


@needs_speech
def test_endpointer_finds_a_recorded_utterance_between_silences() -> None:
    speech = utterance()
    speech_ms = len(speech) // 32
    config = EndpointerConfig(silence_window_ms=600)
    events = push_in_chunks(Endpointer(config), silence(1000) + speech + silence(1500))
    kinds = [type(e) for e in events]
    assert kinds.count(SpeechStarted) == 1 and kinds.count(SpeechEnded) == 1
    started = next(e for e in events if isinstance(e, SpeechStarted))
    ended = next(e for e in events if isinstance(e, SpeechEnded))
    assert 1000 <= started.offset_ms < 1000 + speech_ms / 2
    assert started.offset_ms < ended.offset_ms <= 1000 + speech_ms + config.frame_ms
    assert ended.reason == "silence"
    # Everything between start (with its pre-roll) and the end of the silence window reached the recognizer.
    fed = len(started.audio) + sum(len(e.audio) for e in events if isinstance(e, SpeechAudio))
    assert fed >= (ended.offset_ms - started.offset_ms + config.silence_window_ms) * 32


def test_endpointer_ignores_silence() -> None:
    assert push_in_chunks(Endpointer(EndpointerConfig()), silence(3000)) == []
    assert Endpointer(EndpointerConfig()).end() == []


@needs_speech
def test_end_of_utterance_closes_speech_at_once() -> None:
    endpointer = Endpointer(EndpointerConfig(silence_window_ms=5000))
    events = push_in_chunks(endpointer, utterance()[: 32 * 1500])
    assert [type(e) for e in events if not isinstance(e, SpeechAudio)] == [SpeechStarted]
    assert endpointer.in_speech
    closing = endpointer.end()
    assert isinstance(closing[-1], SpeechEnded) and closing[-1].reason == "client"
    assert not endpointer.in_speech


@needs_speech
def test_long_speech_is_cut_at_the_utterance_limit() -> None:
    events = push_in_chunks(Endpointer(EndpointerConfig(max_utterance_ms=1500)), utterance("lj_LJ001-0001"))
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert ends and ends[0].reason == "max_length"


def test_stream_resampler_keeps_pitch_and_length_across_odd_chunks() -> None:
    rate_in, rate_out, seconds = 48000, 16000, 1.0
    t = np.arange(int(rate_in * seconds)) / rate_in
    tone = (8000 * np.sin(2 * math.pi * 1000 * t)).astype(np.int16).tobytes()
    resampler = StreamResampler(rate_in, rate_out)
    out = b"".join(resampler.push(tone[i : i + 1001]) for i in range(0, len(tone), 1001)) + resampler.flush()
    samples = np.frombuffer(out, dtype=np.int16)
    assert abs(len(samples) - rate_out * seconds) <= 0.01 * rate_out
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * rate_out / len(samples)
    assert abs(peak_hz - 1000) < 5


def test_wav_round_trip_and_stereo_mixdown() -> None:
    stereo = np.array([[1000, 3000], [-2000, 0]], dtype=np.int16)
    data = wav_bytes(b"\x01\x00\x02\x00", 16000)
    assert read_wav(data) == (b"\x01\x00\x02\x00", 16000)
    import io

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(stereo.tobytes())
    pcm, rate = read_wav(buffer.getvalue())
    assert rate == 8000 and np.frombuffer(pcm, dtype=np.int16).tolist() == [2000, -1000]
    with pytest.raises(ValueError):
        read_wav(b"not a wav")


def test_sentences_are_released_as_soon_as_they_are_complete() -> None:
    splitter = SentenceSplitter()
    assert splitter.push("Metformin is first-line therapy for type 2 diab") == []
    assert splitter.push("etes [1]. It lowers hepatic glucose output, e.g. by ") == [
        "Metformin is first-line therapy for type 2 diabetes [1]."
    ]
    assert splitter.push("AMPK activation. Dr. Smith uses 2.5 mg! Next") == [
        "It lowers hepatic glucose output, e.g. by AMPK activation.",
        "Dr. Smith uses 2.5 mg!",
    ]
    assert splitter.flush() == ["Next"]
    long = "word, " * 100
    assert all(len(s) <= 250 for s in sentences_of(long))


def test_speakable_text_drops_citation_markers_and_markup() -> None:
    assert speakable("**Metformin** is first-line [1][2, 3]. See # notes") == "Metformin is first-line. See notes"
    assert speakable("- take with food [4]") == "take with food"


async def test_outbox_keeps_room_for_events_while_audio_waits_and_failures_jump_the_queue() -> None:
    outbox = Outbox(size=4, audio_size=2)
    await outbox.put_audio("a1")
    await outbox.put_audio("a2")
    blocked = asyncio.create_task(outbox.put_audio("a3"))
    await asyncio.sleep(0)
    assert not blocked.done()  # the audio share is full ...
    await asyncio.wait_for(outbox.put("event"), 1)  # ... but events still get in
    assert await outbox.get() == "a1"
    await asyncio.wait_for(blocked, 1)
    outbox.fail(RuntimeError("bad message"))
    with pytest.raises(RuntimeError):
        await outbox.get()


async def test_closed_outbox_drains_then_ends() -> None:
    outbox = Outbox(size=4, audio_size=2)
    await outbox.put("last")
    outbox.close()
    assert await outbox.get() == "last"
    assert await outbox.get() is None


def test_interim_stability_grows_with_the_unchanged_prefix() -> None:
    assert interim_stability("", "he could") == 0.0
    assert interim_stability("he could", "he could wait") == pytest.approx(0.6)
    assert interim_stability("he could way", "he could wait no") == pytest.approx(0.45)
    assert interim_stability("he could", "") == 0.0
