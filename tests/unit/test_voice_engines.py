"""The voice engines for real: pocketsphinx in its worker processes, the espeak-ng pronunciation hook, espeak-ng
synthesis, and the listening pipeline that joins resampling, endpointing and recognition."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import wave
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.core.errors import ServiceError
from services.core.settings import ROOT
from services.voice.audio import read_wav, resample
from services.voice.listening import FinalText, InterimText, Listener, SpeechBegan, SpeechFinished, listen_options
from services.voice.pronunciation import Pronouncer, arpabet, words_of
from services.voice.recognition import RecognizerUnavailable
from services.voice.settings import VoiceSettings
from services.voice.sphinx import DICTIONARY, SphinxRecognizer
from services.voice.synthesis import EspeakSynthesizer, Speaker, SpeechOptions, speech_options

SPEECH = ROOT.parent / "shared" / "eval" / "speech" / "wav16k"
needs_speech = pytest.mark.skipif(not SPEECH.exists(), reason="../shared/eval/speech is absent")


def settings(**overrides) -> VoiceSettings:
    return VoiceSettings(_env_file=None, recognizer_workers=1, recognizer_idle_decoders=1, **overrides)


def recorded(name: str) -> bytes:
    with wave.open(str(SPEECH / f"{name}.wav")) as wav:
        return wav.readframes(wav.getnframes())


def spoken(text: str) -> bytes:
    """`text` spoken by espeak-ng's klatt voice (the one pocketsphinx hears best), at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us+klatt", "-s", "160"], input=text.encode(),
                         capture_output=True, check=True).stdout  # fmt: skip
    pcm, rate = read_wav(wav)
    return resample(pcm, rate, 16000)


def words(text: str) -> list[str]:
    return re.sub(r"[^A-Z' ]", " ", text.upper()).split()


@pytest.fixture(scope="module")
async def recognizer() -> AsyncIterator[SphinxRecognizer]:
    engine = SphinxRecognizer(settings(), Pronouncer())
    await engine.start()
    yield engine
    await engine.close()


async def recognize(engine: SphinxRecognizer, pcm: bytes, hints: list[str] | None = None) -> tuple[list[str], str]:
    stream = await engine.open_stream(hints or [])
    try:
        await stream.start_utterance()
        partials = []
        for i in range(0, len(pcm), 3200):
            partial = await stream.feed(pcm[i : i + 3200], partial=True)
            if partial:
                partials.append(partial)
        return partials, (await stream.finish_utterance()).text
    finally:
        await stream.close()


@needs_speech
async def test_recognizer_streams_partials_then_the_final_text(recognizer: SphinxRecognizer) -> None:
    partials, final = await recognize(recognizer, recorded("ls_1089-134691-0000"))
    assert final == "he could wait no longer"
    assert len(partials) >= 3 and partials[0] != partials[-1]  # words arrive while the speaker talks
    assert recognizer.open_streams() == 0


async def test_shipped_vocabulary_and_session_hints_reach_the_recognizer(recognizer: SphinxRecognizer) -> None:
    assert "metformin" in recognizer.vocabulary  # a drug name the CMU dictionary lacks
    _, final = await recognize(recognizer, spoken("the patient takes metformin every day"))
    assert "metformin" in final.split()

    tirzepatide = spoken("the patient takes tirzepatide every day")
    _, plain = await recognize(recognizer, tirzepatide)
    assert "tirzepatide" not in plain.split()
    _, hinted = await recognize(recognizer, tirzepatide, hints=["Tirzepatide 5 mg"])
    assert "tirzepatide" in hinted.split()
    # The hinted decoder was dropped with its stream: another session never hears the word.
    _, after = await recognize(recognizer, tirzepatide)
    assert "tirzepatide" not in after.split()


async def test_a_dead_recognizer_process_fails_its_streams_and_is_replaced() -> None:
    engine = SphinxRecognizer(settings(), Pronouncer())
    await engine.start()
    try:
        stream = await engine.open_stream()
        await stream.start_utterance()
        os.kill(engine.processes[0].pid, signal.SIGKILL)
        with pytest.raises(RecognizerUnavailable):
            for _ in range(50):  # until the death is noticed
                await stream.feed(bytes(3200), partial=False)
        await stream.close()
        async with asyncio.timeout(60):
            while not engine.processes[0].alive:
                await engine.healthy()
                await asyncio.sleep(0.05)
        fresh = await engine.open_stream()
        await fresh.start_utterance()
        await fresh.feed(bytes(3200), partial=False)
        assert (await fresh.finish_utterance()).text == ""
        await fresh.close()
    finally:
        await engine.close()


def test_espeak_pronunciations_match_the_cmu_dictionary_closely() -> None:
    reference: dict[str, list[str]] = {}
    for line in DICTIONARY.read_text(errors="replace").splitlines()[::200]:
        word, *phones = line.split()
        if re.fullmatch(r"[a-z]+", word):
            reference[word] = phones
    found = asyncio.run(Pronouncer().pronounce(list(reference)))
    assert len(found) >= 0.98 * len(reference)
    exact = sum(found[w].split() == reference[w] for w in found)
    assert exact / len(found) >= 0.5


def test_espeak_phonemes_map_to_arpabet() -> None:
    assert arpabet("m_'E_t_f_o@_m_,I_n") == "M EH T F AO R M IH N"
    assert arpabet("w_'O@_f_3_r_,I_n") == "W AO R F ER IH N"  # the r of an r-coloured vowel is written once
    assert arpabet("Q_!!") is None
    found = words_of(["Metformin 500 mg", "beta-blocker", "x" * 50, "Metformin"])
    assert found == ["metformin", "mg", "beta", "blocker"]


async def test_espeak_speaks_sentences_as_chunks_at_the_asked_rate() -> None:
    engine = EspeakSynthesizer("espeak-ng", 175, 2, 10.0)
    voices = await engine.voices()
    assert any(v.name == "en-us" and "en-US" in v.language_codes for v in voices)
    speaker = Speaker(engine, SpeechOptions("en-us", 16000), chunk_ms=200)
    pieces = await speaker.speak("Metformin lowers blood glucose [1].")
    assert pieces[0].text == "Metformin lowers blood glucose." and all(p.text == "" for p in pieces[1:])
    assert all(p.sample_rate == 16000 for p in pieces) and all(len(p.pcm) <= 6400 for p in pieces)
    audio = np.frombuffer(b"".join(p.pcm for p in pieces), dtype=np.int16)
    assert 1.0 < len(audio) / 16000 < 5.0 and np.abs(audio).max() > 1000  # about two seconds of real sound
    with pytest.raises(ServiceError) as refused:
        await speech_options(engine, "klingon", 0, default_voice="en-us", field="voice", rate_field="rate")
    assert refused.value.violations[0].field == "voice"
    with pytest.raises(ServiceError):
        await speech_options(engine, "", 11025, default_voice="en-us", field="voice", rate_field="rate")


@needs_speech
async def test_listener_turns_48khz_audio_into_speech_events_and_transcripts(recognizer: SphinxRecognizer) -> None:
    pcm = resample(bytes(16000) + recorded("ls_1089-134691-0001") + bytes(32000), 16000, 48000)
    options = listen_options(encoding="AUDIO_ENCODING_LINEAR16", sample_rate=48000, language="en-us",
                             interim_results=True, hints=[], field="config")  # fmt: skip
    listener = Listener(recognizer, options, settings())
    await listener.open()
    events = []
    for i in range(0, len(pcm), 9600):
        events += [e async for e in listener.accept(pcm[i : i + 9600])]
    await listener.close()
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechBegan and InterimText in kinds
    assert kinds.index(SpeechFinished) < kinds.index(FinalText) == len(kinds) - 1
    final = events[-1]
    reference = words("FOR A FULL HOUR HE HAD PACED UP AND DOWN WAITING BUT HE COULD WAIT NO LONGER")
    assert len(set(words(final.text)) & set(reference)) >= 0.7 * len(reference)
    assert 0 < final.confidence <= 1 and 3000 < final.utterance_ms < 6000


def test_recognition_config_is_checked_field_by_field() -> None:
    def options(**kw):
        base = dict(encoding="AUDIO_ENCODING_LINEAR16", sample_rate=16000, language="", interim_results=False,
                    hints=[], field="config.recognition")  # fmt: skip
        return listen_options(**{**base, **kw})

    assert options().language == "en-US"
    for bad, field in (
        ({"encoding": "AUDIO_ENCODING_UNSPECIFIED"}, "config.recognition.encoding"),
        ({"sample_rate": 0}, "config.recognition.sample_rate_hertz"),
        ({"sample_rate": 44100}, "config.recognition.sample_rate_hertz"),
        ({"language": "fr-FR"}, "config.recognition.language_code"),
        ({"hints": ["x"] * 501}, "config.recognition.phrase_hints"),
        ({"hints": [""]}, "config.recognition.phrase_hints[0]"),
    ):
        with pytest.raises(ServiceError) as refused:
            options(**bad)
        assert refused.value.violations[0].field == field
