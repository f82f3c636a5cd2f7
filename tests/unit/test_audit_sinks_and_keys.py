"""The audit client's local buffer when Redis is unreachable, and the checkpoint key kept encrypted at rest
(against real components: a Redis address nobody listens on, a SQLite audit database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.audit.checkpoints import CheckpointKeys
from services.audit.server import MIGRATIONS
from services.audit.store import AuditStore
from services.core.audit_client import AuditClient, RedisStreamSink
from services.core.db import Database
from services.core.redis_store import RedisConnection
from services.core.settings import CoreSettings
from tests.support.mesh import free_port


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_while_redis_is_unreachable_events_wait_in_a_bounded_buffer_and_losses_are_counted() -> None:
    connection = RedisConnection(f"redis://127.0.0.1:{free_port()}/0", "unit:", 0.2)
    sink = RedisStreamSink(connection, max_buffered=3)
    client = AuditClient("unit", sink)
    full = _metric("audit_client_events_dropped_total", transport="redis", reason="buffer_full")
    shutdown = _metric("audit_client_events_dropped_total", transport="redis", reason="shutdown")
    try:
        for _ in range(5):
            await client.record("unit.test.event")  # returns at once: producers never wait for the audit service
        assert _metric("audit_client_events_buffered", transport="redis") == 3
        assert _metric("audit_client_events_dropped_total", transport="redis", reason="buffer_full") == full + 2
    finally:
        await sink.close()
        await connection.close()
    # Still unreachable at shutdown: what was buffered is counted as lost, never silently gone.
    assert _metric("audit_client_events_dropped_total", transport="redis", reason="shutdown") == shutdown + 3


async def _keys(tmp_path: Path, passphrase: str) -> tuple[CheckpointKeys, Database]:
    db = Database("audit", CoreSettings(data_dir=tmp_path, database_url="", _env_file=None))  # type: ignore[call-arg]
    keys = CheckpointKeys(AuditStore(db), passphrase)
    try:
        await db.migrate(MIGRATIONS)
        await keys.load()
    except Exception:
        await db.close()
        raise
    return keys, db


async def test_the_checkpoint_key_persists_encrypted_and_a_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    keys, db = await _keys(tmp_path, "correct horse")
    try:
        assert keys.current is not None
        [row] = await AuditStore(db).signing_keys()
        assert "ENCRYPTED PRIVATE KEY" in row.private_pem and row.public_key == keys.current.public_key
    finally:
        await db.close()
    again, db = await _keys(tmp_path, "correct horse")
    await db.close()
    assert again.current is not None and again.current.key_id == keys.current.key_id
    with pytest.raises(RuntimeError, match="AUDIT_KEY_PASSPHRASE"):
        await _keys(tmp_path, "wrong")
