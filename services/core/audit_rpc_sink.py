"""The audit sink for a process without Redis whose audit service runs elsewhere: AppendEvent calls.

Kept apart from audit_client.py so domain modules that record events never import grpc.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import grpc

from services.core.audit_client import DROPPED, SENT, BufferedSink, Pending
from services.core.context import current_request
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger("voiceassist.audit")

# AppendEvent answers that will not change on a retry: the event is refused for good.
_REFUSALS = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
)


class RpcSink(BufferedSink):
    """AppendEvent on the audit service, from the local buffer (never in the recording call's path)."""

    transport = "rpc"

    def __init__(
        self, stub: Callable[[], audit_pb2_grpc.AuditServiceStub], max_buffered: int, forward_tokens: bool
    ) -> None:
        """`forward_tokens`: send each event with the token of the call that recorded it (plaintext, where the
        audit service knows callers by their tokens only); with mutual TLS this process's certificate vouches for
        every event, including those of calls without a token (a login), and a token expiring in the buffer does not
        matter."""
        super().__init__(max_buffered)
        self._stub = stub
        self._forward_tokens = forward_tokens

    async def send(self, event: audit_pb2.Event) -> None:
        info = current_request()
        self._enqueue(Pending(event, info.bearer_token if info and self._forward_tokens else ""))

    async def _deliver(self, batch: list[Pending]) -> int:
        handled = 0
        for item in batch:
            metadata = [("x-request-id", item.event.request_id or uuid.uuid4().hex)]
            if item.bearer_token:
                metadata.append(("authorization", f"Bearer {item.bearer_token}"))
            try:
                await self._stub().AppendEvent(audit_pb2.AppendEventRequest(event=item.event), metadata=metadata,
                                               timeout=5)  # fmt: skip
                SENT.labels(self.transport).inc()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _REFUSALS:
                    return handled  # unreachable or busy: keep it and everything after it
                DROPPED.labels(self.transport, "refused").inc()
                log.error(
                    "audit event refused by the audit service",
                    extra={"action": item.event.action, "event_id": item.event.event_id, "code": exc.code().name},
                )
            handled += 1
        return handled
