"""The indexing pipeline and its workers: parse → chunk → embed in batches → upsert → publish.

The same code runs in both modes; only the job queue differs. A worker takes the jobs waiting (up to a batch) and
embeds the chunks of all their documents together: an abstract of one or two chunks alone would leave most of an
inference call unused. Each document still has its own states and failures. Progress goes to the documents' rows
after every embedding batch, one transaction for all of them (WatchDocument reads it from there, from any
process). A job carries the document's generation: when the document is deleted or reindexed meanwhile, the row
no longer matches and the document is dropped from the batch. Point ids are derived from (document, generation,
chunk), so a resumed job skips the chunks already stored and overwrites nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class PipelineLimits:
    """Bounds and sizes of the pipeline."""

    max_pages: int
    max_chunks: int
    chunk_max_tokens: int
    chunk_overlap_tokens: int
    batch_size: int  # chunks per embedding call and index upsert, across the documents of a batch
    batch_bytes: int  # documents parsed together hold at most this many bytes (or one larger document)


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


@dataclass(eq=False)
class _Document:
    """One document of a batch on its way through the pipeline."""

    job: Job
    row: DocumentRow
    title: str = ""
    version: str = ""
    page_count: int = 0
    chunk_count: int = 0
    done: int = 0
    todo: list[tuple[Chunk, str]] = field(default_factory=list)  # (chunk, point id) not stored yet
    dropped: bool = False  # stale: the rest of its chunks are skipped

    @property
    def id(self) -> str:
        return self.job.document_id


class Indexer:
    """Runs batches of jobs through the pipeline: each document keeps its own states and failures, while the
    chunks of many are embedded together and their rows written in one transaction per step."""

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

    async def run(self, jobs: Sequence[Job]) -> dict[Job, Exception]:
        """Index the jobs' documents. A parse failure ends only that document FAILED with the reason; a document
        deleted or reindexed underneath is dropped. Returns the jobs whose own document raised unexpectedly (the
        caller retries them); an exception of a shared step (store, index, embedding) propagates."""
        rows = await self._store.get_many({job.document_id for job in jobs})
        live: dict[str, _Document] = {}
        for job in jobs:
            row = rows.get(job.document_id)
            if row is None or row.generation != job.generation or row.status in FINAL_STATUSES:
                continue  # deleted, superseded, or a duplicate delivery of a finished job
            live.setdefault(job.document_id, _Document(job, row))  # the same job twice: once is enough
        failures: dict[Job, Exception] = {}
        # Small documents first (they finish first), in groups whose bytes fit the budget: memory stays bounded.
        group: list[_Document] = []
        for document in sorted(live.values(), key=lambda d: d.row.size_bytes):
            if group and sum(d.row.size_bytes for d in group) + document.row.size_bytes > self._limits.batch_bytes:
                failures.update(await self._run_group(group))
                group = []
            group.append(document)
        if group:
            failures.update(await self._run_group(group))
        return failures

    async def _advance(self, changes: dict[_Document, dict[str, object]]) -> None:
        """Write each document's new columns in one transaction; a document no longer at its generation is
        dropped (and its chunks removed when it was deleted)."""
        if not changes:
            return
        current = await self._store.advance_many({(d.id, d.job.generation): v for d, v in changes.items()})
        for document in changes:
            self._board.changed(document.id)
            if document.id not in current:
                document.dropped = True
                log.info("indexing job superseded", extra={"document_id": document.id})
                if await self._store.get(document.id) is None:
                    await self._index.delete_document(document.id)  # deleted mid-run: drop what we wrote

    async def _run_group(self, documents: list[_Document]) -> dict[Job, Exception]:
        await self._advance({d: {"status": Status.PARSING} for d in documents})
        documents = [d for d in documents if not d.dropped]
        contents = await self._store.contents([d.id for d in documents])
        outcomes = await asyncio.to_thread(self._prepare_all, documents, contents)
        failures = {d.job: error for d, error in outcomes.items() if not isinstance(error, ParseError)}
        bad = {d: error for d, error in outcomes.items() if isinstance(error, ParseError)}
        await self._advance({d: {"status": Status.FAILED, "error": str(e), "page_count": 0} for d, e in bad.items()})
        for document, error in bad.items():
            log.info("document failed to parse", extra={"document_id": document.id, "error": str(error)})
        documents = [d for d in documents if d not in outcomes and d.id in contents]
        if not documents:
            return failures
        stored = await self._index.existing([pid for d in documents for _chunk, pid in d.todo])
        for document in documents:  # a resumed job: the chunks already stored are done
            document.todo = [(chunk, pid) for chunk, pid in document.todo if pid not in stored]
            document.done = document.chunk_count - len(document.todo)
        await self._advance(
            {
                d: {"status": Status.EMBEDDING, "chunk_count": d.chunk_count, "chunks_done": d.done,
                    "page_count": d.page_count, "title": d.title}
                for d in documents
            }
        )  # fmt: skip
        documents = sorted((d for d in documents if not d.dropped), key=lambda d: len(d.todo))
        await self._finish([d for d in documents if not d.todo], [])
        while batch := self._next_batch(documents):
            texts = [embedding_text(d.title, chunk) for d, chunk, _pid in batch]
            vectors = await self._embedder.embed(texts)
            await self._index.upsert(
                [
                    ChunkPoint(pid, vector.tolist(), self._encoder.document(text), _payload(d, chunk))
                    for (d, chunk, pid), vector, text in zip(batch, vectors, texts, strict=True)
                ]
            )
            touched = list(dict.fromkeys(d for d, _chunk, _pid in batch))
            for document, _chunk, _pid in batch:
                document.done += 1
            await self._finish([d for d in touched if not d.todo], [d for d in touched if d.todo])
        return failures

    def _next_batch(self, documents: list[_Document]) -> list[tuple[_Document, Chunk, str]]:
        """Up to `batch_size` chunks still to embed, taken from the documents in order."""
        batch: list[tuple[_Document, Chunk, str]] = []
        for document in documents:
            if document.dropped:
                continue
            take = document.todo[: self._limits.batch_size - len(batch)]
            del document.todo[: len(take)]
            batch += [(document, chunk, pid) for chunk, pid in take]
            if len(batch) >= self._limits.batch_size:
                break
        return batch

    async def _finish(self, complete: list[_Document], partial: list[_Document]) -> None:
        """Publish the complete documents and mark them INDEXED; record the progress of the others."""
        complete = [d for d in complete if not d.dropped]
        if complete:
            await self._index.publish({d.id: d.version for d in complete})
        now = utcnow()
        changes = {d: {"status": Status.INDEXED, "chunks_done": d.chunk_count, "indexed_at": now} for d in complete}
        changes.update({d: {"chunks_done": d.done} for d in partial if not d.dropped})
        await self._advance(changes)

    def _prepare_all(self, documents: list[_Document], contents: dict[str, bytes]) -> dict[_Document, Exception]:
        """Parse and chunk each document (on a worker thread); the documents that failed, with why."""
        failed: dict[_Document, Exception] = {}
        for document in documents:
            data = contents.get(document.id)
            if data is None:
                document.dropped = True  # deleted since it was read
                continue
            try:
                self._prepare(document, data)
            except Exception as exc:  # a ParseError fails the document; anything else is retried, alone
                failed[document] = exc
        return failed

    def _prepare(self, document: _Document, data: bytes) -> None:
        parsed = parse(data, document.row.media_type, max_pages=self._limits.max_pages)
        if not parsed.has_text:
            raise ParseError("no text could be extracted (a scanned PDF needs OCR, which is not supported)")
        title = document.row.title or parsed.title or UNTITLED
        title_tokens = min(self._embedder.count_tokens([title])[0] + 1, TITLE_TOKENS) if title else 0
        budget = self._limits.chunk_max_tokens - title_tokens
        overlap = min(self._limits.chunk_overlap_tokens, budget // 2 - 1)
        chunks = chunk_pages(parsed.pages, self._embedder.count_tokens, budget, overlap)
        if len(chunks) > self._limits.max_chunks:
            raise ParseError(f"the document splits into {len(chunks)} chunks; at most {self._limits.max_chunks}")
        document.title = title
        document.page_count = parsed.page_count
        document.chunk_count = len(chunks)
        document.version = version_of(document.id, document.job.generation)
        document.todo = [(chunk, point_id(document.version, chunk.index)) for chunk in chunks]


def _payload(document: _Document, chunk: Chunk) -> dict[str, Any]:
    row = document.row
    return {
        "document_id": row.id,
        "version": document.version,
        "chunk_index": chunk.index,
        "page": chunk.page,
        "text": chunk.text,
        "title": document.title,
        "specialty": row.specialty,
        "source_type": row.source_type,
        "tags": list(row.tags or []),
    }


class IndexingWorkers:
    """Background tasks taking batches of jobs off the queue until stopped."""

    def __init__(
        self,
        indexer: Indexer,
        queue: JobQueue,
        index: VectorIndex,
        store: SearchStore,
        count: int,
        renew_seconds: float,
        batch_documents: int = 1,
        maintain_quiet_seconds: float = 2.0,
    ) -> None:
        self._indexer = indexer
        self._renew_seconds = renew_seconds
        self._queue = queue
        self._index = index
        self._store = store
        self._count = count
        self._batch_documents = batch_documents
        self._quiet_seconds = maintain_quiet_seconds
        self._busy = 0  # workers inside a batch
        self._last_work = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the workers and the index upkeep."""
        self._tasks = [asyncio.create_task(self._work(n), name=f"indexer-{n}") for n in range(self._count)]
        self._tasks.append(asyncio.create_task(self._maintain(), name="index-upkeep"))

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
                # Whatever is waiting, up to the batch size: a backlog is indexed in full batches, a lone upload
                # right away.
                jobs = await self._queue.take(self._batch_documents)
            except Exception:
                log.exception("indexing queue unavailable; retrying")
                await asyncio.sleep(2.0)
                continue
            self._busy += 1
            try:
                await self._handle(jobs)
            finally:
                self._busy -= 1
                self._last_work = time.monotonic()

    async def _maintain(self) -> None:
        """Index upkeep once indexing has been quiet for a while, never in the middle of a backlog: the embedded
        engine builds its HNSW graph holding the GIL, which would pause the whole process for seconds."""
        while True:
            await asyncio.sleep(self._quiet_seconds)
            if self._busy or time.monotonic() - self._last_work < self._quiet_seconds:
                continue
            try:
                await self._index.maintain()
            except Exception:
                log.exception("index upkeep failed")

    async def _keep_claim(self, jobs: list[Job]) -> None:
        """Renew the jobs' claims while they run (parsing a large PDF can take longer than a claim lasts)."""
        while True:
            await asyncio.sleep(self._renew_seconds)
            try:
                await self._queue.renew(*jobs)
            except Exception as exc:  # a Redis blip: the next renewal may work; the claim outlasts a few misses
                log.warning("could not renew indexing jobs", extra={"error": type(exc).__name__})

    async def _handle(self, jobs: list[Job]) -> None:
        hopeless = [job for job in jobs if job.deliveries > MAX_ATTEMPTS]
        for job in hopeless:
            # Every worker that took this job died on it (out of memory on a hostile file, say): stop the crash loop.
            with contextlib.suppress(Exception):
                await self._store.advance(
                    job.document_id, job.generation, status=Status.FAILED,
                    error=f"indexing stopped {job.deliveries - 1} workers; the file may be hostile or too complex",
                )  # fmt: skip
                await self._queue.done(job)
        jobs = [job for job in jobs if job.deliveries <= MAX_ATTEMPTS]
        if not jobs:
            return
        heartbeat = asyncio.create_task(self._keep_claim(jobs))
        try:
            # A job that a worker died on runs alone, so only the culprit of a crashed batch ends FAILED.
            fresh = [job for job in jobs if job.deliveries == 1]
            failures = await self._run(fresh) if fresh else {}
            for job in jobs:
                if job.deliveries > 1:
                    failures.update(await self._run([job]))
            await asyncio.gather(*(self._retry(job, error) for job, error in failures.items()))
        finally:
            heartbeat.cancel()
        with contextlib.suppress(Exception):
            await self._queue.done(*jobs)

    async def _run(self, jobs: list[Job]) -> dict[Job, Exception]:
        """The indexer on the jobs; when a shared step fails, each document again alone, so one bad document
        cannot fail the others."""
        try:
            return await self._indexer.run(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                return {jobs[0]: exc}
            log.warning("indexing batch failed; indexing its documents one by one", extra={"error": repr(exc)})
            failures: dict[Job, Exception] = {}
            for job in jobs:
                failures.update(await self._run([job]))
            return failures

    async def _retry(self, job: Job, error: Exception) -> None:
        log.error("indexing failed", exc_info=error, extra={"document_id": job.document_id, "attempt": job.attempt})
        if job.attempt < MAX_ATTEMPTS:
            await asyncio.sleep(2.0**job.attempt)
            with contextlib.suppress(Exception):
                await self._queue.put(Job(job.document_id, job.generation, job.attempt + 1))
        else:
            with contextlib.suppress(Exception):
                await self._store.advance(
                    job.document_id, job.generation, status=Status.FAILED,
                    error=f"indexing failed {MAX_ATTEMPTS} times ({type(error).__name__}); try ReindexDocument",
                )  # fmt: skip
