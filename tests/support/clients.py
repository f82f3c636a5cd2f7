"""Clients for tests: gRPC stubs, JSON calls through Envoy, rich error details."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import httpx

from services.core.status import StatusSource, detail_of, error_info
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

STRONG_PASSWORD = "zebra-Umbrella-42-tonic"


def unique_email(prefix: str = "user") -> str:
    """A fresh address for a test account."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.org"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an access token."""
    return (("authorization", f"Bearer {token}"),)


def error_reason(error: StatusSource) -> str:
    """The ErrorInfo reason of a failed call or a google.rpc.Status, as sent ("" when absent)."""
    return error_info(error).reason


def error_detail(error: grpc.RpcError, message_type: Any) -> Any | None:
    """The first detail of `message_type` (e.g. error_details_pb2.RetryInfo) in a failed call."""
    return detail_of(error, message_type)


def json_reason(body: dict[str, Any]) -> str:
    """The ErrorInfo reason inside a JSON google.rpc.Status, as sent ("" when absent)."""
    return error_info(body).reason


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
