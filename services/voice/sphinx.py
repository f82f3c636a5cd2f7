"""The pocketsphinx speech recognizer: a pool of recognizer processes (`sphinx_worker`) behind async streams.

Each stream lives in one process, chosen as the least loaded when it opens. Requests and replies travel over a
socket pair as asyncio streams, so the event loop never blocks on a busy process. A process that dies or stops
answering fails the requests in flight with RecognizerUnavailable and is replaced; the sessions on it open a new
stream and carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocketsphinx import get_model_path

from services.voice import sphinx_worker
from services.voice.pronunciation import Pronouncer, vocabulary_terms, words_of
from services.voice.recognition import Recognized, RecognizerUnavailable
from services.voice.settings import VoiceSettings

log = logging.getLogger(__name__)

DICTIONARY = Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"
START_TIMEOUT_SECONDS = 60.0
HEADER = sphinx_worker.HEADER


class RecognizerProcess:
    """One recognizer process and the requests in flight to it."""

    def __init__(self, index: int, config: tuple[Any, ...], timeout: float) -> None:
        self.index = index
        self.streams = 0
        self.alive = False
        self._config = config
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process and wait until its first decoder is warm."""
        # A fresh interpreter running only the worker module: no fork of a process running grpc threads, and none
        # of the server's imports.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", sphinx_worker.__name__,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(sphinx_worker.frame(self._config))
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                ready = await self._read(self._process.stdout)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            await self.stop()
            raise RecognizerUnavailable(f"recognizer process {self.index} did not start") from exc
        self.alive = True
        self._reader_task = asyncio.create_task(self._read_replies(self._process.stdout))
        log.info("recognizer process ready", extra={"index": self.index, "pid": ready[2]})

    async def call(self, op: str, stream_id: int, payload: Any = None) -> Any:
        """Send a request and wait for its reply."""
        if not self.alive or self._process is None or self._process.stdin is None:
            raise RecognizerUnavailable("recognizer process is down")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._process.stdin.write(sphinx_worker.frame((request_id, op, stream_id, payload)))
            async with asyncio.timeout(self._timeout):
                await self._process.stdin.drain()
                ok, result = await future
        except TimeoutError:
            log.error("recognizer process stopped answering", extra={"index": self.index, "op": op})
            self._kill()
            raise RecognizerUnavailable("recognizer process stopped answering") from None
        except ConnectionError:
            raise RecognizerUnavailable("recognizer process is down") from None
        finally:
            self._pending.pop(request_id, None)
        if not ok:
            raise RecognizerUnavailable(f"recognizer failed: {result}")
        return result

    def notify(self, op: str, stream_id: int) -> None:
        """Send a request whose reply nobody waits for (used on paths that must not block, like cleanup)."""
        if self.alive and self._process is not None and self._process.stdin is not None:
            self._process.stdin.write(sphinx_worker.frame((next(self._ids), op, stream_id, None)))

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Any:
        size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
        return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our own child process writes these

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                request_id, ok, result = await self._read(reader)
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result((ok, result))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.alive = False
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(RecognizerUnavailable("recognizer process exited"))
            if self._process is not None and self._process.returncode not in (None, 0):
                log.error("recognizer process died", extra={"index": self.index, "exit": self._process.returncode})

    def _kill(self) -> None:
        self.alive = False
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    def successor(self) -> RecognizerProcess:
        """A new, unstarted process with the same configuration (to replace this one)."""
        return RecognizerProcess(self.index, self._config, self._timeout)

    @property
    def pid(self) -> int | None:
        """The process id (tests kill it to prove recovery)."""
        return self._process.pid if self._process else None

    async def stop(self) -> None:
        """Close stdin (the process exits on EOF) and reap it; kill it if it does not go."""
        self.alive = False
        if self._process is None:
            return
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class SphinxStream:
    """A recognition stream in one recognizer process (implements RecognitionStream)."""

    def __init__(self, owner: SphinxRecognizer, process: RecognizerProcess, stream_id: int) -> None:
        self._owner = owner
        self._process = process
        self._id = stream_id
        self._closed = False

    async def start_utterance(self) -> None:
        await self._process.call("start", self._id)

    async def feed(self, pcm: bytes, *, partial: bool) -> str | None:
        hypothesis: str | None = await self._process.call("feed", self._id, (pcm, partial))
        return hypothesis

    async def finish_utterance(self) -> Recognized:
        text, confidence = await self._process.call("end", self._id)
        return Recognized(text, round(float(confidence), 3))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._process.streams -= 1
        self._owner.stream_closed()
        self._process.notify("close", self._id)


class SphinxRecognizer:
    """pocketsphinx (CMU en-us model shipped in the package) with the medical vocabulary; implements
    SpeechRecognizer."""

    sample_rate = sphinx_worker.SAMPLE_RATE

    def __init__(self, settings: VoiceSettings, pronouncer: Pronouncer) -> None:
        self._settings = settings
        self._pronouncer = pronouncer
        self._processes: list[RecognizerProcess] = []
        self._known: frozenset[str] = frozenset()
        self._vocabulary: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._open = 0
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the dictionary's word list, pronounce the vocabulary, start the recognizer processes."""
        self._known = await asyncio.to_thread(_dictionary_words, DICTIONARY)
        terms = [w for w in vocabulary_terms(self._settings.vocabulary_file) if w not in self._known]
        self._vocabulary = await self._pronouncer.pronounce(terms)
        options = {"maxhmmpf": self._settings.stt_max_hmm_per_frame, "fwdflat": self._settings.stt_second_pass}
        args = (options, sorted(self._vocabulary.items()), max(1, self._settings.recognizer_idle_decoders))
        count = self._settings.recognizer_workers or os.cpu_count() or 1
        self._processes = [RecognizerProcess(i, args, self._settings.recognizer_timeout_seconds) for i in range(count)]
        await asyncio.gather(*(p.start() for p in self._processes))
        log.info("recognizer ready", extra={"processes": count, "added_words": len(self._vocabulary)})

    @property
    def vocabulary(self) -> dict[str, str]:
        """The words added to the dictionary at start-up and their pronunciations."""
        return dict(self._vocabulary)

    @property
    def processes(self) -> list[RecognizerProcess]:
        """The recognizer processes."""
        return list(self._processes)

    async def open_stream(self, hints: Sequence[str] = ()) -> SphinxStream:
        """A stream in the least loaded live process; hint words the dictionary lacks get pronunciations."""
        unknown = [w for w in words_of(hints) if w not in self._known and w not in self._vocabulary]
        extra = sorted((await self._pronouncer.pronounce(unknown)).items()) if unknown else []
        self._restart_dead()
        live = [p for p in self._processes if p.alive]
        if not live and self._restarts:  # every process died: wait for a replacement rather than fail the session
            await asyncio.wait(set(self._restarts), timeout=START_TIMEOUT_SECONDS)
            live = [p for p in self._processes if p.alive]
        if not live:
            raise RecognizerUnavailable("no recognizer process is running")
        process = min(live, key=lambda p: p.streams)
        stream_id = next(self._ids)
        process.streams += 1  # counted before the await, so sessions opening together spread out
        try:
            await process.call("open", stream_id, extra)
        except BaseException:
            process.streams -= 1
            raise
        self._open += 1
        return SphinxStream(self, process, stream_id)

    def stream_closed(self) -> None:
        """Bookkeeping for a closed stream."""
        self._open -= 1

    def open_streams(self) -> int:
        return self._open

    async def healthy(self) -> bool:
        """True while at least one process answers; dead ones are restarted."""
        self._restart_dead()
        return any(p.alive for p in self._processes)

    def _restart_dead(self) -> None:
        for index, process in enumerate(self._processes):
            if not process.alive and not any(t.get_name() == f"restart-{index}" for t in self._restarts):
                task = asyncio.create_task(self._restart(index), name=f"restart-{index}")
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def _restart(self, index: int) -> None:
        old = self._processes[index]
        await old.stop()
        fresh = old.successor()
        try:
            await fresh.start()
        except RecognizerUnavailable:
            log.exception("recognizer process could not be restarted", extra={"index": index})
            return
        self._processes[index] = fresh

    async def close(self) -> None:
        """Stop every process."""
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*(p.stop() for p in self._processes), return_exceptions=True)


def _dictionary_words(path: Path) -> frozenset[str]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        return frozenset(line.split(" ", 1)[0].split("(", 1)[0] for line in lines if line.strip())
