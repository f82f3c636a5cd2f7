"""A recognizer process: pocketsphinx decoders for many streams, driven by requests over a socket.

pocketsphinx holds the GIL while it decodes, so decoding runs in these processes, never on the server's event
loop. Each process serves its streams one request at a time; a stream has at most one request in flight, so
streams take turns. Decoders are costly to build (~0.2 s, ~90 MB: the language model is loaded per decoder), so
a stream borrows a warm decoder for the length of an utterance only, and the process builds spares while idle.
A stream with hint words gets a decoder of its own, dropped when the stream closes (its words must not leak
into other sessions).

Run as `python -m services.voice.sphinx_worker`; it talks over stdin/stdout (its stderr is the server's). Wire
format both ways: a 4-byte big-endian length, then a pickle. The first frame in is the configuration; the first
frame out says the process is ready. Requests are `(request_id, op, stream_id, payload)`; replies `(request_id,
ok, result_or_error_text)`. The process exits when its stdin closes.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from pocketsphinx import Decoder

HEADER = struct.Struct("!I")
SAMPLE_RATE = 16000
READY = -1  # request id of the start-up message
_NOT_WORDS = ("<s>", "</s>", "<sil>")


def frame(message: Any) -> bytes:
    """One message, framed."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _read_exactly(source: BinaryIO, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = source.read(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def read_frame(source: BinaryIO) -> Any | None:
    """Read one framed message from an unbuffered stream; None when the other end closed."""
    header = _read_exactly(source, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(source, HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)  # noqa: S301 - our own parent process writes these


@dataclass
class _Stream:
    decoder: Decoder | None = None
    dedicated: bool = False
    in_utterance: bool = False


class DecoderHost:
    """The decoders and streams of one recognizer process."""

    def __init__(self, options: dict[str, Any], vocabulary: list[tuple[str, str]], idle_target: int) -> None:
        self._options = options
        self._vocabulary = vocabulary
        self._idle_target = idle_target
        self._idle: list[Decoder] = []
        self._streams: dict[int, _Stream] = {}

    @property
    def wants_spare(self) -> bool:
        """True when fewer warm decoders wait than the target."""
        return len(self._idle) < self._idle_target

    def build_spare(self) -> None:
        """Build one warm decoder."""
        self._idle.append(self._build())

    def handle(self, op: str, stream_id: int, payload: Any) -> Any:
        """Run one request; raises on a bad one."""
        if op == "feed":
            pcm, partial = payload
            decoder = self._active(stream_id)
            decoder.process_raw(pcm, False, False)
            if partial:
                hyp = decoder.hyp()
                return hyp.hypstr if hyp else ""
            return None
        if op == "open":
            stream = self._streams[stream_id] = _Stream()
            if payload:
                stream.decoder, stream.dedicated = self._borrow(), True
                _add_words(stream.decoder, payload)
            return None
        if op == "start":
            stream = self._streams[stream_id]
            if stream.decoder is None:
                stream.decoder = self._borrow()
            elif stream.in_utterance:  # only a stream holding a decoder can be inside an utterance
                stream.decoder.end_utt()
            stream.decoder.start_utt()
            stream.in_utterance = True
            return None
        if op == "end":
            return self._end(stream_id)
        if op == "close":
            closing = self._streams.pop(stream_id, None)
            if closing is not None and closing.decoder is not None:
                if closing.in_utterance:
                    closing.decoder.end_utt()
                self._release(closing)
            return None
        if op == "ping":
            return len(self._streams)
        raise ValueError(f"unknown op {op!r}")

    def _active(self, stream_id: int) -> Decoder:
        stream = self._streams[stream_id]
        if not stream.in_utterance or stream.decoder is None:
            raise RuntimeError("no utterance in progress")
        return stream.decoder

    def _end(self, stream_id: int) -> tuple[str, float]:
        stream = self._streams[stream_id]
        decoder = self._active(stream_id)
        decoder.end_utt()
        stream.in_utterance = False
        hyp = decoder.hyp()
        text = hyp.hypstr if hyp else ""
        # Confidence: mean posterior of the recognized words (fillers and silences left out).
        probs = [seg.prob for seg in decoder.seg() if seg.word not in _NOT_WORDS and not seg.word.startswith("[")]
        confidence = sum(probs) / len(probs) if probs and text else 0.0
        if not stream.dedicated:
            self._release(stream)
        return text, confidence

    def _borrow(self) -> Decoder:
        return self._idle.pop() if self._idle else self._build()

    def _release(self, stream: _Stream) -> None:
        # Keep a spare for every open stream (they will speak again) on top of the warm target; drop the rest.
        if not stream.dedicated and len(self._idle) < self._idle_target + len(self._streams):
            self._idle.append(stream.decoder)
        stream.decoder = None

    def _build(self) -> Decoder:
        decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", **self._options)
        _add_words(decoder, self._vocabulary)
        return decoder


def _add_words(decoder: Decoder, words: list[tuple[str, str]]) -> None:
    """Add the words the decoder's dictionary lacks (pronunciations in ARPAbet)."""
    seen = set()
    missing = []
    for word, phones in words:
        if word not in seen and decoder.lookup_word(word) is None:
            seen.add(word)
            missing.append((word, phones))
    # Rebuilding the search after every word costs ~0.1 s each: rebuild once, with the last word.
    for i, (word, phones) in enumerate(missing):
        decoder.add_word(word, phones, i == len(missing) - 1)


def _write_all(sink: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[sink.write(view) :]


def _readable(source: BinaryIO) -> bool:
    return bool(select.select([source], [], [], 0)[0])


def main() -> None:
    """The process's loop: answer requests; build spare decoders while no request waits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops us by closing stdin
    requests = io.FileIO(sys.stdin.fileno(), closefd=False)  # unbuffered, so select() sees every waiting byte
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (C or Python) must not corrupt the replies
    config = read_frame(requests)
    if config is None:
        return
    options, vocabulary, idle_target = config
    host = DecoderHost(options, vocabulary, idle_target)
    host.build_spare()
    _write_all(replies, frame((READY, True, os.getpid())))
    while True:
        if host.wants_spare and not _readable(requests):
            host.build_spare()
            continue
        request = read_frame(requests)
        if request is None:
            return
        request_id, op, stream_id, payload = request
        try:
            reply = (request_id, True, host.handle(op, stream_id, payload))
        except Exception as exc:
            reply = (request_id, False, f"{type(exc).__name__}: {exc}")
        _write_all(replies, frame(reply))


if __name__ == "__main__":
    main()
