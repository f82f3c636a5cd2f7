"""The audit service's tables and queries (SQLAlchemy 2, async).

`ledger` holds one row per event: its fields, its leaf hash and its chain hash, numbered by a gapless sequence.
`ledger_head` is the single row every append locks: tree size, last chain hash and the Merkle frontier, so
concurrent consumers (several audit processes) take turns and can never fork the chain or leave a gap.
`merkle_nodes` keeps the roots of complete subtrees at every 8th level (see merkle.py), `checkpoints` the signed
tree heads, `signing_keys` the checkpoint keys. Every table but the head is append-only: on PostgreSQL (and
SQLite) triggers refuse UPDATE, DELETE and TRUNCATE (see migrations/versions/0001_initial.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.audit.events import EventQuery
from services.core.db import Database, UTCDateTime, utcnow

# On PostgreSQL the action column sorts bytewise, so `LIKE 'prefix%'` uses its index.
ACTION_TYPE = String(128).with_variant(String(128, collation="C"), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of the audit schema."""


class LedgerRow(Base):
    """One committed event."""

    __tablename__ = "ledger"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    event_time_us: Mapped[int] = mapped_column(BigInteger)
    commit_time_us: Mapped[int] = mapped_column(BigInteger)
    actor_id: Mapped[str] = mapped_column(String(128))
    actor_email: Mapped[str] = mapped_column(String(254))
    actor_role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(ACTION_TYPE)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[int] = mapped_column(SmallInteger)
    failure_reason: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(128))
    client_ip: Mapped[str] = mapped_column(String(64))
    user_agent: Mapped[str] = mapped_column(String(512))
    service: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(256))
    metadata_json: Mapped[str] = mapped_column("metadata", Text)
    appended_by: Mapped[str] = mapped_column(String(128))
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)
    chain_hash: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        Index("ix_ledger_actor", "actor_id", "sequence"),
        Index("ix_ledger_action", "action", "sequence"),
        Index("ix_ledger_resource", "resource_type", "resource_id", "sequence"),
        Index("ix_ledger_outcome", "outcome", "sequence"),
        Index("ix_ledger_event_time", "event_time_us", "sequence"),
        Index("ix_ledger_request", "request_id"),
    )


# The ledger's columns in canonical order (services/audit/ledger_proofs.py); `scan` returns them in this order.
CANONICAL_COLUMNS = (
    "sequence", "event_id", "event_time_us", "commit_time_us", "actor_id", "actor_email", "actor_role", "action",
    "resource_type", "resource_id", "outcome", "failure_reason", "request_id", "client_ip", "user_agent", "service",
    "method", "metadata", "appended_by",
)  # fmt: skip


LEDGER_COLUMNS = (*CANONICAL_COLUMNS, "leaf_hash", "chain_hash")


class HeadRow(Base):
    """The ledger's single head row: what the next append continues from."""

    __tablename__ = "ledger_head"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    tree_size: Mapped[int] = mapped_column(BigInteger)
    chain_hash: Mapped[bytes] = mapped_column(LargeBinary)
    frontier: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MerkleNodeRow(Base):
    """The root of a complete subtree at a stored level (8, 16, ...): leaves [index * 2**level, ...)."""

    __tablename__ = "merkle_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class CheckpointRow(Base):
    """A signed tree head."""

    __tablename__ = "checkpoints"

    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    timestamp_us: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(200))
    signature: Mapped[bytes] = mapped_column(LargeBinary)


class SigningKeyRow(Base):
    """A checkpoint signing key; the private half PEM-encoded (encrypted when a passphrase is set)."""

    __tablename__ = "signing_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    private_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


@dataclass(frozen=True)
class Head:
    """The head row's values."""

    tree_size: int
    chain_hash: bytes
    frontier: bytes


# Bulk writes go to the tables (Core); declarative types `__table__` as the wider FromClause.
_LEDGER = cast(Table, LedgerRow.__table__)
_MERKLE_NODES = cast(Table, MerkleNodeRow.__table__)


class AppendTransaction:
    """One append, holding the head row's lock until it commits."""

    def __init__(self, session: AsyncSession, head: Head) -> None:
        self.session = session
        self.head = head

    async def known_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        """Those of `event_ids` already in the ledger (safe: no one else appends while the head is locked)."""
        if not event_ids:
            return set()
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter: the same prepared statement for any batch size, planned as an index lookup.
            raw = await self._driver()
            return {r[0] for r in await raw.fetch("SELECT event_id FROM ledger WHERE event_id = ANY($1)", event_ids)}
        rows = await self.session.scalars(select(LedgerRow.event_id).where(LedgerRow.event_id.in_(event_ids)))
        return set(rows)

    async def _driver(self) -> Any:
        """The asyncpg connection under this transaction."""
        connection = await self.session.connection()
        return (await connection.get_raw_connection()).driver_connection

    async def write(self, rows: list[tuple[Any, ...]], nodes: list[tuple[int, int, bytes]], head: Head) -> None:
        """Insert the numbered rows (values in LEDGER_COLUMNS order) and the completed nodes and move the head;
        commits when the block ends."""
        if rows and self.session.get_bind().dialect.name == "postgresql":
            # COPY: several times cheaper per row than a multi-row INSERT, on the same connection and transaction.
            await (await self._driver()).copy_records_to_table("ledger", records=rows, columns=LEDGER_COLUMNS)
        elif rows:
            await self.session.execute(insert(_LEDGER), [dict(zip(LEDGER_COLUMNS, r, strict=True)) for r in rows])
        if nodes:
            await self.session.execute(
                insert(_MERKLE_NODES), [{"level": lv, "idx": i, "hash": h} for lv, i, h in nodes]
            )
        await self.session.execute(
            update(HeadRow)
            .where(HeadRow.id == 1)
            .values(tree_size=head.tree_size, chain_hash=head.chain_hash, frontier=head.frontier, updated_at=utcnow())
        )


def _filters(query: EventQuery) -> list[Any]:
    clauses: list[Any] = []
    if query.actor_id:
        clauses.append(LedgerRow.actor_id == query.actor_id)
    if query.action_prefix:
        clauses.append(LedgerRow.action.startswith(query.action_prefix, autoescape=True))
    if query.resource_type:
        clauses.append(LedgerRow.resource_type == query.resource_type)
    if query.resource_id:
        clauses.append(LedgerRow.resource_id == query.resource_id)
    if query.outcome:
        clauses.append(LedgerRow.outcome == query.outcome)
    if query.start_us is not None:
        clauses.append(LedgerRow.event_time_us >= query.start_us)
    if query.end_us is not None:
        clauses.append(LedgerRow.event_time_us < query.end_us)
    if query.request_id:
        clauses.append(LedgerRow.request_id == query.request_id)
    return clauses


class AuditStore:
    """Queries of the audit service."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def append_transaction(self) -> AsyncIterator[AppendTransaction]:
        """A transaction holding the head row locked (FOR UPDATE; SQLite: the database write lock)."""
        async with self.db.session() as session, session.begin():
            if not self.db.is_postgres:
                # SQLite takes its write lock at the first write: take it now, before reading the head.
                await session.execute(update(HeadRow).where(HeadRow.id == 1).values(updated_at=utcnow()))
            row = (
                await session.execute(
                    select(HeadRow.tree_size, HeadRow.chain_hash, HeadRow.frontier)
                    .where(HeadRow.id == 1)
                    .with_for_update()
                )
            ).one()
            yield AppendTransaction(session, Head(row.tree_size, bytes(row.chain_hash), bytes(row.frontier)))

    async def head(self) -> Head:
        """The head as last committed."""
        async with self.db.session() as s:
            row = (await s.execute(select(HeadRow.tree_size, HeadRow.chain_hash, HeadRow.frontier))).one()
        return Head(row.tree_size, bytes(row.chain_hash), bytes(row.frontier))

    # events

    async def list_events(self, query: EventQuery, after: int, limit: int, up_to: int | None = None) -> list[LedgerRow]:
        """Events matching `query` with sequence > `after` (and <= `up_to`), by sequence, at most `limit`."""
        statement = select(LedgerRow).where(LedgerRow.sequence > after, *_filters(query))
        if up_to is not None:
            statement = statement.where(LedgerRow.sequence <= up_to)
        async with self.db.session() as s:
            return list(await s.scalars(statement.order_by(LedgerRow.sequence).limit(limit)))

    async def event_by_id(self, event_id: str) -> LedgerRow | None:
        """The event with this id."""
        async with self.db.session() as s:
            return await s.scalar(select(LedgerRow).where(LedgerRow.event_id == event_id))

    async def event_by_sequence(self, sequence: int) -> LedgerRow | None:
        """The event with this sequence number."""
        async with self.db.session() as s:
            return await s.get(LedgerRow, sequence)

    async def scan(self, first: int, last: int) -> Sequence[Sequence[Any]]:
        """Rows first..last by sequence, each the canonical columns, then leaf hash and chain hash (slicing a row
        gives a tuple)."""
        columns = ", ".join(f'"{c}"' for c in LEDGER_COLUMNS)
        sql = f"SELECT {columns} FROM ledger WHERE sequence BETWEEN $1 AND $2 ORDER BY sequence"  # noqa: S608
        async with self.db.engine.connect() as conn:
            if self.db.is_postgres:
                # Verification reads every row: asyncpg's own records are about a third faster than rows built
                # by SQLAlchemy.
                raw: Any = (await conn.get_raw_connection()).driver_connection  # asyncpg's, untyped
                records: Sequence[Sequence[Any]] = await raw.fetch(sql, first, last)
                return records
            result = await conn.exec_driver_sql(sql.replace("$1", "?").replace("$2", "?"), (first, last))
            return result.all()

    # tree

    async def stored_nodes(self, wanted: dict[int, list[tuple[int, int]]]) -> dict[int, dict[int, bytes]]:
        """Stored hashes for index ranges [start, end) at stored levels (0: leaves, else merkle_nodes), in one
        query."""
        parts = []
        for level, ranges in wanted.items():
            if level == 0:
                spans = [and_(LedgerRow.sequence > a, LedgerRow.sequence <= b) for a, b in ranges]
                parts.append(
                    select(literal(0).label("level"), (LedgerRow.sequence - 1).label("idx"), LedgerRow.leaf_hash).where(
                        or_(*spans)
                    )
                )
            else:
                spans = [and_(MerkleNodeRow.idx >= a, MerkleNodeRow.idx < b) for a, b in ranges]
                parts.append(
                    select(MerkleNodeRow.level, MerkleNodeRow.idx, MerkleNodeRow.hash).where(
                        MerkleNodeRow.level == level, or_(*spans)
                    )
                )
        found: dict[int, dict[int, bytes]] = {level: {} for level in wanted}
        if parts:
            async with self.db.session() as s:
                for level, index, value in await s.execute(union_all(*parts) if len(parts) > 1 else parts[0]):
                    found[int(level)][int(index)] = bytes(value)
        return found

    # checkpoints

    async def add_checkpoint(self, row: CheckpointRow) -> None:
        """Store a checkpoint unless one for its tree size exists (the root is the same; the first one stays)."""
        values = {c.name: getattr(row, c.key) for c in CheckpointRow.__table__.columns}
        dialect_insert = pg_insert if self.db.is_postgres else sqlite_insert
        async with self.db.session() as s, s.begin():
            await s.execute(dialect_insert(CheckpointRow).values(**values).on_conflict_do_nothing())

    async def latest_checkpoint(self) -> CheckpointRow | None:
        """The checkpoint of the largest tree."""
        async with self.db.session() as s:
            return await s.scalar(select(CheckpointRow).order_by(CheckpointRow.tree_size.desc()).limit(1))

    async def checkpoint_at(self, tree_size: int) -> CheckpointRow | None:
        """The checkpoint of exactly this tree size."""
        async with self.db.session() as s:
            return await s.get(CheckpointRow, tree_size)

    async def checkpoints_between(self, first: int, last: int) -> list[CheckpointRow]:
        """Checkpoints with first <= tree_size <= last, smallest first."""
        async with self.db.session() as s:
            statement = select(CheckpointRow).where(CheckpointRow.tree_size.between(first, last))
            return list(await s.scalars(statement.order_by(CheckpointRow.tree_size)))

    # signing keys

    async def signing_keys(self) -> list[SigningKeyRow]:
        """Every checkpoint key, newest generation first."""
        async with self.db.session() as s:
            return list(await s.scalars(select(SigningKeyRow).order_by(SigningKeyRow.generation.desc())))

    async def add_signing_key(self, row: SigningKeyRow) -> bool:
        """Insert a key; False when another process added that generation first."""
        try:
            async with self.db.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            return False
        return True
