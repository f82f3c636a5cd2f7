"""The search service's tables and queries (SQLAlchemy 2, async): documents and their original bytes."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text, and_, func, or_, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.core.db import Database, UTCDateTime, rows_matched, utcnow


class Status(StrEnum):
    """Where a document is in the indexing pipeline."""

    PENDING = "PENDING"
    PARSING = "PARSING"
    EMBEDDING = "EMBEDDING"
    INDEXED = "INDEXED"
    FAILED = "FAILED"


FINAL_STATUSES = frozenset({Status.INDEXED, Status.FAILED})


class Base(DeclarativeBase):
    """Declarative base of the search schema."""


class DocumentRow(Base):
    """A knowledge base document and its indexing state."""

    __tablename__ = "documents"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    title: Mapped[str] = mapped_column(String(500))
    source_type: Mapped[str] = mapped_column(String(32), default="")
    specialty: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    file_name: Mapped[str] = mapped_column(String(255), default="")
    media_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=Status.PENDING)
    error: Mapped[str] = mapped_column(Text, default="")
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    page_count: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by every reindex: a worker holding an older generation stops instead of overwriting newer work.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    uploader_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    indexed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_documents_created", "created_at", "id"),
        Index("ix_documents_status", "status"),
        Index("ix_documents_specialty", "specialty"),
    )


class ContentRow(Base):
    """The uploaded bytes, kept so a document can be reindexed and an interrupted job resumed."""

    __tablename__ = "document_contents"

    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class DuplicateContent(Exception):
    """A document with the same SHA-256 exists."""

    def __init__(self, existing_id: str) -> None:
        super().__init__(existing_id)
        self.existing_id = existing_id


@dataclass(frozen=True)
class DocumentPage:
    """One page of documents plus whether more follow, and how many match in all."""

    documents: list[DocumentRow]
    has_more: bool
    total: int


@dataclass(frozen=True)
class DocumentFilter:
    """Restrictions of ListDocuments."""

    status: str | None = None
    specialty: str | None = None
    source_type: str | None = None


class SearchStore:
    """Queries of the search service; each method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, row: DocumentRow, data: bytes) -> DocumentRow:
        """Insert a document with its bytes; DuplicateContent when the same bytes were stored before."""
        try:
            async with self.db.session() as s, s.begin():
                s.add(row)
                await s.flush()
                s.add(ContentRow(document_id=row.id, data=data))
        except IntegrityError:
            existing = await self.by_sha256(row.content_sha256)
            if existing is None:  # deleted in between: a genuine integrity problem
                raise
            raise DuplicateContent(existing.id) from None
        return row

    async def by_sha256(self, digest: str) -> DocumentRow | None:
        """The document with these bytes."""
        async with self.db.session() as s:
            return await s.scalar(select(DocumentRow).where(DocumentRow.content_sha256 == digest))

    async def get(self, document_id: str) -> DocumentRow | None:
        """The document with this id."""
        async with self.db.session() as s:
            return await s.get(DocumentRow, document_id)

    async def get_many(self, document_ids: Collection[str]) -> dict[str, DocumentRow]:
        """The documents with these ids, by id (missing ones left out)."""
        async with self.db.session() as s:
            rows = await s.scalars(select(DocumentRow).where(DocumentRow.id.in_(list(document_ids))))
            return {row.id: row for row in rows}

    async def content(self, document_id: str) -> bytes | None:
        """The document's original bytes."""
        return (await self.contents([document_id])).get(document_id)

    async def contents(self, document_ids: Collection[str]) -> dict[str, bytes]:
        """The original bytes of these documents, by id (deleted ones left out)."""
        async with self.db.session() as s:
            rows = await s.execute(
                select(ContentRow.document_id, ContentRow.data).where(ContentRow.document_id.in_(list(document_ids)))
            )
            return {r.document_id: r.data for r in rows}

    async def delete(self, document_id: str) -> bool:
        """Remove a document and its bytes; False when it did not exist."""
        async with self.db.session() as s, s.begin():
            await s.execute(sql_delete(ContentRow).where(ContentRow.document_id == document_id))
            result = await s.execute(sql_delete(DocumentRow).where(DocumentRow.id == document_id))
            return rows_matched(result) == 1

    async def restart(self, document_id: str) -> DocumentRow | None:
        """Back to PENDING with a new generation (reindex); the new row, or None when it does not exist."""
        async with self.db.session() as s, s.begin():
            row = await s.get(DocumentRow, document_id, with_for_update=True)
            if row is None:
                return None
            row.generation += 1
            row.status = Status.PENDING
            row.error = ""
            row.chunks_done = 0
            row.chunk_count = 0
            row.updated_at = utcnow()
        return row

    async def advance(self, document_id: str, generation: int, **values: object) -> bool:
        """Set columns of the document while it is still at `generation`; False when it was deleted or
        restarted meanwhile (the caller's job is stale)."""
        return bool(await self.advance_many({(document_id, generation): values}))

    async def advance_many(self, changes: Mapping[tuple[str, int], Mapping[str, object]]) -> set[str]:
        """`advance` for several documents ({(id, generation): columns}) in one transaction; the ids still at
        their generation (the others are stale)."""
        current: set[str] = set()
        now = utcnow()
        async with self.db.session() as s, s.begin():
            for (document_id, generation), values in changes.items():
                result = await s.execute(
                    sql_update(DocumentRow)
                    .where(DocumentRow.id == document_id, DocumentRow.generation == generation)
                    .values(**values, updated_at=now)
                )
                if rows_matched(result) == 1:
                    current.add(document_id)
        return current

    async def unfinished(self) -> list[tuple[str, int]]:
        """(id, generation) of every document still waiting for or inside the pipeline."""
        async with self.db.session() as s:
            query = select(DocumentRow.id, DocumentRow.generation).where(
                DocumentRow.status.in_([Status.PENDING, Status.PARSING, Status.EMBEDDING])
            )
            return [(r.id, r.generation) for r in await s.execute(query.order_by(DocumentRow.created_at))]

    async def list(self, limit: int, after: tuple[datetime, str] | None, where: DocumentFilter) -> DocumentPage:
        """Documents newest first, after the (created_at, id) cursor."""
        conditions = []
        if where.status:
            conditions.append(DocumentRow.status == where.status)
        if where.specialty:
            conditions.append(DocumentRow.specialty == where.specialty)
        if where.source_type:
            conditions.append(DocumentRow.source_type == where.source_type)
        query = select(DocumentRow).where(*conditions)
        if after is not None:
            created, doc_id = after
            query = query.where(
                or_(DocumentRow.created_at < created, and_(DocumentRow.created_at == created, DocumentRow.id < doc_id))
            )
        query = query.order_by(DocumentRow.created_at.desc(), DocumentRow.id.desc()).limit(limit + 1)
        async with self.db.session() as s:
            rows = list(await s.scalars(query))
            total = int(await s.scalar(select(func.count()).select_from(DocumentRow).where(*conditions)) or 0)
        return DocumentPage(rows[:limit], len(rows) > limit, total)
