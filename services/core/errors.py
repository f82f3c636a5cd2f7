"""Errors every service raises: one enum of stable reasons, one exception that carries them.

Domain code raises `ServiceError(Reason.X, "message", ...)` without importing grpc; the codec in
`services.core.status` turns it into a `google.rpc.Status` with `ErrorInfo` (reason, domain = the service,
metadata), plus `BadRequest` field violations or `RetryInfo` when given: a call's status (the interceptor) or a
stream's last message, and parses one back on the client side. Messages and metadata reach the client: never put
PHI or secrets in them. Every reason a service can return is listed in its proto (tests/unit/test_contracts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    """Stable, machine-readable error reasons (google.rpc.ErrorInfo.reason). Never rename one."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RATE_LIMITED = "RATE_LIMITED"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    TOKEN_INVALID = "TOKEN_INVALID"
    WEAK_PASSWORD = "WEAK_PASSWORD"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"
    DUPLICATE_DOCUMENT = "DUPLICATE_DOCUMENT"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    SESSION_TOO_LONG = "SESSION_TOO_LONG"
    LEDGER_DAMAGED = "LEDGER_DAMAGED"
    INTERNAL = "INTERNAL"


# The gRPC status code each reason maps to, by grpc.StatusCode name (so this module needs no grpc import).
STATUS_CODE: dict[Reason, str] = {
    Reason.VALIDATION_ERROR: "INVALID_ARGUMENT",
    Reason.NOT_FOUND: "NOT_FOUND",
    Reason.ALREADY_EXISTS: "ALREADY_EXISTS",
    Reason.UNAUTHENTICATED: "UNAUTHENTICATED",
    Reason.PERMISSION_DENIED: "PERMISSION_DENIED",
    Reason.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    Reason.INVALID_CREDENTIALS: "UNAUTHENTICATED",
    Reason.TOKEN_EXPIRED: "UNAUTHENTICATED",
    Reason.TOKEN_REVOKED: "UNAUTHENTICATED",
    Reason.TOKEN_INVALID: "UNAUTHENTICATED",
    Reason.WEAK_PASSWORD: "INVALID_ARGUMENT",
    Reason.EMAIL_TAKEN: "ALREADY_EXISTS",
    Reason.ACCOUNT_DISABLED: "PERMISSION_DENIED",
    Reason.DUPLICATE_DOCUMENT: "ALREADY_EXISTS",
    Reason.UNSUPPORTED_MEDIA_TYPE: "INVALID_ARGUMENT",
    Reason.PAYLOAD_TOO_LARGE: "RESOURCE_EXHAUSTED",
    Reason.HEADERS_TOO_LARGE: "RESOURCE_EXHAUSTED",
    Reason.INVALID_PAGE_TOKEN: "INVALID_ARGUMENT",
    Reason.OUT_OF_RANGE: "OUT_OF_RANGE",
    Reason.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    Reason.BACKEND_UNAVAILABLE: "UNAVAILABLE",
    Reason.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    Reason.CANCELLED: "CANCELLED",
    Reason.NOT_IMPLEMENTED: "UNIMPLEMENTED",
    Reason.IDLE_TIMEOUT: "DEADLINE_EXCEEDED",
    Reason.SESSION_TOO_LONG: "OUT_OF_RANGE",
    Reason.LEDGER_DAMAGED: "DATA_LOSS",
    Reason.INTERNAL: "INTERNAL",
}


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation)."""

    field: str  # path in the request, e.g. "password" or "filters.specialty"
    description: str
    reason: str = ""  # optional stable code for this violation, e.g. "COMMON_PASSWORD"


@dataclass
class ServiceError(Exception):
    """An error meant for the client: a stable reason, a safe message and optional details."""

    reason: Reason
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    code: str | None = None  # a grpc.StatusCode name; overrides STATUS_CODE[reason]

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def status_code_name(self) -> str:
        """The grpc.StatusCode name to answer with."""
        return self.code or STATUS_CODE[self.reason]


def invalid(field_path: str, description: str, reason: str = "") -> ServiceError:
    """A VALIDATION_ERROR for one field: the common case of bad input."""
    return ServiceError(
        Reason.VALIDATION_ERROR,
        f"{field_path}: {description}",
        violations=[FieldViolation(field_path, description, reason)],
    )


def not_found(kind: str, ident: str) -> ServiceError:
    """NOT_FOUND for a resource; also the answer when the caller may not see it, so existence never leaks."""
    return ServiceError(Reason.NOT_FOUND, f"{kind} {ident!r} not found", metadata={"resource_type": kind})
