"""The knowledge base's use cases: add, read, list, delete, reindex and watch documents.

Writes are for admins (the servicer checks roles); everything here validates input, keeps the database and the
index in step, queues indexing jobs and records audit events (never document text or titles).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.errors import FieldViolation, Reason, ServiceError, invalid, not_found
from services.core.limits import SEARCH
from services.search.index import VectorIndex
from services.search.indexing import ProgressBoard
from services.search.jobs import Job, JobQueue, QueueFull
from services.search.parsing import UnsupportedMediaType, media_type_for
from services.search.store import (
    FINAL_STATUSES,
    DocumentFilter,
    DocumentPage,
    DocumentRow,
    DuplicateContent,
    SearchStore,
    Status,
)

SOURCE_TYPES = ("textbook", "journal", "guideline", "drug_reference", "note", "web", "other")
_LABEL = re.compile(rf"^[a-z0-9][a-z0-9 _.\-/]{{0,{SEARCH.label_chars - 1}}}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Metadata:
    """What an uploader says about a document, before validation."""

    title: str = ""
    source_type: str = ""
    specialty: str = ""
    tags: list[str] = field(default_factory=list)
    file_name: str = ""
    media_type: str = ""


@dataclass(frozen=True)
class Progress:
    """One WatchDocument update."""

    document: DocumentRow
    chunks_done: int
    chunks_total: int


def normalise_label(value: str) -> str:
    """A specialty, source type or tag as stored: lower case, single spaces. "+" means a space (labels never hold
    one): browsers encode spaces in query strings that way, and Envoy's transcoder passes "+" through."""
    return " ".join(value.replace("+", " ").split()).lower()


def _label(value: str, path: str) -> str:
    value = normalise_label(value)
    if value and not _LABEL.match(value):
        raise invalid(path, f"1-{SEARCH.label_chars} characters: letters, digits, space, _ . - /")
    return value


def clean_metadata(meta: Metadata, prefix: str = "metadata") -> Metadata:
    """Validated, normalised metadata: labels lower-cased, the media type resolved, the file name as default title."""
    title = " ".join(meta.title.split())
    file_name = meta.file_name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    if len(title) > SEARCH.title_chars:
        raise invalid(f"{prefix}.title", f"at most {SEARCH.title_chars} characters")
    if len(file_name) > SEARCH.file_name_chars:
        raise invalid(f"{prefix}.file_name", f"at most {SEARCH.file_name_chars} characters")
    source_type = _label(meta.source_type, f"{prefix}.source_type") or "other"
    if source_type not in SOURCE_TYPES:
        raise invalid(f"{prefix}.source_type", f"one of {', '.join(SOURCE_TYPES)}")
    specialty = _label(meta.specialty, f"{prefix}.specialty")
    if len(meta.tags) > SEARCH.tags:
        raise invalid(f"{prefix}.tags", f"at most {SEARCH.tags} tags")
    tags = sorted({_label(t, f"{prefix}.tags") for t in meta.tags} - {""})
    try:
        media_type = media_type_for(meta.media_type, file_name)
    except UnsupportedMediaType as exc:
        raise ServiceError(
            Reason.UNSUPPORTED_MEDIA_TYPE, str(exc),
            violations=[FieldViolation(f"{prefix}.media_type", str(exc), "UNSUPPORTED_MEDIA_TYPE")],
        ) from None  # fmt: skip
    title = title or file_name  # empty: the indexer takes the file's own title (HTML <title>, PDF info, # heading)
    return Metadata(title, source_type, specialty, tags, file_name, media_type)


def check_document_id(document_id: str, path: str = "document_id") -> str:
    """A syntactically valid document id (lower-case UUID)."""
    document_id = document_id.strip().lower()
    if not document_id:
        raise invalid(path, "required")
    if not _UUID.match(document_id):
        raise invalid(path, "not a document id")
    return document_id


class KnowledgeBase:
    """Documents and their indexing."""

    def __init__(
        self,
        store: SearchStore,
        index: VectorIndex,
        queue: JobQueue,
        board: ProgressBoard,
        audit: AuditClient,
        *,
        watch_poll_seconds: float,
    ) -> None:
        self._store = store
        self._index = index
        self._queue = queue
        self._board = board
        self._audit = audit
        self._watch_poll = watch_poll_seconds

    async def add(self, caller: Caller, meta: Metadata, data: bytes) -> DocumentRow:
        """Store a document and queue it for indexing; DUPLICATE_DOCUMENT names the earlier copy."""
        cleaned = clean_metadata(meta)
        if not data:
            raise invalid("content", "the document is empty")
        digest = hashlib.sha256(data).hexdigest()
        row = DocumentRow(
            title=cleaned.title, source_type=cleaned.source_type, specialty=cleaned.specialty, tags=cleaned.tags,
            file_name=cleaned.file_name, media_type=cleaned.media_type, size_bytes=len(data), content_sha256=digest,
            uploader_id=caller.user_id, status=Status.PENDING, error="", chunk_count=0, chunks_done=0, page_count=0,
            generation=1,
        )  # fmt: skip
        try:
            row = await self._store.create(row, data)
        except DuplicateContent as dup:
            await self._audit.record(
                "search.document.create", success=False, failure_reason=Reason.DUPLICATE_DOCUMENT,
                resource_type="document", resource_id=dup.existing_id,
            )  # fmt: skip
            raise ServiceError(
                Reason.DUPLICATE_DOCUMENT,
                f"the same content was uploaded before as document {dup.existing_id}",
                metadata={"document_id": dup.existing_id},
            ) from None
        await self._enqueue(row, undo_on_failure=True)
        await self._audit.record(
            "search.document.create", resource_type="document", resource_id=row.id,
            metadata={"media_type": row.media_type, "size_bytes": str(row.size_bytes), "source_type": row.source_type},
        )  # fmt: skip
        return row

    async def _enqueue(self, row: DocumentRow, *, undo_on_failure: bool) -> None:
        try:
            await self._queue.put(Job(row.id, row.generation))
            return
        except QueueFull:
            error = ServiceError(
                Reason.RATE_LIMITED, "the indexing queue is full; try again later", retry_after_seconds=30.0
            )
        except Exception:
            error = ServiceError(
                Reason.BACKEND_UNAVAILABLE, "the indexing queue is unavailable; try again", retry_after_seconds=2.0
            )
        if undo_on_failure:  # a document nobody will index must not block its own re-upload as a duplicate
            await self._store.delete(row.id)
        raise error

    async def get(self, document_id: str) -> DocumentRow:
        """One document; NOT_FOUND when it does not exist."""
        row = await self._store.get(check_document_id(document_id))
        if row is None:
            raise not_found("document", document_id)
        return row

    async def list(self, size: int, after: tuple[datetime, str] | None, where: DocumentFilter) -> DocumentPage:
        """Documents newest first."""
        return await self._store.list(size, after, where)

    async def delete(self, document_id: str) -> None:
        """Remove a document's chunks from the index, then its rows."""
        row = await self.get(document_id)
        await self._index.delete_document(row.id)
        await self._store.delete(row.id)
        self._board.changed(row.id)
        await self._audit.record(
            "search.document.delete", resource_type="document", resource_id=row.id,
            metadata={"chunk_count": str(row.chunk_count)},
        )  # fmt: skip

    async def reindex(self, document_id: str) -> DocumentRow:
        """Run the pipeline again; the previous chunks stay searchable until the new ones are published."""
        row = await self.get(document_id)
        restarted = await self._store.restart(row.id)
        if restarted is None:
            raise not_found("document", document_id)
        await self._enqueue(restarted, undo_on_failure=False)
        self._board.changed(row.id)
        await self._audit.record(
            "search.document.reindex", resource_type="document", resource_id=row.id,
            metadata={"generation": str(restarted.generation)},
        )  # fmt: skip
        return restarted

    async def watch(self, document_id: str) -> AsyncIterator[Progress]:
        """The document's state now, then every change, until INDEXED or FAILED (or it is deleted)."""
        row = await self.get(document_id)
        last: tuple[object, ...] | None = None
        while True:
            state = (row.status, row.chunks_done, row.chunk_count, row.generation, row.error)
            if state != last:
                last = state
                yield Progress(row, row.chunks_done, row.chunk_count)
            if row.status in FINAL_STATUSES:
                return
            await self._board.wait(row.id, self._watch_poll)
            fresh = await self._store.get(row.id)
            if fresh is None:
                raise not_found("document", document_id)
            row = fresh
