"""The audit service's gRPC servicer: proto in, domain call, proto out; and its wiring (`build`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from services.audit.checkpoints import CheckpointKeys, Checkpoints
from services.audit.events import EventQuery, as_own_event, check_event, may_append_any
from services.audit.ingest import Consumer, QueueSource, RedisStreamSource, consumer_name
from services.audit.integrity import IntegrityCheck
from services.audit.ledger import Ledger
from services.audit.ledger_proofs import timestamp_micros
from services.audit.settings import AuditSettings, audit_settings
from services.audit.store import AuditStore, CheckpointRow, LedgerRow
from services.core import registry
from services.core.audit_client import AuditClient
from services.core.context import Caller, calling_services, current_caller, require_role
from services.core.db import Database
from services.core.errors import Reason, ServiceError, invalid, not_found
from services.core.limits import AUDIT
from services.core.pagination import decode_page_token, encode_page_token, page_size
from services.core.ratelimit import Limit
from services.core.redis_store import StoreUnavailable
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.status import ends_with_status
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)
SPEC = registry.spec("audit")
MIGRATIONS = Path(__file__).parent / "migrations"
EXPORT_PAGE = 1000


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def event_message(row: LedgerRow) -> audit_pb2.Event:
    """The proto form of a committed event; LEDGER_DAMAGED when the stored row cannot be read back."""
    try:
        metadata = json.loads(row.metadata_json)
    except ValueError:
        raise ServiceError(
            Reason.LEDGER_DAMAGED,
            f"event {row.sequence} is damaged (its metadata is not JSON); run VerifyIntegrity",
            metadata={"sequence": str(row.sequence)},
        ) from None
    return audit_pb2.Event(
        event_id=row.event_id,
        sequence=row.sequence,
        event_time=_timestamp(row.event_time_us),
        actor=audit_pb2.Actor(id=row.actor_id, email=row.actor_email, role=row.actor_role),
        action=row.action,
        resource=audit_pb2.Resource(type=row.resource_type, id=row.resource_id),
        outcome=row.outcome,  # type: ignore[arg-type]  # the stored enum number: the stubs want the enum type
        failure_reason=row.failure_reason,
        request_id=row.request_id,
        client_ip=row.client_ip,
        user_agent=row.user_agent,
        service=row.service,
        method=row.method,
        metadata=metadata,
        commit_time=_timestamp(row.commit_time_us),
        leaf_hash=row.leaf_hash,
        chain_hash=row.chain_hash,
        appended_by=row.appended_by,
    )


def checkpoint_message(row: CheckpointRow) -> audit_pb2.Checkpoint:
    """The proto form of a signed checkpoint."""
    return audit_pb2.Checkpoint(
        tree_size=row.tree_size,
        root_hash=row.root_hash,
        timestamp=_timestamp(row.timestamp_us),
        signature=row.signature,
        key_id=row.key_id,
        origin=row.origin,
    )


def event_query(message: audit_pb2.EventFilter) -> EventQuery:
    """The domain query of a filter, checked."""
    return EventQuery(
        actor_id=message.actor_id,
        action_prefix=message.action_prefix,
        resource_type=message.resource_type,
        resource_id=message.resource_id,
        outcome=int(message.outcome),
        start_us=timestamp_micros(message.start_time) if message.HasField("start_time") else None,
        end_us=timestamp_micros(message.end_time) if message.HasField("end_time") else None,
        request_id=message.request_id,
    ).check()


def _page_scope(query: EventQuery, caller: Caller) -> dict:
    # A token is valid only for the same filter and the same visibility (a user's token is not an admin's).
    return {"filter": query.fingerprint(), "scope": "all" if caller.can_oversee else caller.user_id}


def _visible(row: LedgerRow, caller: Caller) -> bool:
    return caller.can_oversee or row.actor_id == caller.user_id


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """AuditService over the ledger."""

    def __init__(
        self, ledger: Ledger, checkpoints: Checkpoints, runtime: Runtime, settings: AuditSettings, audit: AuditClient
    ) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self._checkpoints = checkpoints
        self._runtime = runtime
        self._audit = audit
        self._append_limit = Limit("audit_append", settings.append_per_minute, 60)

    async def ListEvents(
        self, request: audit_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListEventsResponse:
        caller = current_caller()
        size = page_size(request.page_size, AUDIT.list_events)
        query = event_query(request.filter)
        cursor = decode_page_token(request.page_token, _page_scope(query, caller))
        after = _sequence_cursor(cursor)
        visible = query.visible_to(caller)
        if visible is None:
            return audit_pb2.ListEventsResponse()
        rows = await self._store.list_events(visible, after, size + 1)
        token = encode_page_token([rows[size - 1].sequence], _page_scope(query, caller)) if len(rows) > size else ""
        return audit_pb2.ListEventsResponse(events=[event_message(r) for r in rows[:size]], next_page_token=token)

    async def GetEvent(
        self, request: audit_pb2.GetEventRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetEventResponse:
        caller = current_caller()
        try:
            event_id = str(uuid.UUID(request.event_id))
        except ValueError:
            raise invalid("event_id", "must be a UUID") from None
        row = await self._store.event_by_id(event_id)
        if row is None or not _visible(row, caller):
            raise not_found("event", event_id)
        return audit_pb2.GetEventResponse(event=event_message(row))

    @ends_with_status(audit_pb2.ExportEventsResponse)
    async def ExportEvents(
        self, request: audit_pb2.ExportEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.ExportEventsResponse]:
        caller = current_caller()
        query = event_query(request.filter)
        if request.after_sequence < 0:
            raise invalid("after_sequence", "must not be negative")
        visible = query.visible_to(caller)
        # Up to the tree as it is now, so an export under constant appends still ends.
        up_to = (await self._store.head()).tree_size
        await self._audit.record("audit.events.export", metadata=_export_facts(request, up_to))
        if visible is None:
            return
        after = request.after_sequence
        while True:
            rows = await self._store.list_events(visible, after, EXPORT_PAGE, up_to=up_to)
            for row in rows:
                yield audit_pb2.ExportEventsResponse(event=event_message(row))
            if len(rows) < EXPORT_PAGE:
                return
            after = rows[-1].sequence

    async def AppendEvent(
        self, request: audit_pb2.AppendEventRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AppendEventResponse:
        if not request.HasField("event"):
            raise invalid("event", "required")
        event = audit_pb2.Event()
        event.CopyFrom(request.event)
        proven = calling_services()
        if proven:
            # A service of ours, proven by its certificate (with mutual TLS no one else gets here): its events are
            # attributed to it, whoever's call it saw (a login has no authenticated caller).
            if event.service not in proven:
                event.service = min(proven)
            appended_by = f"service:{event.service}"
        else:
            caller = current_caller()
            if not may_append_any(caller):
                await self._limit_appends(caller)
                as_own_event(event, caller)
            appended_by = caller.user_id
        result = await self._ledger.append([check_event(event, appended_by=appended_by)])
        if result.committed:
            await self._checkpoints.after_append(result.tree_size)
        return audit_pb2.AppendEventResponse(event_id=str(uuid.UUID(event.event_id)))

    async def _limit_appends(self, caller: Caller) -> None:
        try:
            decision = await self._runtime.rate_limiter.hit(self._append_limit, caller.user_id)
        except StoreUnavailable:
            return  # fail open, as logins do: the event is still attributed to the caller
        if not decision.allowed:
            raise ServiceError(
                Reason.RATE_LIMITED, "too many events appended; try again later",
                retry_after_seconds=decision.retry_after,
            )  # fmt: skip

    async def VerifyIntegrity(
        self, request: audit_pb2.VerifyIntegrityRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyIntegrityResponse:
        require_role("admin")
        check = IntegrityCheck(self._ledger, self._checkpoints.keys.public_keys, self._checkpoints.origin)
        report = await check.run(request.start_sequence, request.end_sequence)
        await self._audit.record(
            "audit.integrity.verify",
            success=report.ok,
            failure_reason="" if report.ok else "INTEGRITY_VIOLATION",
            metadata={"checked": str(report.checked), "first_bad_sequence": str(report.first_bad_sequence)},
        )
        return audit_pb2.VerifyIntegrityResponse(
            ok=report.ok,
            checked_count=report.checked,
            first_bad_sequence=report.first_bad_sequence,
            problem=report.problem,
            tree_size=report.tree_size,
            root_hash=report.root_hash,
            checkpoints_checked=report.checkpoints_checked,
        )

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetCheckpointResponse:
        current_caller()
        row = await self._checkpoints.current()
        public_key = self._checkpoints.keys.public_keys.get(row.key_id, b"")
        return audit_pb2.GetCheckpointResponse(checkpoint=checkpoint_message(row), public_key=public_key)

    async def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        caller = current_caller()
        proof = await self._ledger.inclusion_proof(request.sequence, request.tree_size)
        if not caller.can_oversee:
            row = await self._store.event_by_sequence(request.sequence)
            if row is None or not _visible(row, caller):
                raise not_found("event", str(request.sequence))
        return audit_pb2.GetInclusionProofResponse(
            leaf_index=proof.leaf_index,
            tree_size=proof.tree_size,
            leaf_hash=proof.leaf_hash,
            hashes=proof.hashes,
            root_hash=proof.root_hash,
        )

    async def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetConsistencyProofResponse:
        current_caller()
        proof = await self._ledger.consistency_proof(request.old_size, request.new_size)
        return audit_pb2.GetConsistencyProofResponse(
            old_size=proof.old_size,
            new_size=proof.new_size,
            hashes=proof.hashes,
            old_root_hash=proof.old_root,
            new_root_hash=proof.new_root,
        )


def _sequence_cursor(cursor: list | None) -> int:
    if cursor is None:
        return 0
    if len(cursor) != 1 or not isinstance(cursor[0], int) or cursor[0] < 0:
        raise ServiceError(Reason.INVALID_PAGE_TOKEN, "page_token is not a token this API issued")
    return cursor[0]


def _export_facts(request: audit_pb2.ExportEventsRequest, up_to: int) -> dict[str, str]:
    facts = {"up_to_sequence": str(up_to), "after_sequence": str(request.after_sequence)}
    for name in ("actor_id", "action_prefix", "resource_type", "resource_id", "request_id"):
        if value := getattr(request.filter, name):
            facts[f"filter.{name}"] = value[:256]
    return facts


async def _checkpoint_periodically(checkpoints: Checkpoints, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await checkpoints.current()
        except Exception:  # the next round tries again; appends never wait for it
            log.exception("periodic checkpoint failed")


async def build(runtime: Runtime) -> Hosted:
    """The audit service, ready to add to a server: ledger, checkpoints, and the consumer feeding them."""
    settings = audit_settings()
    core = runtime.settings
    passphrase = settings.key_passphrase.get_secret_value()
    if core.environment == "production" and not passphrase:
        raise RuntimeError("AUDIT_KEY_PASSPHRASE is required in production (the checkpoint key is stored encrypted)")
    db = Database("audit", core)
    await db.migrate(MIGRATIONS)
    ledger = Ledger(AuditStore(db))
    keys = CheckpointKeys(ledger.store, passphrase)
    await keys.load()
    checkpoints = Checkpoints(ledger, keys, settings.origin, settings.checkpoint_every_events)
    keys_origin = settings.origin
    if runtime.redis is not None:
        source: RedisStreamSource | QueueSource = RedisStreamSource(
            core.redis_url, core.redis_key_prefix, consumer_name(settings.consumer_name),
            block_seconds=settings.read_block_seconds, claim_idle_seconds=settings.claim_idle_seconds,
            reclaim_interval_seconds=settings.reclaim_interval_seconds,
        )  # fmt: skip
    elif runtime.audit_queue is not None:
        source = QueueSource(runtime.audit_queue, settings.read_block_seconds)
    else:
        raise RuntimeError("the audit service needs Redis or the in-process queue of the process hosting it")
    consumer = Consumer(source, ledger, checkpoints, settings.batch_size)
    tasks = [
        asyncio.create_task(consumer.run()),
        asyncio.create_task(_checkpoint_periodically(checkpoints, settings.checkpoint_interval_seconds)),
    ]
    servicer = AuditServicer(ledger, checkpoints, runtime, settings, runtime.audit("audit"))
    log.info("audit ledger ready", extra={"key_id": keys.current.key_id if keys.current else "", "origin": keys_origin})

    async def close() -> None:
        await consumer.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(tasks[0]), core.shutdown_grace_seconds)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await source.close()
        await db.close()

    return Hosted(
        SPEC,
        lambda server: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server),
        probe=db.ping,
        close=close,
    )
