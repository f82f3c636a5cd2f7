"""The search service's gRPC servicer: proto in, domain call, proto out; and its wiring (`build`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import grpc

from services.core import registry
from services.core.context import current_caller, require_role
from services.core.db import Database
from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import SEARCH
from services.core.pagination import decode_page_token, encode_page_token, page_size
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.status import ends_with_status
from services.core.timestamps import to_timestamp
from services.search.edge_index import EdgeIndex
from services.search.embeddings import Embedder
from services.search.index import Mode, VectorIndex
from services.search.indexing import Indexer, IndexingWorkers, PipelineLimits, ProgressBoard
from services.search.jobs import Job, JobQueue, MemoryJobQueue, RedisJobQueue
from services.search.knowledge import KnowledgeBase, Metadata, clean_metadata, normalise_label
from services.search.qdrant_server_index import ServerIndex
from services.search.retrieval import Retriever, clean_filter
from services.search.settings import SearchSettings, search_settings
from services.search.sparse import Bm25Encoder
from services.search.store import DocumentFilter, DocumentRow, SearchStore, Status
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger(__name__)
SPEC = registry.spec("search")
MIGRATIONS = Path(__file__).parent / "migrations"

_STATUS_TO_PROTO = {
    Status.PENDING: search_pb2.DOCUMENT_STATUS_PENDING,
    Status.PARSING: search_pb2.DOCUMENT_STATUS_PARSING,
    Status.EMBEDDING: search_pb2.DOCUMENT_STATUS_EMBEDDING,
    Status.INDEXED: search_pb2.DOCUMENT_STATUS_INDEXED,
    Status.FAILED: search_pb2.DOCUMENT_STATUS_FAILED,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}
_MODE_FROM_PROTO = {
    search_pb2.SEARCH_MODE_UNSPECIFIED: Mode.HYBRID,
    search_pb2.SEARCH_MODE_HYBRID: Mode.HYBRID,
    search_pb2.SEARCH_MODE_DENSE: Mode.DENSE,
    search_pb2.SEARCH_MODE_SPARSE: Mode.SPARSE,
}
_MODE_TO_PROTO = {Mode.HYBRID: search_pb2.SEARCH_MODE_HYBRID, Mode.DENSE: search_pb2.SEARCH_MODE_DENSE,
                  Mode.SPARSE: search_pb2.SEARCH_MODE_SPARSE}  # fmt: skip


def document_message(row: DocumentRow) -> search_pb2.Document:
    """The proto form of a document."""
    return search_pb2.Document(
        id=row.id,
        metadata=search_pb2.DocumentMetadata(
            title=row.title,
            source_type=row.source_type,
            specialty=row.specialty,
            tags=list(row.tags or []),
            file_name=row.file_name,
            media_type=row.media_type,
        ),
        size_bytes=row.size_bytes,
        content_sha256=row.content_sha256,
        status=_STATUS_TO_PROTO.get(Status(row.status), search_pb2.DOCUMENT_STATUS_UNSPECIFIED),
        error=row.error,
        chunk_count=row.chunk_count,
        page_count=row.page_count,
        uploader_id=row.uploader_id,
        create_time=to_timestamp(row.created_at),
        update_time=to_timestamp(row.updated_at),
        index_time=to_timestamp(row.indexed_at),
    )


def _metadata(message: search_pb2.DocumentMetadata) -> Metadata:
    return Metadata(
        title=message.title, source_type=message.source_type, specialty=message.specialty, tags=list(message.tags),
        file_name=message.file_name, media_type=message.media_type,
    )  # fmt: skip


def _too_large(what: str, limit: int) -> ServiceError:
    return ServiceError(
        Reason.PAYLOAD_TOO_LARGE, f"{what} is larger than {limit:,} bytes", metadata={"limit_bytes": str(limit)}
    )


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """SearchService over the knowledge base and retrieval use cases."""

    def __init__(self, kb: KnowledgeBase, retriever: Retriever, settings: SearchSettings) -> None:
        self._kb = kb
        self._retriever = retriever
        self._settings = settings
        self._upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)

    async def UploadDocument(
        self, request_iterator: AsyncIterator[search_pb2.UploadDocumentRequest], context: grpc.aio.ServicerContext
    ) -> search_pb2.UploadDocumentResponse:
        caller = require_role("admin")
        if self._upload_slots.locked():
            raise ServiceError(
                Reason.RATE_LIMITED, "too many uploads in progress; try again shortly", retry_after_seconds=5.0
            )
        async with self._upload_slots:
            row = await self._kb.add(caller, *await self._receive(request_iterator))
        return search_pb2.UploadDocumentResponse(document=document_message(row))

    async def _receive(self, request_iterator) -> tuple[Metadata, bytes]:
        """The metadata and bytes of an upload stream, within the size limits."""
        metadata: search_pb2.DocumentMetadata | None = None
        data = bytearray()
        async for message in request_iterator:
            kind = message.WhichOneof("payload")
            if metadata is None:
                if kind != "metadata":
                    raise invalid("metadata", "the first message must carry the metadata")
                metadata = message.metadata
                clean_metadata(_metadata(metadata))  # refuse a bad media type before megabytes arrive
                continue
            if kind != "chunk":
                raise invalid("metadata", "only the first message may carry metadata")
            if len(message.chunk) > SEARCH.upload_piece_bytes:
                raise invalid("chunk", f"at most {SEARCH.upload_piece_bytes:,} bytes per message")
            data += message.chunk
            if len(data) > self._settings.max_upload_bytes:
                raise _too_large("the upload", self._settings.max_upload_bytes)
        if metadata is None:
            raise invalid("metadata", "the stream was empty")
        return _metadata(metadata), bytes(data)

    async def CreateDocument(
        self, request: search_pb2.CreateDocumentRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.CreateDocumentResponse:
        caller = require_role("admin")
        kind = request.WhichOneof("content")
        if kind is None:
            raise invalid("content", "set text or data")
        data = request.text.encode() if kind == "text" else request.data
        if len(data) > self._settings.max_create_bytes:
            raise _too_large("the document", self._settings.max_create_bytes)
        meta = _metadata(request.metadata)
        if kind == "text" and not meta.media_type and not meta.file_name:
            meta = Metadata(meta.title, meta.source_type, meta.specialty, meta.tags, meta.file_name, "text/plain")
        row = await self._kb.add(caller, meta, data)
        return search_pb2.CreateDocumentResponse(document=document_message(row))

    async def GetDocument(
        self, request: search_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.GetDocumentResponse:
        current_caller()
        return search_pb2.GetDocumentResponse(document=document_message(await self._kb.get(request.document_id)))

    async def ListDocuments(
        self, request: search_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.ListDocumentsResponse:
        current_caller()
        size = page_size(request.page_size, SEARCH.list_documents)
        if request.status and request.status not in _STATUS_FROM_PROTO:
            raise invalid("status", "unknown status")
        where = DocumentFilter(
            status=_STATUS_FROM_PROTO.get(request.status),
            specialty=normalise_label(request.specialty) or None,
            source_type=normalise_label(request.source_type) or None,
        )
        query = {"status": where.status, "specialty": where.specialty, "source_type": where.source_type}
        cursor = decode_page_token(request.page_token, query)
        after = None
        if cursor is not None:
            try:
                after = (datetime.fromisoformat(cursor[0]), str(cursor[1]))
            except (ValueError, IndexError, TypeError):
                raise invalid("page_token", "corrupt cursor") from None
        page = await self._kb.list(size, after, where)
        token = ""
        if page.has_more and page.documents:
            last = page.documents[-1]
            token = encode_page_token([last.created_at.isoformat(), last.id], query)
        return search_pb2.ListDocumentsResponse(
            documents=[document_message(d) for d in page.documents], next_page_token=token, total_size=page.total
        )

    async def DeleteDocument(
        self, request: search_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.DeleteDocumentResponse:
        require_role("admin")
        await self._kb.delete(request.document_id)
        return search_pb2.DeleteDocumentResponse()

    async def ReindexDocument(
        self, request: search_pb2.ReindexDocumentRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.ReindexDocumentResponse:
        require_role("admin")
        row = await self._kb.reindex(request.document_id)
        return search_pb2.ReindexDocumentResponse(document=document_message(row))

    @ends_with_status(search_pb2.WatchDocumentResponse)
    async def WatchDocument(
        self, request: search_pb2.WatchDocumentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[search_pb2.WatchDocumentResponse]:
        current_caller()
        async for progress in self._kb.watch(request.document_id):
            yield search_pb2.WatchDocumentResponse(
                document=document_message(progress.document),
                chunks_done=progress.chunks_done,
                chunks_total=progress.chunks_total,
            )

    async def Search(
        self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.SearchResponse:
        current_caller()
        if request.mode not in _MODE_FROM_PROTO:
            raise invalid("mode", "unknown search mode")
        filters = request.filters
        chunks = clean_filter(filters.specialty, filters.source_type, list(filters.document_ids), list(filters.tags))
        # `limit` is page_size's deprecated alias from the first release, read only when page_size is 0.
        size = request.page_size or request.limit
        found = await self._retriever.search(
            request.query, _MODE_FROM_PROTO[request.mode], chunks, size, request.page_token
        )
        return search_pb2.SearchResponse(
            results=[
                search_pb2.SearchResult(
                    document_id=r.document_id,
                    title=r.title,
                    chunk_id=r.chunk_id,
                    snippet=r.snippet,
                    highlights=[search_pb2.Highlight(start=s, end=e) for s, e in r.highlights],
                    page=r.page,
                    relevance_score=r.score,
                    specialty=r.specialty,
                    source_type=r.source_type,
                )
                for r in found.results
            ],
            mode=_MODE_TO_PROTO[found.mode],
            next_page_token=found.next_page_token,
        )


def _vector_index(runtime: Runtime, settings: SearchSettings) -> VectorIndex:
    core = runtime.settings
    if core.qdrant_url:
        return ServerIndex(core.qdrant_url, settings.collection)
    if core.database_url:
        # Mesh mode on the embedded engine: the index lives in this process's DATA_DIR and is locked there, so only
        # one search process can serve it; replicas with their own DATA_DIR would each see part of the corpus.
        if core.environment == "production":
            raise RuntimeError("QDRANT_URL is required in production mesh mode (search replicas share one index)")
        log.warning("mesh mode without QDRANT_URL: run exactly one search process (embedded index in DATA_DIR)")
    return EdgeIndex(core.data_dir / "qdrant" / settings.collection)


def _job_queue(runtime: Runtime, settings: SearchSettings) -> JobQueue:
    if runtime.settings.redis_url:
        key = f"{runtime.settings.redis_key_prefix}search:index-jobs"
        return RedisJobQueue(runtime.settings.redis_url, key, settings.job_claim_idle_seconds)
    return MemoryJobQueue(settings.queue_max_pending)


async def build(runtime: Runtime) -> Hosted:
    """The search service, ready to add to a server."""
    settings = search_settings()
    db = Database("search", runtime.settings)
    await db.migrate(MIGRATIONS)
    store = SearchStore(db)
    index = _vector_index(runtime, settings)
    await index.open()
    embedder = Embedder(settings.embed_threads, settings.embed_batch_size)
    query_embedder = Embedder(settings.query_embed_threads, batch_size=1)
    encoder = Bm25Encoder(settings.bm25_k, settings.bm25_b, settings.bm25_avg_len)
    queue = _job_queue(runtime, settings)
    board = ProgressBoard()
    limits = PipelineLimits(
        settings.max_pages, settings.max_chunks, settings.chunk_max_tokens, settings.chunk_overlap_tokens,
        settings.index_batch_chunks, settings.index_batch_bytes,
    )  # fmt: skip
    indexer = Indexer(store, index, embedder, encoder, limits, board)
    renew = settings.job_claim_idle_seconds / 4
    workers = IndexingWorkers(
        indexer, queue, index, store, settings.index_workers, renew, settings.index_batch_documents,
        settings.index_maintain_quiet_seconds,
    )  # fmt: skip
    kb = KnowledgeBase(
        store, index, queue, board, runtime.audit("search"), watch_poll_seconds=settings.watch_poll_seconds
    )
    retriever = Retriever(
        index, query_embedder, encoder, prefetch=settings.prefetch_limit, rrf_k=settings.rrf_k,
        snippet_chars=settings.snippet_chars,
    )  # fmt: skip
    if isinstance(queue, MemoryJobQueue):
        # The in-process queue died with the last process: rebuild it from the database.
        for document_id, generation in await store.unfinished():
            with contextlib.suppress(Exception):
                await queue.put(Job(document_id, generation))
    workers.start()
    servicer = SearchServicer(kb, retriever, settings)

    async def close() -> None:
        await workers.stop()
        await queue.close()
        await index.close()
        await db.close()

    return Hosted(
        SPEC,
        lambda server: search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server),
        probe=db.ping,
        close=close,
    )
