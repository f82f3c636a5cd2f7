"""Text-to-speech: the engine interface, espeak-ng behind it, and the sentence pipeline that lets the first audio
leave before the whole text is known.

Text is spoken sentence by sentence: `SentenceSplitter` cuts a stream of text deltas into sentences as soon as
each one is complete, `speakable()` removes what should not be read aloud (citation markers, Markdown), and
`Speaker` turns a sentence into fixed-length PCM chunks at the rate the client asked for.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Protocol

from services.core.errors import Reason, ServiceError, invalid
from services.voice.audio import OUTPUT_RATES, SAMPLE_WIDTH, read_wav, resample

ESPEAK_RATE = 22050
MAX_SENTENCE_CHARS = 250
# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset({"e.g", "i.e", "dr", "mr", "mrs", "ms", "vs", "approx", "no", "fig", "st", "etc", "al"})
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n+")
_CITATION = re.compile(r"\[\d+(?:\s*[,\u2013-]\s*\d+)*\]")
_MARKUP = re.compile(r"[*_`#>|]+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", re.MULTILINE)
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r"\s+([.,;:!?])")


class SynthesisFailed(Exception):
    """The engine could not speak a text."""


@dataclass(frozen=True)
class Voice:
    """A voice the service can speak with."""

    name: str
    language_codes: tuple[str, ...]
    natural_sample_rate: int
    engine: str


class SpeechSynthesizer(Protocol):
    """A text-to-speech engine."""

    async def voices(self) -> list[Voice]:
        """Every voice, sorted by name."""

    async def synthesize(self, text: str, voice: str) -> tuple[bytes, int]:
        """16-bit mono PCM of `text` spoken by `voice`, and its sample rate."""


def speakable(text: str) -> str:
    """`text` as it should be read aloud: no [n] citation markers, list bullets or Markdown symbols, single
    spaces."""
    text = _MARKUP.sub(" ", _BULLET.sub("", _CITATION.sub("", text)))
    return _SPACE_BEFORE_MARK.sub(r"\1", _SPACES.sub(" ", text)).strip()


class SentenceSplitter:
    """Cuts text that arrives in pieces into sentences, each as soon as its end is certain."""

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS) -> None:
        self._buffer = ""
        self._max = max_chars

    def push(self, text: str) -> list[str]:
        """Add text; the sentences it completed."""
        self._buffer += text
        sentences = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            sentence, self._buffer = self._buffer[:cut], self._buffer[cut:]
            if sentence.strip():
                sentences.append(sentence.strip())
        return sentences

    def flush(self) -> list[str]:
        """The text left over (the end of the answer)."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    def _next_cut(self) -> int | None:
        for match in _BOUNDARY.finditer(self._buffer):
            if match.group().startswith("."):
                words = self._buffer[: match.start()].split()
                last = words[-1].lower() if words else ""
                if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                    continue  # "e.g." or an initial: the sentence goes on
            return match.end()
        if len(self._buffer) > self._max:  # no end in sight: cut at the last clause break, else the last space
            head = self._buffer[: self._max]
            for mark in (";", ",", ":", " "):
                at = head.rfind(mark)
                if at > self._max // 3:
                    return at + 1
            return self._max
        return None


def bcp47(espeak_language: str) -> str:
    """espeak-ng's language id in BCP-47 casing: "en-us" -> "en-US", "cmn-latn-pinyin" -> "cmn-Latn-pinyin"."""
    parts = espeak_language.split("-")
    out = [parts[0].lower()]
    for part in parts[1:]:
        if (len(part) == 2 and part.isalpha()) or (len(part) == 3 and part.isdigit()):
            out.append(part.upper())
        elif len(part) == 4 and part.isalpha():
            out.append(part.title())
        else:
            out.append(part.lower())
    return "-".join(out)


def parse_espeak_voices(listing: str) -> list[Voice]:
    """The voices in `espeak-ng --voices` output (MBROLA voices need files we do not ship: left out)."""
    voices: dict[str, Voice] = {}
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5 or fields[4].startswith("mb/") or fields[1] == "variant":
            continue
        name = fields[1]
        others = tuple(bcp47(m) for m in re.findall(r"\(([\w-]+) \d+\)", line))
        codes = tuple(dict.fromkeys((bcp47(name), *others)))
        voices.setdefault(name, Voice(name, codes, ESPEAK_RATE, "espeak-ng"))
    return sorted(voices.values(), key=lambda v: v.name)


class EspeakSynthesizer:
    """espeak-ng (Debian package): one short-lived process per sentence, ~16 ms each; at most `max_processes` at
    once across the server."""

    def __init__(self, binary: str, words_per_minute: int, max_processes: int, timeout: float) -> None:
        self._binary = binary
        self._wpm = words_per_minute
        self._slots = asyncio.Semaphore(max_processes)
        self._timeout = timeout
        self._voices: list[Voice] | None = None

    async def voices(self) -> list[Voice]:
        if self._voices is None:
            out = await self._run([self._binary, "--voices"], b"")
            self._voices = parse_espeak_voices(out.decode(errors="replace"))
        return self._voices

    async def synthesize(self, text: str, voice: str) -> tuple[bytes, int]:
        # The text goes in on stdin, so nothing in it can be taken for an option; without -m no markup is read.
        wav = await self._run([self._binary, "--stdout", "--stdin", "-v", voice, "-s", str(self._wpm)], text.encode())
        try:
            pcm, rate = read_wav(wav)
        except ValueError as exc:
            raise SynthesisFailed(f"espeak-ng returned no audio: {exc}") from None
        return pcm, rate

    async def _run(self, args: list[str], stdin: bytes) -> bytes:
        async with self._slots:
            try:
                # No input, no pipe: nothing to write to a process that may have exited already.
                process = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
            except OSError as exc:
                raise SynthesisFailed(f"cannot run {args[0]}: {exc.strerror}") from None
            try:
                async with asyncio.timeout(self._timeout):
                    out, err = await process.communicate(stdin or None)
            except BaseException:  # timeout or cancellation (barge-in): never leave the process behind
                if process.returncode is None:
                    process.kill()
                    await asyncio.shield(process.wait())
                raise
            if process.returncode != 0:
                raise SynthesisFailed(f"{args[0]} exited with {process.returncode}: {err.decode()[:200]}")
            return out


@dataclass(frozen=True)
class AudioPiece:
    """One chunk of synthesized audio; `text` is set on the first chunk of each sentence."""

    pcm: bytes
    sample_rate: int
    text: str = ""


@dataclass(frozen=True)
class SpeechOptions:
    """How to speak: the voice and the output sample rate (0 = the voice's own)."""

    voice: str
    sample_rate: int


async def speech_options(
    synthesizer: SpeechSynthesizer, voice: str, sample_rate: int, *, default_voice: str, field: str, rate_field: str
) -> SpeechOptions:
    """Validated speech options; VALIDATION_ERROR names the offending field."""
    name = voice.strip() or default_voice
    if name not in {v.name for v in await synthesizer.voices()}:
        raise invalid(field, f"unknown voice {name[:50]!r}; ListVoices names the voices", reason="UNKNOWN_VOICE")
    if sample_rate and sample_rate not in OUTPUT_RATES:
        raise invalid(rate_field, f"must be 0 or one of {', '.join(map(str, OUTPUT_RATES))}")
    return SpeechOptions(name, sample_rate)


class Speaker:
    """Speaks sentences with one voice at one rate, as chunks of `chunk_ms`."""

    def __init__(self, synthesizer: SpeechSynthesizer, options: SpeechOptions, chunk_ms: int) -> None:
        self._synthesizer = synthesizer
        self._options = options
        self._chunk_ms = chunk_ms

    async def speak(self, sentence: str) -> list[AudioPiece]:
        """The chunks of one sentence (none when nothing in it is speakable)."""
        text = speakable(sentence)
        if not text:
            return []
        try:
            pcm, rate = await self._synthesizer.synthesize(text, self._options.voice)
        except SynthesisFailed as exc:
            raise ServiceError(Reason.BACKEND_UNAVAILABLE, f"speech synthesis failed: {exc}") from None
        out_rate = self._options.sample_rate or rate
        pcm = resample(pcm, rate, out_rate)  # soxr in C: ~1 ms for a sentence
        step = out_rate * self._chunk_ms // 1000 * SAMPLE_WIDTH
        return [AudioPiece(pcm[i : i + step], out_rate, text if i == 0 else "") for i in range(0, len(pcm), step)]


def sentences_of(text: str) -> list[str]:
    """All sentences of a complete text."""
    splitter = SentenceSplitter()
    return [*splitter.push(text), *splitter.flush()]
