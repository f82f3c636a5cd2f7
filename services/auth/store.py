"""The auth service's tables and queries (SQLAlchemy 2, async): users, signing keys, sessions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.core.db import Database, UTCDateTime, rows_matched, utcnow


class Base(DeclarativeBase):
    """Declarative base of the auth schema."""


class UserRow(Base):
    """An account."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    full_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16), default="user")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Tokens issued before this instant are revoked (revoke-all, password change, deactivation). Kept here too so
    # refresh stays correct when Redis has forgotten its copy.
    tokens_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_users_created", "created_at", "id"), Index("ix_users_role_active", "role", "active"))


_USER_BY_ID = select(UserRow.__table__).where(UserRow.__table__.c.id == bindparam("user_id"))


class SigningKeyRow(Base):
    """A token signing key pair; the private half PEM-encoded (encrypted when a passphrase is set)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, unique=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    private_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activates_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TokenFamilyRow(Base):
    """One login session: every refresh token rotated from one login."""

    __tablename__ = "token_families"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoke_reason: Mapped[str] = mapped_column(String(32), default="")


class RefreshTokenRow(Base):
    """One refresh token; `used_at` is set when it is rotated, after which presenting it is reuse."""

    __tablename__ = "refresh_tokens"

    jti: Mapped[str] = mapped_column(String(36), primary_key=True)
    family_id: Mapped[str] = mapped_column(ForeignKey("token_families.id", ondelete="CASCADE"), index=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EmailTaken(Exception):
    """The normalised email already has an account."""


@dataclass(frozen=True)
class UserPage:
    """One page of users plus whether more follow."""

    users: list[UserRow]
    has_more: bool


class AuthStore:
    """Queries of the auth service; each method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # users

    async def create_user(self, email: str, full_name: str, password_hash: str, role: str = "user") -> UserRow:
        """Insert an account; EmailTaken when the email exists."""
        row = UserRow(email=email, full_name=full_name, password_hash=password_hash, role=role)
        try:
            async with self.db.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            raise EmailTaken(email) from None
        return row

    async def user_by_email(self, email: str) -> UserRow | None:
        """The account with this normalised email."""
        async with self.db.session() as s:
            return await s.scalar(select(UserRow).where(UserRow.email == email))

    async def user_by_id(self, user_id: str) -> UserRow | None:
        """The account with this id (detached). Every GetCurrentUser reads it: one Core statement, no ORM identity
        map and no transaction around it."""
        row = await self.db.fetch_one(_USER_BY_ID, {"user_id": user_id})
        return UserRow(**row._mapping) if row is not None else None

    async def update_user(self, user_id: str, **values: object) -> UserRow | None:
        """Set columns of an account (and updated_at); the new row, or None when it does not exist."""
        async with self.db.session() as s, s.begin():
            row = await s.get(UserRow, user_id, with_for_update=True)
            if row is None:
                return None
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
        return row

    async def list_users(
        self, limit: int, after: tuple[datetime, str] | None, role: str | None, active: bool | None
    ) -> UserPage:
        """Accounts oldest first, after the (created_at, id) cursor."""
        query = select(UserRow).order_by(UserRow.created_at, UserRow.id).limit(limit + 1)
        if role:
            query = query.where(UserRow.role == role)
        if active is not None:
            query = query.where(UserRow.active == active)
        if after is not None:
            created, uid = after
            query = query.where(
                or_(UserRow.created_at > created, and_(UserRow.created_at == created, UserRow.id > uid))
            )
        async with self.db.session() as s:
            rows = list(await s.scalars(query))
        return UserPage(rows[:limit], len(rows) > limit)

    # signing keys

    async def signing_keys(self) -> list[SigningKeyRow]:
        """Keys not yet retired, newest generation first."""
        now = utcnow()
        async with self.db.session() as s:
            query = select(SigningKeyRow).where(or_(SigningKeyRow.retires_at.is_(None), SigningKeyRow.retires_at > now))
            return list(await s.scalars(query.order_by(SigningKeyRow.generation.desc())))

    async def add_signing_key(self, row: SigningKeyRow, retire_others_at: datetime | None) -> bool:
        """Insert a key of the next generation; False when another process inserted that generation first."""
        try:
            async with self.db.session() as s, s.begin():
                s.add(row)
                if retire_others_at is not None:
                    await s.execute(
                        update(SigningKeyRow)
                        .where(SigningKeyRow.kid != row.kid, SigningKeyRow.retires_at.is_(None))
                        .values(retires_at=retire_others_at)
                    )
        except IntegrityError:
            return False
        return True

    # sessions

    async def create_family(self, user_id: str, expires_at: datetime) -> TokenFamilyRow:
        """Start a login session."""
        row = TokenFamilyRow(user_id=user_id, expires_at=expires_at)
        async with self.db.session() as s, s.begin():
            s.add(row)
        return row

    async def add_refresh_token(self, jti: str, family_id: str, issued_at: datetime, expires_at: datetime) -> None:
        """Remember an issued refresh token."""
        async with self.db.session() as s, s.begin():
            s.add(RefreshTokenRow(jti=jti, family_id=family_id, issued_at=issued_at, expires_at=expires_at))

    async def refresh_token(self, jti: str) -> tuple[RefreshTokenRow, TokenFamilyRow] | None:
        """A refresh token and its family."""
        async with self.db.session() as s:
            row = await s.get(RefreshTokenRow, jti)
            if row is None:
                return None
            family = await s.get(TokenFamilyRow, row.family_id)
            return (row, family) if family is not None else None

    async def mark_refresh_used(self, jti: str) -> bool:
        """Retire a refresh token; False when it was already retired (a concurrent or repeated use)."""
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(RefreshTokenRow)
                .where(RefreshTokenRow.jti == jti, RefreshTokenRow.used_at.is_(None))
                .values(used_at=utcnow())
            )
            return rows_matched(result) == 1

    async def revoke_family(self, family_id: str, reason: str) -> TokenFamilyRow | None:
        """Revoke one session; returns it."""
        async with self.db.session() as s, s.begin():
            family = await s.get(TokenFamilyRow, family_id, with_for_update=True)
            if family is not None and family.revoked_at is None:
                family.revoked_at = utcnow()
                family.revoke_reason = reason
            return family

    async def revoke_user_families(self, user_id: str, reason: str) -> None:
        """Revoke every open session of a user."""
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(TokenFamilyRow)
                .where(TokenFamilyRow.user_id == user_id, TokenFamilyRow.revoked_at.is_(None))
                .values(revoked_at=utcnow(), revoke_reason=reason)
            )
