"""The audit sink of `voiceassist users`: every event committed to the ledger before `record()` returns.

An administrative change made from the command line must be in the ledger when the command ends, in every mode.
The command is a process of its own, so a buffer that dies with it (the RpcSink's, which also has no identity
the audit service accepts), an in-process queue, or a stream the audit service commits later are not enough.
It appends with the audit service's own ledger code to the audit database the service uses (SQLite in the data
directory, or its PostgreSQL schema), where the head row's lock orders its appends with the service's.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import SQLAlchemyError

from services.audit.events import check_event
from services.audit.ledger import Ledger
from services.audit.server import MIGRATIONS
from services.audit.store import AuditStore
from services.core.audit_client import SENT
from services.core.db import Database
from services.core.errors import Reason, ServiceError
from services.core.settings import CoreSettings
from voiceassist.audit.v1 import audit_pb2

log = logging.getLogger("voiceassist.audit")

COMMIT_WAIT_SECONDS = 30.0  # bounds the wait for the head row lock (or SQLite's write lock) held by the service


class LedgerSink:
    """Commits each event to the ledger, waiting for the commit; ServiceError when it cannot."""

    transport = "ledger"

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ledger = Ledger(AuditStore(db))

    @classmethod
    async def open(cls, settings: CoreSettings) -> LedgerSink:
        """The sink, once the ledger answers: a command checks this before it changes anything it must audit."""
        sink = cls(Database("audit", settings))
        try:
            await asyncio.wait_for(sink._ready(), COMMIT_WAIT_SECONDS)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            await sink.close()
            unreachable = f"the audit ledger is unreachable ({type(exc).__name__}): no change can be made unaudited"
            raise ServiceError(Reason.BACKEND_UNAVAILABLE, unreachable) from None
        return sink

    async def _ready(self) -> None:
        await self._db.migrate(MIGRATIONS)  # a fresh data directory: the audit service may never have run
        await self._ledger.head()

    async def send(self, event: audit_pb2.Event) -> None:
        """Commit `event`; a change already made without its record is said to be so."""
        try:
            await asyncio.wait_for(self._ledger.append([check_event(event, prefix="")]), COMMIT_WAIT_SECONDS)
        except (ServiceError, SQLAlchemyError, OSError, TimeoutError) as exc:
            cause = exc.message if isinstance(exc, ServiceError) else type(exc).__name__
            log.error("audit event not committed", extra={"action": event.action, "event_id": event.event_id})
            raise ServiceError(
                Reason.BACKEND_UNAVAILABLE,
                f"{event.action} on {event.resource.type} {event.resource.id} was done but is NOT in the audit "
                f"ledger ({cause}); record it before relying on the change",
            ) from None
        SENT.labels(self.transport).inc()

    async def close(self) -> None:
        """Close the audit database's connections (nothing is ever buffered)."""
        await self._db.close()
