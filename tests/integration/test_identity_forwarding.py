"""Outgoing calls made while handling a request carry that request's id and the caller's token, whatever the
call type (grpc.aio files a client interceptor under one call type only, so each type is checked)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.clients import open_channel
from services.core.context import RequestInfo, set_request
from tests.support.mesh import free_port


class RecordingHealth(health_pb2_grpc.HealthServicer):
    """Remembers the metadata of every call it receives."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def Check(self, request, context):
        self.seen.append(dict(context.invocation_metadata()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, context):
        self.seen.append(dict(context.invocation_metadata()))
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, RecordingHealth]]:
    servicer = RecordingHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


async def test_unary_and_streaming_calls_forward_request_id_and_token(recorder) -> None:
    address, servicer = recorder
    set_request(RequestInfo(request_id="rid-forward", bearer_token="tok-123"))
    async with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        async for _ in stub.Watch(health_pb2.HealthCheckRequest(), timeout=5):
            break
    assert len(servicer.seen) == 2
    for metadata in servicer.seen:
        assert metadata["x-request-id"] == "rid-forward"
        assert metadata["authorization"] == "Bearer tok-123"
