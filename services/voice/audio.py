"""PCM audio: 16-bit mono little-endian samples, sample-rate conversion (soxr), WAV framing."""

from __future__ import annotations

import io
import wave

import numpy as np
import soxr

SAMPLE_WIDTH = 2  # bytes per LINEAR16 sample
INPUT_RATES = (8000, 16000, 24000, 48000)
OUTPUT_RATES = (8000, 16000, 22050, 24000, 48000)


def duration_ms(nbytes: int, rate: int) -> float:
    """Milliseconds of 16-bit mono audio in `nbytes` bytes at `rate` Hz."""
    return nbytes / SAMPLE_WIDTH / rate * 1000.0


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """The whole of `pcm` at another rate (for complete buffers, e.g. one synthesized sentence)."""
    if from_rate == to_rate or not pcm:
        return pcm
    samples = np.frombuffer(pcm, dtype=np.int16)
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.int16).tobytes()


class StreamResampler:
    """Converts a stream of PCM chunks to another rate, keeping filter state across chunks.

    Chunks may split a sample in two (an odd number of bytes): the odd byte waits for the next chunk.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._odd = b""
        self._stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16")

    def push(self, pcm: bytes) -> bytes:
        """The converted audio available so far."""
        data = self._odd + pcm
        cut = len(data) - len(data) % SAMPLE_WIDTH
        data, self._odd = data[:cut], data[cut:]
        if self._stream is None or not data:
            return data
        return self._stream.resample_chunk(np.frombuffer(data, dtype=np.int16)).tobytes()

    def flush(self) -> bytes:
        """What the filter still holds; the stream then starts afresh."""
        self._odd = b""
        if self._stream is None:
            return b""
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True).tobytes()
        self._stream = soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype="int16")
        return tail


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """A WAV file holding 16-bit mono `pcm` at `rate`."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return out.getvalue()


def read_wav(data: bytes) -> tuple[bytes, int]:
    """16-bit PCM and the rate of a WAV file; stereo and wider files are mixed down to mono.

    Raises ValueError for anything but 16-bit PCM WAV.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from None
    if width != SAMPLE_WIDTH:
        raise ValueError(f"need 16-bit samples, the file has {8 * width}-bit")
    if channels > 1:
        samples = np.frombuffer(frames, dtype=np.int16).reshape(-1, channels).mean(axis=1)
        frames = samples.astype(np.int16).tobytes()
    return frames, rate
