"""Audit: ledger append throughput from the Redis stream (PostgreSQL, batched commits), VerifyIntegrity over
1,000,000 events, and inclusion proof latency at that size. Mesh mode: PostgreSQL + Redis, one audit process."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import redis

from bench.common import RUNS, median, percentile, table
from services.audit import ledger_proofs
from services.audit.checkpoints import CheckpointKeys, Checkpoints
from services.audit.events import NewEvent, now_micros
from services.audit.ledger import Ledger
from services.audit.server import MIGRATIONS
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from services.core.audit_client import STREAM, STREAM_FIELD
from services.core.db import Database
from services.core.settings import CoreSettings
from tests.support.admin import create_admin
from tests.support.mesh import Cluster, drop_schemas
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc

STREAM_EVENTS = 100_000  # per append run with batching
UNBATCHED_EVENTS = 3_000  # per append run with one event per commit
VERIFY_EVENTS = 1_000_000
PROOFS = 1_000


def _event(i: int) -> audit_pb2.Event:
    event = audit_pb2.Event(
        event_id=str(uuid.uuid4()), action="auth.login.success", outcome=audit_pb2.OUTCOME_SUCCESS,
        actor=audit_pb2.Actor(id=str(uuid.uuid4()), role="user"), resource=audit_pb2.Resource(type="user", id="u"),
        request_id=uuid.uuid4().hex, client_ip="10.0.0.7", user_agent="bench/1.0", service="auth",
        method="/voiceassist.auth.v1.AuthService/Login", metadata={"n": str(i)},
    )  # fmt: skip
    event.event_time.GetCurrentTime()
    return event


def _fill_stream(client: redis.Redis, stream: str, count: int) -> None:
    for start in range(0, count, 1000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(count, start + 1000)):
                pipe.xadd(stream, {STREAM_FIELD: _event(i).SerializeToString()})
            pipe.execute()


def _ingest_rate(cluster: Cluster, client: redis.Redis, batch: int, count: int) -> float:
    """Events/s committed by a fresh audit process draining `count` queued events (commit, XACK, XDEL)."""
    stream = cluster.env["REDIS_KEY_PREFIX"] + STREAM
    _fill_stream(client, stream, count)
    audit = cluster.start("audit", AUDIT_BATCH_SIZE=str(batch))
    try:
        started, waiting = time.perf_counter(), client.xlen(stream)
        while (left := client.xlen(stream)) > 0:
            time.sleep(0.02)
        return (waiting - left) / (time.perf_counter() - started)
    finally:
        audit.stop()


def _bulk_event() -> NewEvent:
    return NewEvent(
        str(uuid.uuid4()), now_micros(), str(uuid.uuid4()), "", "user", "auth.login.success", "user", "u", 1, "",
        uuid.uuid4().hex, "10.0.0.7", "bench/1.0", "auth", "/voiceassist.auth.v1.AuthService/Login", '{"n":"0"}', "",
    )  # fmt: skip


async def _bulk_load(cluster: Cluster, target: int) -> None:
    """Fill the ledger to `target` events with the ledger's own code (hashes, nodes, checkpoints every 1,000),
    in transactions of 5,000 instead of through the stream."""
    settings = CoreSettings(
        database_url=cluster.env["DATABASE_URL"],
        database_schema_prefix=cluster.env["DATABASE_SCHEMA_PREFIX"],
        _env_file=None,  # type: ignore[call-arg]
    )
    db = Database("audit", settings)
    try:
        await db.migrate(MIGRATIONS)
        ledger = Ledger(AuditStore(db))
        keys = CheckpointKeys(ledger.store, "")
        await keys.load()
        checkpoints = Checkpoints(ledger, keys, AuditSettings().origin, 1000)
        size = (await ledger.head()).tree_size
        while size < target:
            result = await ledger.append([_bulk_event() for _ in range(min(5000, target - size))])
            await checkpoints.after_append(result.tree_size)
            size = result.tree_size
    finally:
        await db.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        cluster = Cluster.create(Path(tmp), mesh=True)
        client = redis.Redis.from_url(cluster.env["REDIS_URL"])
        try:
            auth = cluster.start("auth")
            cluster.point_at("auth", auth)
            with grpc.insecure_channel(auth.address) as channel:
                admin = create_admin(cluster, channel)
            unbatched = [_ingest_rate(cluster, client, 1, UNBATCHED_EVENTS) for _ in range(RUNS)]
            batched = [_ingest_rate(cluster, client, 500, STREAM_EVENTS) for _ in range(RUNS)]
            started = time.perf_counter()
            asyncio.run(_bulk_load(cluster, VERIFY_EVENTS))
            load_seconds = time.perf_counter() - started
            audit = cluster.start("audit")
            with grpc.insecure_channel(audit.address) as channel:
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                verify, reports = [], []
                for _ in range(RUNS):
                    started = time.perf_counter()
                    reports.append(stub.VerifyIntegrity(audit_pb2.VerifyIntegrityRequest(), metadata=admin.metadata,
                                                        timeout=600))  # fmt: skip
                    verify.append(time.perf_counter() - started)
                assert all(r.ok for r in reports), reports
                signed = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=admin.metadata).checkpoint
                proof_ms, verified = [], 0
                for sequence in random.sample(range(1, signed.tree_size + 1), PROOFS):
                    started = time.perf_counter()
                    proof = stub.GetInclusionProof(
                        audit_pb2.GetInclusionProofRequest(sequence=sequence, tree_size=signed.tree_size),
                        metadata=admin.metadata,
                    )
                    proof_ms.append((time.perf_counter() - started) * 1000)
                    verified += ledger_proofs.verify_inclusion(
                        proof.leaf_hash, proof.leaf_index, proof.tree_size, list(proof.hashes), signed.root_hash
                    )
                assert verified == PROOFS
        finally:
            cluster.stop()
            drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"])
            client.delete(*client.keys(cluster.env["REDIS_KEY_PREFIX"] + "*") or ["-"])
            client.close()

    def spread(values: list[float], unit: str, digits: int = 0) -> str:
        return f"{median(values):,.{digits}f} {unit} (runs {min(values):,.{digits}f}-{max(values):,.{digits}f})"

    table(
        "audit (mesh mode: PostgreSQL + Redis, 2 cores shared with the database and this script)",
        [
            (f"append from the stream, 1 event per commit (median of {RUNS})", spread(unbatched, "events/s")),
            (f"append from the stream, batches of 500 (median of {RUNS}; target >= 5,000)",
             spread(batched, "events/s")),
            (f"bulk load to {VERIFY_EVENTS:,} events (ledger code, 5,000 per commit)", f"{load_seconds:.0f} s"),
            (f"VerifyIntegrity over {reports[0].checked_count:,} events, {reports[0].checkpoints_checked} checkpoints "
             f"(median of {RUNS}; target <= 10 s)", spread(verify, "s", 1)),
            (f"GetInclusionProof at tree size {signed.tree_size:,}, p50 / p95 ({PROOFS} proofs, gRPC direct)",
             f"{median(proof_ms):.1f} / {percentile(proof_ms, 95):.1f} ms"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
