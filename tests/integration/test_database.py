"""A service's database: on real PostgreSQL, dead pooled connections are replaced before a caller sees them and the
hot read path runs outside any transaction; migrations load Alembic only when the schema is behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from services.core.db import Database, head_revisions
from services.core.settings import ROOT, CoreSettings
from tests.support.mesh import TEST_DATABASE_URL

_RAW_URL = TEST_DATABASE_URL.replace("+asyncpg", "")


async def _database(idle_ping_seconds: float) -> Database:
    settings = CoreSettings(
        _env_file=None,
        database_url=TEST_DATABASE_URL,
        database_schema_prefix=f"t{uuid.uuid4().hex[:8]}_",
        database_pool_size=2,
        database_idle_ping_seconds=idle_ping_seconds,
    )
    return Database(f"dbtest{uuid.uuid4().hex[:6]}", settings)


async def _kill_backends(application_name: str) -> int:
    """What a database restart does to a pool: every connection of the application closed by the server."""
    conn = await asyncpg.connect(_RAW_URL)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await conn.close()
    return len(killed)


async def _killed_while_idle(db: Database) -> None:
    """The pool's one connection used, then closed by the server while it sits idle past the ping threshold."""
    assert await db.fetch_one(text("SELECT 1 AS one"), {}) is not None
    assert await _kill_backends(db.service) == 1
    await asyncio.sleep(0.3)


@pytest.mark.mesh
async def test_a_connection_killed_while_idle_is_replaced_before_use() -> None:
    db = await _database(idle_ping_seconds=0.2)
    try:
        await _killed_while_idle(db)
        row = await db.fetch_one(text("SELECT 2 AS two"), {})
        assert row is not None and row.two == 2
    finally:
        await db.close()


@pytest.mark.mesh
async def test_without_the_idle_ping_a_killed_connection_fails_the_call() -> None:
    # The control for the test above: the ping is what saves the call.
    db = await _database(idle_ping_seconds=3600)
    try:
        await _killed_while_idle(db)
        with pytest.raises(Exception, match=r"(?i)connection|terminat"):
            await db.fetch_one(text("SELECT 1"), {})
        assert (await db.fetch_one(text("SELECT 3 AS three"), {})).three == 3  # the pool recovered by itself
    finally:
        await db.close()


@pytest.mark.mesh
async def test_fetch_one_runs_outside_a_transaction() -> None:
    db = await _database(idle_ping_seconds=10)
    try:
        # No BEGIN was sent: PostgreSQL refuses a savepoint outside a transaction block.
        with pytest.raises(Exception, match="SAVEPOINT can only be used in transaction blocks"):
            await db.fetch_one(text("SAVEPOINT x"), {})
    finally:
        await db.close()


@pytest.mark.parametrize("service", ["auth", "audit", "search", "rag"])
def test_head_revisions_are_alembics_own(service: str) -> None:
    # The start-up check reads the heads from the version files without loading Alembic; it must agree with it.
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    folder = ROOT / "services" / service / "migrations"
    config = Config()
    config.set_main_option("script_location", str(folder))
    assert head_revisions(folder) == set(ScriptDirectory.from_config(config).get_heads())


def test_an_up_to_date_schema_starts_without_alembic(tmp_path: Path) -> None:
    # A second start finds the schema at head and never imports Alembic (a tenth of a small service's memory).
    script = f"""
import asyncio, sys
from pathlib import Path
from services.core.db import Database, head_revisions
from services.core.settings import ROOT, CoreSettings

async def main():
    db = Database("auth", CoreSettings(_env_file=None, data_dir=Path({str(tmp_path)!r}), database_url=""))
    await db.migrate(Path("services/auth/migrations"))
    await db.close()

asyncio.run(main())
print("alembic" in sys.modules)
"""
    first, second = (
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    )
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False"), first.stderr + second.stderr
