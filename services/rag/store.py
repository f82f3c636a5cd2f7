"""The rag service's tables and queries (SQLAlchemy 2, async): conversations and their messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.core.db import Database, UTCDateTime, rows_matched, utcnow

# SQLite only auto-increments an INTEGER PRIMARY KEY.
_SEQUENCE = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    """Declarative base of the rag schema."""


class ConversationRow(Base):
    """A conversation owned by one account."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    owner_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    answer_style: Mapped[str] = mapped_column(String(16), default="")
    specialty: Mapped[str] = mapped_column(String(64), default="")
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_conversations_owner_updated", "owner_id", "updated_at", "id"),)


class MessageRow(Base):
    """One question or answer. `seq` orders messages (timestamps can tie); `client_message_id` makes a question
    idempotent: one question and one answer per (conversation, key)."""

    __tablename__ = "messages"

    seq: Mapped[int] = mapped_column(_SEQUENCE, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, default=lambda: str(uuid.uuid4()))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))  # "user" or "assistant"
    content: Mapped[str] = mapped_column(Text)
    citations: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    model_used: Mapped[str] = mapped_column(String(200), default="")
    phi_detected: Mapped[bool] = mapped_column(Boolean, default=False)
    phi_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    client_message_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    routing_reason: Mapped[str] = mapped_column(String(64), default="")
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # Questions only: until when the worker that stored it owns writing its answer (see RagStore.claim_question).
    answer_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_messages_conversation_seq", "conversation_id", "seq"),
        Index("uq_messages_client_id", "conversation_id", "client_message_id", "role", unique=True),
    )


@dataclass(frozen=True)
class Page:
    """Rows of one page plus whether more follow."""

    rows: list[Any]
    has_more: bool


class ConversationGone(Exception):
    """The conversation was deleted while a question was being answered."""


class RagStore:
    """Queries of the rag service; each method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # conversations

    async def create_conversation(self, row: ConversationRow) -> ConversationRow:
        """Insert a conversation."""
        async with self.db.session() as s, s.begin():
            s.add(row)
        return row

    async def conversation(self, conversation_id: str, owner_id: str) -> ConversationRow | None:
        """The conversation if it exists and belongs to `owner_id`."""
        async with self.db.session() as s:
            return await s.scalar(
                select(ConversationRow).where(
                    ConversationRow.id == conversation_id, ConversationRow.owner_id == owner_id
                )
            )

    async def update_conversation(self, conversation_id: str, owner_id: str, **values: Any) -> ConversationRow | None:
        """Set columns (and updated_at) of an owned conversation; None when it is not there."""
        async with self.db.session() as s, s.begin():
            row = await s.scalar(
                select(ConversationRow)
                .where(ConversationRow.id == conversation_id, ConversationRow.owner_id == owner_id)
                .with_for_update()
            )
            if row is None:
                return None
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
        return row

    async def delete_conversation(self, conversation_id: str, owner_id: str) -> bool:
        """Delete an owned conversation and its messages; False when it is not there."""
        async with self.db.session() as s, s.begin():
            owned = select(ConversationRow.id).where(
                ConversationRow.id == conversation_id, ConversationRow.owner_id == owner_id
            )
            if await s.scalar(owned) is None:
                return False
            await s.execute(delete(MessageRow).where(MessageRow.conversation_id == conversation_id))
            await s.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))
        return True

    async def list_conversations(
        self, owner_id: str, limit: int, after: tuple[datetime, str] | None, include_archived: bool
    ) -> Page:
        """Owned conversations, most recently updated first, after the (updated_at, id) cursor."""
        query = (
            select(ConversationRow)
            .where(ConversationRow.owner_id == owner_id)
            .order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
            .limit(limit + 1)
        )
        if not include_archived:
            query = query.where(ConversationRow.archived.is_(False))
        if after is not None:
            moment, ident = after
            query = query.where(
                or_(
                    ConversationRow.updated_at < moment,
                    and_(ConversationRow.updated_at == moment, ConversationRow.id < ident),
                )
            )
        async with self.db.session() as s:
            rows = list(await s.scalars(query))
        return Page(rows[:limit], len(rows) > limit)

    # messages

    async def list_messages(self, conversation_id: str, limit: int, before_seq: int | None) -> Page:
        """Messages of a conversation, most recent first, older than `before_seq`."""
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id)
            .order_by(MessageRow.seq.desc())
            .limit(limit + 1)
        )
        if before_seq is not None:
            query = query.where(MessageRow.seq < before_seq)
        async with self.db.session() as s:
            rows = list(await s.scalars(query))
        return Page(rows[:limit], len(rows) > limit)

    async def recent_messages(
        self, conversation_id: str, limit: int, before_seq: int | None = None
    ) -> list[MessageRow]:
        """The last `limit` messages before `before_seq`, oldest first (prompt history)."""
        if limit <= 0:
            return []
        page = await self.list_messages(conversation_id, limit, before_seq)
        return list(reversed(page.rows))

    async def message_pair(
        self, conversation_id: str, client_message_id: str
    ) -> tuple[MessageRow | None, MessageRow | None]:
        """The question and answer stored under a client message id (either may be None)."""
        async with self.db.session() as s:
            rows = list(
                await s.scalars(
                    select(MessageRow).where(
                        MessageRow.conversation_id == conversation_id, MessageRow.client_message_id == client_message_id
                    )
                )
            )
        question = next((r for r in rows if r.role == "user"), None)
        answer = next((r for r in rows if r.role == "assistant"), None)
        return question, answer

    async def add_message(self, row: MessageRow) -> MessageRow | None:
        """Insert a message and count it on its conversation. None when the client message id is taken (another
        request stored it first); ConversationGone when the conversation no longer exists."""
        try:
            async with self.db.session() as s, s.begin():
                if not await _touch(s, row.conversation_id):
                    raise ConversationGone(row.conversation_id)
                s.add(row)
        except IntegrityError:
            return None
        return row

    async def claim_question(self, seq: int, lease_until: datetime) -> bool:
        """Take over answering a stored question whose previous worker's lease ran out (it crashed or failed);
        False when another worker holds it or took it first."""
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(MessageRow)
                .where(MessageRow.seq == seq, MessageRow.answer_lease_until < utcnow())
                .values(answer_lease_until=lease_until)
            )
            return rows_matched(result) == 1

    async def renew_lease(self, seq: int, lease_until: datetime) -> None:
        """Extend the lease of the worker writing this question's answer."""
        async with self.db.session() as s, s.begin():
            await s.execute(update(MessageRow).where(MessageRow.seq == seq).values(answer_lease_until=lease_until))

    async def release_question(self, seq: int) -> None:
        """End the lease on a question whose answer failed, so a retry can take it over at once."""
        async with self.db.session() as s, s.begin():
            await s.execute(update(MessageRow).where(MessageRow.seq == seq).values(answer_lease_until=utcnow()))


async def _touch(session: AsyncSession, conversation_id: str) -> bool:
    """Count one more message and bump updated_at; False when the conversation is gone."""
    result = await session.execute(
        update(ConversationRow)
        .where(ConversationRow.id == conversation_id)
        .values(message_count=ConversationRow.message_count + 1, updated_at=utcnow())
    )
    return rows_matched(result) == 1
