"""Rich statuses, both ways, and the one way a response stream ends with an error.

Build: a ServiceError becomes a `google.rpc.Status` (code, message, `ErrorInfo` with reason, domain and metadata,
`BadRequest` violations, `RetryInfo`), for a call's status (the interceptor) or a stream's last message. Parse: a
failed call, a `google.rpc.Status` or its JSON form (what Envoy gives HTTP clients) becomes a ServiceError again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core import registry
from services.core.context import current_request, request_id
from services.core.errors import FieldViolation, Reason, ServiceError
from services.core.redis_store import StoreUnavailable

log = logging.getLogger("voiceassist.rpc")

# What a received status can be parsed from: a failed call (grpc.RpcError, grpc.aio.AioRpcError), the proto, or
# the proto's JSON form.
StatusSource = grpc.RpcError | status_pb2.Status | Mapping[str, Any]
M = TypeVar("M", bound=Message)

# The reason a status code stands for when a status carries no reason of ours (a transport failure, a proxy's own
# reply, another system's error): the code is kept, the reason says the same thing in our words.
_GENERIC_REASONS = {
    "INVALID_ARGUMENT": Reason.VALIDATION_ERROR,
    "NOT_FOUND": Reason.NOT_FOUND,
    "ALREADY_EXISTS": Reason.ALREADY_EXISTS,
    "UNAUTHENTICATED": Reason.UNAUTHENTICATED,
    "PERMISSION_DENIED": Reason.PERMISSION_DENIED,
    "RESOURCE_EXHAUSTED": Reason.RATE_LIMITED,
    "OUT_OF_RANGE": Reason.OUT_OF_RANGE,
    "FAILED_PRECONDITION": Reason.FAILED_PRECONDITION,
    "UNAVAILABLE": Reason.BACKEND_UNAVAILABLE,
    "DEADLINE_EXCEEDED": Reason.DEADLINE_EXCEEDED,
    "CANCELLED": Reason.CANCELLED,
    "UNIMPLEMENTED": Reason.NOT_IMPLEMENTED,
}


def service_domain(service: str) -> str:
    """The `ErrorInfo.domain` of a service's errors ("auth.voiceassist")."""
    return f"{service}.voiceassist"


def method_domain(method: str) -> str:
    """The error domain of a gRPC method path ("/voiceassist.auth.v1.AuthService/Login"); plain "voiceassist" for
    methods of no mesh service (health, reflection)."""
    service = method.split("/")[1] if method.count("/") >= 2 else ""
    spec = registry.BY_GRPC_SERVICE.get(service)
    return service_domain(spec.name) if spec else "voiceassist"


# ---- build


def to_status(error: ServiceError, domain: str) -> status_pb2.Status:
    """The google.rpc.Status of an error: ErrorInfo always, BadRequest and RetryInfo when the error has them."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.status_code_name), message=error.message)
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=error.reason.value, domain=domain, metadata=error.metadata)
    ]
    if error.violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=v.reason)
            for v in error.violations
        ]
        details.append(error_details_pb2.BadRequest(field_violations=violations))
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_seconds * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    for detail in details:
        status.details.add().Pack(detail)
    return status


def to_grpc_status(error: ServiceError, domain: str) -> grpc.Status:
    """The error as a call's status (`context.abort_with_status`), details in `grpc-status-details-bin`."""
    return rpc_status.to_status(to_status(error, domain))


# SQLSTATEs of a database that is gone or not back yet: class 08 (connection exception), 57P01-57P03 (shutting down,
# crashed, starting up).
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def backend_unreachable(exc: BaseException) -> bool:
    """True when `exc`, or an exception it came from, says a database or Redis could not be reached or dropped the
    connection: an outage the client may retry (UNAVAILABLE), not a bug (INTERNAL). Duck-typed for the database
    (SQLAlchemy's `connection_invalidated`, the driver's `sqlstate`) so that processes without one never import it."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain of causes is short; a cycle must not hang the error path
        if seen is None:
            return False
        if (
            isinstance(seen, (ConnectionError, StoreUnavailable, RedisConnectionError, RedisTimeoutError))
            or getattr(seen, "connection_invalidated", False) is True
            or str(getattr(seen, "sqlstate", "") or "").startswith(_OUTAGE_SQLSTATES)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def client_error(exc: Exception) -> ServiceError:
    """What a client is told of `exc`: a ServiceError as it is; anything else is INTERNAL with the request id only
    (the exception goes to the log, never to the client)."""
    if isinstance(exc, ServiceError):
        return exc
    info = current_request()
    if backend_unreachable(exc):
        log.warning("backend unreachable in %s: %r", info.method if info else "a call", exc)
        return ServiceError(Reason.BACKEND_UNAVAILABLE, "a backend is unreachable; try again", retry_after_seconds=1.0)
    log.error("unhandled error in %s", info.method if info else "a call", exc_info=exc)
    rid = request_id()
    return ServiceError(Reason.INTERNAL, f"internal error; request id {rid}", metadata={"request_id": rid})


def ends_with_status(
    response: Callable[..., M],
) -> Callable[[Callable[..., AsyncIterator[M]]], Callable[..., AsyncIterator[M]]]:
    """Make a response-streaming handler end the one way every stream of the mesh does on an error.

    Before the first message the error is the call's status (a real HTTP error for JSON clients). After it, a last
    message `response(error=<google.rpc.Status>)` carries the error, because HTTP/1.1 clients behind Envoy never see
    trailers; then the call ends with the same status, for gRPC clients.
    """

    def decorate(handler: Callable[..., AsyncIterator[M]]) -> Callable[..., AsyncIterator[M]]:
        @functools.wraps(handler)
        async def stream(servicer: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[M]:
            sent = False
            try:
                async for message in handler(servicer, request, context):
                    yield message
                    sent = True
            except Exception as exc:
                if not sent:
                    raise
                error = client_error(exc)
                info = current_request()
                yield response(error=to_status(error, method_domain(info.method if info else "")))
                if error is exc:
                    raise
                raise error from exc

        return stream

    return decorate


# ---- parse


def status_of(source: StatusSource) -> status_pb2.Status:
    """The google.rpc.Status of a failed call (code and message only when it came without details), a Status
    itself, or a JSON google.rpc.Status."""
    if isinstance(source, status_pb2.Status):
        return source
    if isinstance(source, Mapping):
        return json_format.ParseDict(dict(source), status_pb2.Status(), ignore_unknown_fields=True)
    call = cast(grpc.Call, source)  # a failed call's error is the call (sync) or has its methods (aio)
    status: status_pb2.Status | None = rpc_status.from_call(call)
    if status is None:
        return status_pb2.Status(code=call.code().value[0], message=call.details() or "")
    return status


def detail_of(source: StatusSource, message_type: type[M]) -> M | None:
    """The first detail of `message_type` (ErrorInfo, BadRequest, RetryInfo, ...) in a status, or None."""
    for detail in status_of(source).details:
        found = message_type()
        if detail.Unpack(found):  # False when the detail is of another type
            return found
    return None


def error_info(source: StatusSource) -> error_details_pb2.ErrorInfo:
    """The status's ErrorInfo as sent (any reason, any domain); an empty one when it has none."""
    return detail_of(source, error_details_pb2.ErrorInfo) or error_details_pb2.ErrorInfo()


def reason_of(source: StatusSource) -> Reason | None:
    """The status's reason when it is one of ours; None when it has none or another system's."""
    reason = error_info(source).reason
    return Reason(reason) if reason in Reason.__members__ else None


def error_of(source: StatusSource) -> ServiceError:
    """The ServiceError a status carries, its code kept. Without a reason of ours, the reason is the one its code
    stands for (INTERNAL for codes no reason stands for)."""
    status = status_of(source)
    code = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"
    info = error_info(status)
    bad = detail_of(status, error_details_pb2.BadRequest)
    retry = detail_of(status, error_details_pb2.RetryInfo)
    return ServiceError(
        reason_of(status) or _GENERIC_REASONS.get(code, Reason.INTERNAL),
        status.message,
        violations=[FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations] if bad else [],
        retry_after_seconds=retry.retry_delay.ToTimedelta().total_seconds() if retry else None,
        metadata=dict(info.metadata),
        code=code,
    )
