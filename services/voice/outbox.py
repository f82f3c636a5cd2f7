"""The bounded queue between a Converse session's producers (listener, answer, speech) and the response stream.

Flow control: producers wait when the client reads slowly, so nothing grows without bound and gRPC's own flow
control pushes back on the client. Audio gets a smaller share than the whole, so speech events and transcripts
always find room even while answer audio waits for the reader. A failure jumps the queue: the stream ends with
it at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Outbox:
    """A bounded FIFO with a reserved share for non-audio items, an end marker and a failure slot."""

    def __init__(self, size: int, audio_size: int) -> None:
        self._items: deque[tuple[Any, bool]] = deque()
        self._space = asyncio.Semaphore(size)
        self._audio_space = asyncio.Semaphore(max(1, min(audio_size, size - 1)))
        self._ready = asyncio.Event()
        self._closed = False
        self._failure: BaseException | None = None

    async def put(self, item: Any) -> None:
        """Queue an item, waiting while the outbox is full."""
        await self._space.acquire()
        self._append(item, audio=False)

    async def put_audio(self, item: Any) -> None:
        """Queue an audio item, waiting while the audio share (or the whole outbox) is full."""
        await self._audio_space.acquire()
        try:
            await self._space.acquire()
        except BaseException:
            self._audio_space.release()
            raise
        self._append(item, audio=True)

    def close(self) -> None:
        """No more items: `get` returns None once the queue is empty."""
        self._closed = True
        self._ready.set()

    def fail(self, failure: BaseException) -> None:
        """End the stream with `failure`: the next `get` raises it, ahead of anything queued."""
        if self._failure is None:
            self._failure = failure
        self._ready.set()

    async def get(self) -> Any | None:
        """The next item; None when closed and empty; raises the failure if one was set."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._items:
                item, audio = self._items.popleft()
                self._space.release()
                if audio:
                    self._audio_space.release()
                return item
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()

    def _append(self, item: Any, *, audio: bool) -> None:
        self._items.append((item, audio))
        self._ready.set()
