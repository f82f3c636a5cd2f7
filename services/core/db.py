"""Each service's own database: an async SQLAlchemy engine and Alembic migrations.

Mesh mode: PostgreSQL via asyncpg, one schema per service (`<prefix><service>`) inside `DATABASE_URL`, so the
services share a server but never a table. Embedded mode: one SQLite file per service under `data_dir`.
Migrations run at start-up under a PostgreSQL advisory lock, so several processes of one service can start
together.
"""

from __future__ import annotations

import math
import re
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, DateTime, Executable, MetaData, Result, Row, event, text
from sqlalchemy.engine import URL, Connection, Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.types import TypeDecorator

from services.core.settings import CoreSettings

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def rows_matched(result: Result[*tuple[Any, ...]]) -> int:
    """How many rows an executed UPDATE or DELETE matched. Its result is a CursorResult, which only
    `Session.execute`'s declared return type hides."""
    return cast(CursorResult[*tuple[Any, ...]], result).rowcount


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored with its timezone and always read back as aware UTC (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use services.core.db.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class DatabaseUnreachable(ConnectionError):
    """The database server could not be reached, or its TLS failed (refused, or a certificate that does not check)."""


class Database:
    """A service's engine, session factory and migrations."""

    def __init__(self, service: str, settings: CoreSettings) -> None:
        self.service = service
        url = settings.database_url
        self.schema: str | None = None
        connect_args: dict[str, Any] = {}
        if not url:
            path = settings.data_dir / f"{service}.db"
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            # Password hashes and signing keys live here: the owner's alone, whatever the umask of older runs was.
            settings.data_dir.chmod(0o700)
            if path.exists():
                path.chmod(0o600)
            url = f"sqlite+aiosqlite:///{path}"
        if url.startswith("postgresql"):
            self.schema = f"{settings.database_schema_prefix}{service}"
            if not _SCHEMA_NAME.match(self.schema):
                raise ValueError(f"bad schema name {self.schema!r}")
            connect_args["server_settings"] = {"search_path": self.schema, "application_name": service}
            engine_url, tls = postgres_tls(make_url(url))
            connect_args.update(tls)
            self.engine: AsyncEngine = create_async_engine(
                engine_url, connect_args=connect_args, pool_size=settings.database_pool_size, max_overflow=0
            )
            _ping_when_idle(self.engine, settings.database_idle_ping_seconds)
        else:
            self.engine = create_async_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        """True in mesh mode."""
        return self.engine.dialect.name == "postgresql"

    async def fetch_one(self, statement: Executable, params: dict[str, Any]) -> Row[*tuple[Any, ...]] | None:
        """The first row of a single-statement read, in autocommit: no BEGIN and ROLLBACK round trips around it
        (for the hottest reads; anything that reads twice or writes takes a session)."""
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return (await conn.execute(statement, params)).first()

    def session(self) -> AsyncSession:
        """A new session; use as `async with db.session() as s, s.begin(): ...`."""
        return self.sessions()

    async def migrate(self, migrations: Path) -> None:
        """Bring the schema to the newest Alembic revision in `migrations`. Alembic itself is loaded only when the
        schema is behind: it is a tenth of a small service's memory and of its start-up time. DatabaseUnreachable
        when the server cannot be reached or its TLS fails: this is every service's first connection at start-up."""
        try:
            current = await self._revisions()
        except OSError as exc:  # below SQL (no listener, TLS refused or unverified): the operator's URL, not the schema
            where = f"{self.engine.url.host}:{self.engine.url.port or 5432}"
            raise DatabaseUnreachable(f"{self.service}: cannot connect to the database at {where}: {exc}") from None
        if current == head_revisions(migrations):
            return
        async with self.engine.begin() as conn:
            if self.is_postgres:
                await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": self.schema})
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(_upgrade, migrations)

    async def _revisions(self) -> set[str]:
        """The revisions Alembic recorded in this schema (none before the first migration)."""
        try:
            async with self.engine.connect() as conn:
                return set((await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars())
        except DBAPIError:  # no such table (or schema) yet
            return set()

    async def ping(self) -> bool:
        """True when the database answers."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


# libpq's TLS parameters, as operators write them in DATABASE_URL (`ssl` is asyncpg's name for sslmode). SQLAlchemy's
# asyncpg dialect would hand each to asyncpg.connect() as a keyword, which knows only `ssl`: they are taken out of the
# URL and turned into that one argument here.
_TLS_PARAMETERS = ("sslmode", "ssl", "sslrootcert", "sslcert", "sslkey")
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def postgres_tls(url: URL) -> tuple[URL, dict[str, Any]]:
    """`url` without libpq's TLS parameters, and the asyncpg connect arguments they ask for (none when the URL has
    none: asyncpg's default, TLS when the server offers it, unverified). sslmode=require encrypts without checking
    the server's certificate (unless sslrootcert is given, as libpq does), verify-ca checks it against sslrootcert,
    verify-full also checks that it names the host of the URL. ValueError for a parameter that cannot work."""
    params: dict[str, str] = {}
    for name in _TLS_PARAMETERS:
        value = url.query.get(name)
        if isinstance(value, tuple):
            raise ValueError(f"DATABASE_URL gives {name} more than once")
        if value is not None:
            params[name] = value
    if not params:
        return url, {}
    if "ssl" in params and "sslmode" in params:
        raise ValueError("DATABASE_URL gives both ssl and sslmode; keep sslmode")
    mode = params.get("sslmode") or params.get("ssl")
    if mode is None:
        raise ValueError("DATABASE_URL: sslrootcert, sslcert and sslkey take effect with an sslmode (verify-full)")
    if mode not in _SSL_MODES:
        raise ValueError(f"DATABASE_URL: sslmode={mode!r} is none of {', '.join(_SSL_MODES)}")
    return url.difference_update_query(params), {"ssl": _ssl_argument(mode, params)}


def _ssl_argument(mode: str, params: dict[str, str]) -> ssl.SSLContext | str | bool:
    """asyncpg's `ssl=` for a libpq sslmode. A context makes TLS mandatory: asyncpg refuses a server that will not
    speak it instead of falling back to plaintext."""
    if mode == "disable":
        return False
    if mode in ("allow", "prefer"):  # opportunistic and never verified: asyncpg knows these by the same names
        return mode
    rootcert, cert, key = params.get("sslrootcert"), params.get("sslcert"), params.get("sslkey")
    if mode.startswith("verify-") and not rootcert:
        raise ValueError(f"DATABASE_URL: sslmode={mode} needs sslrootcert, the CA certificate to check the server by")
    if key and not cert:
        raise ValueError("DATABASE_URL: sslkey without sslcert")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = mode == "verify-full"
    try:
        if rootcert:
            context.load_verify_locations(cafile=rootcert)
        else:
            context.verify_mode = ssl.CERT_NONE
        if cert:
            context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is one; neither names the file it could not use
        names = ", ".join(f"{name}={params[name]}" for name in ("sslrootcert", "sslcert", "sslkey") if name in params)
        raise ValueError(f"DATABASE_URL: cannot load {names}: {exc}") from None
    return context


def _ping_when_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """Pessimistic disconnect handling for connections that sat idle, where a database restart or an idle timeout
    leaves dead ones: such a connection is pinged at checkout, and a dead one replaced before the caller sees it.
    A connection in use moments ago proves itself by working (SQLAlchemy's pool_pre_ping would ping every checkout).
    """

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", math.inf) >= idle_seconds:
            try:
                dbapi_connection.ping()
            except Exception as exc:
                raise DisconnectionError(str(exc)) from exc

    event.listen(engine.sync_engine, "checkin", checkin)
    event.listen(engine.sync_engine, "checkout", checkout)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_REVISION = re.compile(r"^revision(?:: [\w |]+)? = [\"'](\w+)[\"']", re.M)
_DOWN_REVISION = re.compile(r"^down_revision(?:: [^=]+)? = (.+)$", re.M)


def head_revisions(migrations: Path) -> set[str]:
    """The newest revisions in a migrations folder (those no other revision builds on), read from the version
    files as Alembic writes them."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (migrations / "versions").glob("*.py"):
        source = path.read_text()
        if found := _REVISION.search(source):
            revisions.add(found.group(1))
        if down := _DOWN_REVISION.search(source):
            parents.update(re.findall(r"[\"'](\w+)[\"']", down.group(1)))
    return revisions - parents


def _upgrade(connection: Connection, migrations: Path) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def run_alembic_env(metadata: MetaData) -> None:
    """The body of every service's migrations/env.py: migrate the connection `Database.migrate` passes in."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("migrations run through services.core.db.Database.migrate(), not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
