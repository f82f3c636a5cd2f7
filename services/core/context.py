"""The request in flight: its id, where it came from and who is calling, as a context variable.

The request interceptor sets it before a handler runs; handlers, domain code, logs, outgoing calls and audit
events read it from here instead of threading it through every function.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime

from services.core import registry
from services.core.errors import Reason, ServiceError


@dataclass(frozen=True)
class Caller:
    """The authenticated account behind a call (from a verified access token)."""

    user_id: str
    role: str  # "user", "viewer", "admin" or "service"
    email: str = ""
    token_id: str = ""  # the access token's jti
    family_id: str = ""  # the refresh family (login session) the token belongs to
    expires_at: datetime | None = None

    @property
    def can_oversee(self) -> bool:
        """Admins and viewers may read everyone's audit trail and list accounts."""
        return self.role in ("admin", "viewer")


@dataclass(frozen=True)
class RequestInfo:
    """Facts about the current call, safe to log (no token, no body)."""

    request_id: str
    method: str = ""
    client_ip: str = ""
    user_agent: str = ""
    caller: Caller | None = None
    # The workloads the peer's certificate names (mutual TLS): "edge" for Envoy, a service's name for a service.
    workloads: frozenset[str] = frozenset()
    # The raw bearer token, kept only to forward the caller's identity on downstream calls. Never logged.
    bearer_token: str = field(default="", repr=False)


_current: ContextVar[RequestInfo | None] = ContextVar("voiceassist_request", default=None)


def current_request() -> RequestInfo | None:
    """The current call's facts, or None outside a call (start-up, background work)."""
    return _current.get()


def set_request(info: RequestInfo) -> None:
    """Make `info` the current call (the call interceptor does, once authenticated again with its caller)."""
    _current.set(info)


def request_id() -> str:
    """The current call's request id, or "" outside a call."""
    info = _current.get()
    return info.request_id if info else ""


def current_caller() -> Caller:
    """The authenticated caller; UNAUTHENTICATED when the call carries no verified token."""
    info = _current.get()
    if info is None or info.caller is None:
        raise ServiceError(Reason.UNAUTHENTICATED, "this method needs an access token")
    return info.caller


def calling_services() -> frozenset[str]:
    """The services of ours whose certificate makes the current call (empty when it is none: Envoy, an outside
    client, or plaintext)."""
    info = _current.get()
    return info.workloads & registry.SERVICE_NAMES if info else frozenset()


def require_role(*roles: str) -> Caller:
    """The caller, if their role is one of `roles`; PERMISSION_DENIED otherwise."""
    caller = current_caller()
    if caller.role not in roles:
        raise ServiceError(
            Reason.PERMISSION_DENIED,
            f"this method needs the role {' or '.join(roles)}",
            metadata={"required_roles": ",".join(roles)},
        )
    return caller
