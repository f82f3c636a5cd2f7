"""The voice service's gRPC servicer (placeholder until its issue lands)."""

from __future__ import annotations

from services.core import registry
from services.core.placeholder import placeholder_servicer
from services.core.server import Hosted, Runtime
from voiceassist.voice.v1 import voice_pb2_grpc

SPEC = registry.spec("voice")


async def build(runtime: Runtime) -> Hosted:
    """The voice service, ready to add to a server."""
    servicer = placeholder_servicer(voice_pb2_grpc.VoiceServiceServicer, SPEC.grpc_service)
    return Hosted(SPEC, lambda server: voice_pb2_grpc.add_VoiceServiceServicer_to_server(servicer, server))
