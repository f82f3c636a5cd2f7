"""The rag service's gRPC servicer (placeholder until its issue lands)."""

from __future__ import annotations

from services.core import registry
from services.core.placeholder import placeholder_servicer
from services.core.server import Hosted, Runtime
from voiceassist.rag.v1 import rag_pb2_grpc

SPEC = registry.spec("rag")


async def build(runtime: Runtime) -> Hosted:
    """The rag service, ready to add to a server."""
    servicer = placeholder_servicer(rag_pb2_grpc.RagServiceServicer, SPEC.grpc_service)
    return Hosted(SPEC, lambda server: rag_pb2_grpc.add_RagServiceServicer_to_server(servicer, server))
