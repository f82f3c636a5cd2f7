"""The audit service's gRPC servicer (placeholder until its issue lands)."""

from __future__ import annotations

from services.core import registry
from services.core.placeholder import placeholder_servicer
from services.core.server import Hosted, Runtime
from voiceassist.audit.v1 import audit_pb2_grpc

SPEC = registry.spec("audit")


async def build(runtime: Runtime) -> Hosted:
    """The audit service, ready to add to a server."""
    servicer = placeholder_servicer(audit_pb2_grpc.AuditServiceServicer, SPEC.grpc_service)
    return Hosted(SPEC, lambda server: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server))
