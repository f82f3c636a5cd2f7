"""The shared server runtime with a real grpc.aio server: error mapping and the request context.

The servicer here is a test double of a *business* service (one that crashes on purpose); everything it runs
inside — interceptors, error mapping, health, reflection — is the production code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY

from services.core import registry
from services.core.errors import FieldViolation, Reason, ServiceError
from services.core.runtime import Runtime
from services.core.server import Hosted, build_server
from services.core.settings import CoreSettings
from tests.support.clients import error_detail, error_reason
from tests.support.mesh import free_port
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc


class CrashingAuth(auth_pb2_grpc.AuthServiceServicer):
    """Crashes, or raises the shared ServiceError, depending on the password it is sent."""

    async def CheckPasswordStrength(self, request, context):
        if request.password == "crash":
            raise RuntimeError("secret internal detail: database password is hunter2")
        if request.password == "invalid":
            raise ServiceError(Reason.VALIDATION_ERROR, "bad", violations=[FieldViolation("password", "nope", "X")])
        if request.password == "hang":
            await asyncio.sleep(30)
        if request.password == "slow-down":
            raise ServiceError(Reason.RATE_LIMITED, "later", retry_after_seconds=2.5)
        return auth_pb2.CheckPasswordStrengthResponse(score=1)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    port = free_port()
    settings = CoreSettings(_env_file=None)
    runtime = Runtime(settings, ["auth"], f"127.0.0.1:{port}")
    hosted = Hosted(registry.spec("auth"), lambda s: auth_pb2_grpc.add_AuthServiceServicer_to_server(CrashingAuth(), s))
    srv, _health = build_server(runtime, [hosted])
    srv.add_insecure_port(f"127.0.0.1:{port}")
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(0)
    await runtime.close()


async def _call(
    address: str, password: str, request_id: str = "rid-1", deadline: float = 5
) -> auth_pb2.CheckPasswordStrengthResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        return await stub.CheckPasswordStrength(
            auth_pb2.CheckPasswordStrengthRequest(password=password),
            metadata=(("x-request-id", request_id),),
            timeout=deadline,
        )


def _handled(code: str) -> float:
    labels = {"grpc_service": registry.spec("auth").grpc_service, "grpc_method": "CheckPasswordStrength"}
    return REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0


async def test_a_call_its_client_abandoned_counts_as_cancelled_not_unknown(server: str) -> None:
    cancelled, unknown = _handled("CANCELLED"), _handled("UNKNOWN")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(server, "hang", deadline=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # the server notices the client's deadline on its own schedule
        if _handled("CANCELLED") > cancelled:
            break
        await asyncio.sleep(0.1)
    assert (_handled("CANCELLED"), _handled("UNKNOWN")) == (cancelled + 1, unknown)


async def test_crash_becomes_internal_with_request_id_and_no_leak(server: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(server, "crash", "rid-crash")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "rid-crash" in caught.value.details()
    assert "hunter2" not in caught.value.details() and "RuntimeError" not in caught.value.details()
    assert error_reason(caught.value) == "INTERNAL"
    assert ("x-request-id", "rid-crash") in tuple(caught.value.trailing_metadata())
    # the server keeps serving
    assert (await _call(server, "fine")).score == 1


async def test_service_error_carries_bad_request_violations(server: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(server, "invalid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_detail(caught.value, error_details_pb2.BadRequest)
    assert [(v.field, v.reason) for v in bad.field_violations] == [("password", "X")]


async def test_rate_limit_error_carries_retry_info(server: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(server, "slow-down")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_detail(caught.value, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 2500
