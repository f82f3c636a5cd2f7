"""Idempotent questions: one stored question and one stored answer per (conversation, client message id), however
often and however concurrently a client sends it.

The first request stores the question with a lease on writing its answer and renews it while it writes. A repeat, or
a concurrent duplicate, waits for that answer and replays it. When the lease runs out (the worker crashed) or is
released (the answer failed), the repeat takes the question over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import NamedTuple

from services.core.db import utcnow
from services.core.errors import Reason, ServiceError, not_found
from services.rag.store import ConversationGone, MessageRow, RagStore

POLL_SECONDS = 0.1


class Exchange(NamedTuple):
    """A question and its answer, as stored: what a repeat replays."""

    question: MessageRow
    answer: MessageRow


class AnswerLease:
    """One request's hold on writing the answer to its question. Without a client message id there is nothing to
    wait for or replay: the request stores and answers its question."""

    def __init__(
        self, store: RagStore, conversation_id: str, client_message_id: str, query: str, lease: timedelta, wait: float
    ) -> None:
        self._store = store
        self._conversation_id = conversation_id
        self._client_message_id = client_message_id
        self._query = query
        self._lease = lease
        self._wait_seconds = wait
        self.question: MessageRow | None = None  # the stored question, once this request stored or took it over

    async def claim(self) -> Exchange | None:
        """The stored exchange to replay, or None when this request is to answer the question. Waits while another
        worker holds the lease; ALREADY_EXISTS when the key was used for another question, DEADLINE_EXCEEDED when the
        other worker's answer is not written in time."""
        if not self._client_message_id:
            return None
        deadline = time.monotonic() + self._wait_seconds
        while True:
            asked, answered = await self._store.message_pair(self._conversation_id, self._client_message_id)
            if asked is not None and asked.content != self._query:
                raise ServiceError(
                    Reason.ALREADY_EXISTS,
                    "client_message_id was already used for a different question in this conversation",
                    metadata={"field": "client_message_id"},
                )
            if asked is not None and answered is not None:
                return Exchange(asked, answered)
            if asked is None:
                return None  # nobody asked it yet: store_question stores it (or meets a concurrent duplicate)
            if await self._store.claim_question(asked.seq, utcnow() + self._lease):
                self.question = asked
                return None
            if time.monotonic() > deadline:
                raise ServiceError(
                    Reason.DEADLINE_EXCEEDED, "the answer to this client_message_id is still being written",
                    retry_after_seconds=1.0,
                )  # fmt: skip
            await asyncio.sleep(POLL_SECONDS)

    async def store_question(self, row: MessageRow) -> MessageRow | Exchange:
        """The stored question this request answers: `row`, stored under this lease, or the one it took over. A
        concurrent duplicate that stored it first is waited for like a repeat: its exchange is to be replayed."""
        if self.question is None:
            row.answer_lease_until = utcnow() + self._lease
            self.question = await self._add(row)
        if self.question is None:
            stored = await self.claim()
            if stored is not None:
                return stored
        if self.question is None:
            raise ServiceError(Reason.INTERNAL, "the question vanished after a duplicate stored it")  # pragma: no cover
        return self.question

    async def store_answer(self, row: MessageRow) -> Exchange:
        """Store the answer; when a worker that took the question over stored one first, that one is the answer."""
        assert self.question is not None, "store_question comes first"
        stored = await self._add(row)
        if stored is not None:
            return Exchange(self.question, stored)
        asked, answered = await self._store.message_pair(self._conversation_id, self._client_message_id)
        if asked is None or answered is None:
            raise ServiceError(Reason.INTERNAL, "answer lost in a takeover race")  # pragma: no cover
        return Exchange(asked, answered)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Keep the lease while the answer is written: renewed, so that a retry waits for this worker (a crashed
        worker stops renewing and a retry takes over within one lease); released when writing fails or is
        cancelled, so that a retry takes over at once."""
        renewing = asyncio.create_task(self._renew()) if self._client_message_id else None
        try:
            yield
        except BaseException:
            if self.question is not None:
                with contextlib.suppress(Exception):  # shielded: this may be a cancellation
                    await asyncio.shield(self._store.release_question(self.question.seq))
            raise
        finally:
            if renewing is not None:
                renewing.cancel()

    async def _renew(self) -> None:
        every = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            if self.question is not None:
                with contextlib.suppress(Exception):  # a missed renewal costs at most a duplicate answer attempt
                    await self._store.renew_lease(self.question.seq, utcnow() + self._lease)

    async def _add(self, row: MessageRow) -> MessageRow | None:
        try:
            return await self._store.add_message(row)
        except ConversationGone:
            raise not_found("conversation", self._conversation_id) from None
