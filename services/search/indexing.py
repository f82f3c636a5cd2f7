"""The indexing pipeline and its workers: parse → chunk → embed in batches → upsert → publish.

The same code runs in both modes; only the job queue differs. Progress goes to the document's row after every
batch (WatchDocument reads it from there, from any process). A job carries the document's generation: when the
document is deleted or reindexed meanwhile, the row no longer matches and the job stops. Point ids are derived
from (document, generation, chunk), so a resumed job skips the chunks already stored and overwrites nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass

from services.core.db import utcnow
from services.search.chunking import Chunk, chunk_pages
from services.search.embeddings import Embedder
from services.search.index import ChunkPoint, VectorIndex, point_id, version_of
from services.search.jobs import Job, JobQueue
from services.search.parsing import ParseError, parse
from services.search.sparse import Bm25Encoder
from services.search.store import FINAL_STATUSES, DocumentRow, SearchStore, Status

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # unexpected failures (a store or index outage) are retried this often before FAILED
TITLE_TOKENS = 48  # at most this much of the budget goes to the title embedded with every chunk
UNTITLED = "Untitled document"  # neither the uploader nor the file named it


class StaleJob(Exception):
    """The document was deleted or reindexed while this job ran."""


@dataclass(frozen=True)
class PipelineLimits:
    """Bounds and sizes of the pipeline."""

    max_pages: int
    max_chunks: int
    chunk_max_tokens: int
    chunk_overlap_tokens: int
    batch_size: int


class ProgressBoard:
    """Wakes WatchDocument streams in this process as soon as a document changes (others poll the row)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: Counter[str] = Counter()

    def changed(self, document_id: str) -> None:
        """Wake every watcher of the document."""
        event = self._events.pop(document_id, None)
        if event is not None:
            event.set()

    async def wait(self, document_id: str, seconds: float) -> None:
        """Until the document changes here, or `seconds` pass."""
        event = self._events.setdefault(document_id, asyncio.Event())
        self._waiting[document_id] += 1
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self._waiting[document_id] -= 1
            if self._waiting[document_id] <= 0:  # the last watcher leaves: forget the document
                del self._waiting[document_id]
                if self._events.get(document_id) is event:
                    del self._events[document_id]


def embedding_text(title: str, chunk: Chunk) -> str:
    """What is embedded and BM25-indexed for a chunk: the document title gives every chunk its context."""
    return f"{title}\n{chunk.text}" if title else chunk.text


class Indexer:
    """Runs one job through the pipeline."""

    def __init__(
        self,
        store: SearchStore,
        index: VectorIndex,
        embedder: Embedder,
        encoder: Bm25Encoder,
        limits: PipelineLimits,
        board: ProgressBoard,
    ) -> None:
        self._store = store
        self._index = index
        self._embedder = embedder
        self._encoder = encoder
        self._limits = limits
        self._board = board

    async def _advance(self, job: Job, **values: object) -> None:
        if not await self._store.advance(job.document_id, job.generation, **values):
            raise StaleJob(job.document_id)
        self._board.changed(job.document_id)

    async def run(self, job: Job) -> None:
        """Index the job's document; a parse failure ends it FAILED with the reason. StaleJob when the document
        changed underneath; other exceptions are the caller's to retry."""
        row = await self._store.get(job.document_id)
        if row is None or row.generation != job.generation or row.status in FINAL_STATUSES:
            return  # deleted, superseded, or a duplicate delivery of a finished job
        try:
            await self._pipeline(job, row)
        except StaleJob:
            if await self._store.get(job.document_id) is None:
                await self._index.delete_document(job.document_id)  # deleted mid-run: drop what we wrote
            raise

    async def _pipeline(self, job: Job, row: DocumentRow) -> None:
        await self._advance(job, status=Status.PARSING)
        data = await self._store.content(job.document_id)
        if data is None:
            raise StaleJob(job.document_id)
        try:
            parsed = await asyncio.to_thread(parse, data, row.media_type, max_pages=self._limits.max_pages)
            if not parsed.has_text:
                raise ParseError("no text could be extracted (a scanned PDF needs OCR, which is not supported)")
            title = row.title or parsed.title or UNTITLED
            title_tokens = min(self._embedder.count_tokens([title])[0] + 1, TITLE_TOKENS) if title else 0
            budget = self._limits.chunk_max_tokens - title_tokens
            overlap = min(self._limits.chunk_overlap_tokens, budget // 2 - 1)
            chunks = await asyncio.to_thread(chunk_pages, parsed.pages, self._embedder.count_tokens, budget, overlap)
            if len(chunks) > self._limits.max_chunks:
                raise ParseError(f"the document splits into {len(chunks)} chunks; at most {self._limits.max_chunks}")
        except ParseError as exc:
            await self._advance(job, status=Status.FAILED, error=str(exc), page_count=0)
            log.info("document failed to parse", extra={"document_id": job.document_id, "error": str(exc)})
            return
        version = version_of(job.document_id, job.generation)
        ids = [point_id(version, c.index) for c in chunks]
        stored = await self._index.existing(ids)  # a resumed job: those chunks are done
        done = sum(1 for i in ids if i in stored)
        await self._advance(
            job, status=Status.EMBEDDING, chunk_count=len(chunks), chunks_done=done, page_count=parsed.page_count,
            title=title,
        )  # fmt: skip
        todo = [(c, i) for c, i in zip(chunks, ids, strict=True) if i not in stored]
        for start in range(0, len(todo), self._limits.batch_size):
            batch = todo[start : start + self._limits.batch_size]
            texts = [embedding_text(title, c) for c, _ in batch]
            vectors = await self._embedder.embed(texts)
            points = [
                ChunkPoint(pid, vector.tolist(), self._encoder.document(text), _payload(row, title, version, chunk))
                for (chunk, pid), vector, text in zip(batch, vectors, texts, strict=True)
            ]
            await self._index.upsert(points)
            done += len(batch)
            await self._advance(job, chunks_done=done)
        await self._index.publish(job.document_id, version)
        await self._advance(job, status=Status.INDEXED, chunks_done=len(chunks), indexed_at=utcnow())


def _payload(row: DocumentRow, title: str, version: str, chunk: Chunk) -> dict:
    return {
        "document_id": row.id,
        "version": version,
        "chunk_index": chunk.index,
        "page": chunk.page,
        "text": chunk.text,
        "title": title,
        "specialty": row.specialty,
        "source_type": row.source_type,
        "tags": list(row.tags or []),
    }


class IndexingWorkers:
    """Background tasks taking jobs off the queue until stopped."""

    def __init__(
        self,
        indexer: Indexer,
        queue: JobQueue,
        index: VectorIndex,
        store: SearchStore,
        count: int,
        renew_seconds: float,
    ) -> None:
        self._indexer = indexer
        self._renew_seconds = renew_seconds
        self._queue = queue
        self._index = index
        self._store = store
        self._count = count
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the workers."""
        self._tasks = [asyncio.create_task(self._work(n), name=f"indexer-{n}") for n in range(self._count)]

    async def stop(self) -> None:
        """Cancel the workers; an interrupted job stays queued (mesh) or unfinished in the database (embedded)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self, number: int) -> None:
        while True:
            try:
                job = await self._queue.take()
            except Exception:
                log.exception("indexing queue unavailable; retrying")
                await asyncio.sleep(2.0)
                continue
            await self._handle(job)
            with contextlib.suppress(Exception):
                await self._index.maintain()

    async def _keep_claim(self, job: Job) -> None:
        """Renew the job's claim while it runs (parsing a large PDF can take longer than the claim lasts)."""
        while True:
            await asyncio.sleep(self._renew_seconds)
            try:
                await self._queue.renew(job)
            except Exception as exc:  # a Redis blip: the next renewal may work; the claim outlasts a few misses
                log.warning("could not renew an indexing job", extra={"error": type(exc).__name__})

    async def _handle(self, job: Job) -> None:
        if job.deliveries > MAX_ATTEMPTS:
            # Every worker that took this job died on it (out of memory on a hostile file, say): stop the crash loop.
            with contextlib.suppress(Exception):
                await self._store.advance(
                    job.document_id, job.generation, status=Status.FAILED,
                    error=f"indexing stopped {job.deliveries - 1} workers; the file may be hostile or too complex",
                )  # fmt: skip
                await self._queue.done(job)
            return
        heartbeat = asyncio.create_task(self._keep_claim(job))
        try:
            await self._indexer.run(job)
        except StaleJob:
            log.info("indexing job superseded", extra={"document_id": job.document_id})
        except Exception as exc:
            log.exception("indexing failed", extra={"document_id": job.document_id, "attempt": job.attempt})
            if job.attempt < MAX_ATTEMPTS:
                await asyncio.sleep(2.0**job.attempt)
                retry = Job(job.document_id, job.generation, job.attempt + 1)
                with contextlib.suppress(Exception):
                    await self._queue.put(retry)
            else:
                with contextlib.suppress(Exception):
                    await self._store.advance(
                        job.document_id, job.generation, status=Status.FAILED,
                        error=f"indexing failed {MAX_ATTEMPTS} times ({type(exc).__name__}); try ReindexDocument",
                    )  # fmt: skip
        finally:
            heartbeat.cancel()
        with contextlib.suppress(Exception):
            await self._queue.done(job)
