"""The auth service's gRPC servicer (placeholder until its issue lands)."""

from __future__ import annotations

from services.core import registry
from services.core.placeholder import placeholder_servicer
from services.core.server import Hosted, Runtime
from voiceassist.auth.v1 import auth_pb2_grpc

SPEC = registry.spec("auth")


async def build(runtime: Runtime) -> Hosted:
    """The auth service, ready to add to a server."""
    servicer = placeholder_servicer(auth_pb2_grpc.AuthServiceServicer, SPEC.grpc_service)
    return Hosted(SPEC, lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server))
