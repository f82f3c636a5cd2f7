"""The search service's gRPC servicer (placeholder until its issue lands)."""

from __future__ import annotations

from services.core import registry
from services.core.placeholder import placeholder_servicer
from services.core.server import Hosted, Runtime
from voiceassist.search.v1 import search_pb2_grpc

SPEC = registry.spec("search")


async def build(runtime: Runtime) -> Hosted:
    """The search service, ready to add to a server."""
    servicer = placeholder_servicer(search_pb2_grpc.SearchServiceServicer, SPEC.grpc_service)
    return Hosted(SPEC, lambda server: search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server))
