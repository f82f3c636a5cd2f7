"""Clients for tests: gRPC stubs, JSON calls through Envoy, rich error details."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

STRONG_PASSWORD = "zebra-Umbrella-42-tonic"


def unique_email(prefix: str = "user") -> str:
    """A fresh address for a test account."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.org"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an access token."""
    return (("authorization", f"Bearer {token}"),)


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call ("" when absent)."""
    for detail in _details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def error_detail(error: grpc.RpcError, message_type: Any) -> Any | None:
    """The first detail of `message_type` (e.g. error_details_pb2.RetryInfo) in a failed call."""
    for detail in _details(error):
        if detail.Is(message_type.DESCRIPTOR):
            found = message_type()
            detail.Unpack(found)
            return found
    return None


def _details(error: grpc.RpcError) -> list[Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return list(status.details) if status else []


def json_reason(body: dict[str, Any]) -> str:
    """The ErrorInfo reason inside a JSON google.rpc.Status."""
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return detail.get("reason", "")
    return ""


@dataclass
class Account:
    """A signed-in test account."""

    email: str
    user_id: str
    access_token: str
    refresh_token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata with its access token."""
        return bearer(self.access_token)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers with its access token."""
        return {"authorization": f"Bearer {self.access_token}"}


def register_and_login(channel: grpc.Channel, email: str | None = None, password: str = STRONG_PASSWORD) -> Account:
    """Create an account and sign in over gRPC."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    email = email or unique_email()
    stub.Register(auth_pb2.RegisterRequest(email=email, password=password, full_name="Test User"), timeout=30)
    reply = stub.Login(auth_pb2.LoginRequest(email=email, password=password), timeout=30)
    return Account(email, reply.user.id, reply.access_token, reply.refresh_token)


def json_login(http: httpx.Client, email: str, password: str = STRONG_PASSWORD) -> httpx.Response:
    """POST /v1/auth:login."""
    return http.post("/v1/auth:login", json={"email": email, "password": password})
