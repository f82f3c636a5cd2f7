"""Server interceptors, one per concern: request context, telemetry (metrics + access log), error mapping.

Order (outermost first) is fixed by `server.build_server`: request context → telemetry → errors → auth, so
the access log and metrics see the final status and every log line carries the request id.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core import metrics
from services.core.context import RequestInfo, current_request, request_id, set_request
from services.core.errors import Reason, ServiceError

log = logging.getLogger("voiceassist.rpc")

Invoke = Callable[[], Any]  # returns an awaitable (unary responses) or an async iterator (streaming responses)

# Methods polled by load balancers and tooling: not worth an access log line each.
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Base class: run `around_unary` / `around_stream` around every handler of every kind.

    Handlers that produce a response stream by `yield` go through `around_stream`; every other handler
    (unary responses, and streams written with `context.write`) goes through `around_unary`.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                break
        else:  # pragma: no cover - grpc always sets one
            return handler

        if inspect.isasyncgenfunction(behavior):

            async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in self.around_stream(method, context, lambda: behavior(request, context)):
                    yield item

            new_behavior: Callable[..., Any] = wrapped_stream
        else:

            async def wrapped_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.around_unary(method, context, lambda: behavior(request, context))

            new_behavior = wrapped_unary
        return handler._replace(**{kind: new_behavior})

    async def around_unary(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> Any:
        return await invoke()

    async def around_stream(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> AsyncIterator[Any]:
        async for item in invoke():
            yield item


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class RequestContextInterceptor(AroundInterceptor):
    """Sets the request context (request id, client address, user agent) and echoes x-request-id."""

    def __init__(self, trusted_proxies: str) -> None:
        self._trusted = [ipaddress.ip_network(n.strip()) for n in trusted_proxies.split(",") if n.strip()]

    def client_ip(self, peer_ip: str, forwarded_for: str) -> str:
        """The client's address: the x-forwarded-for entry Envoy appended (the last one) when the peer is a
        trusted proxy, else the peer itself. Earlier entries are whatever the client claimed."""
        if forwarded_for and self._is_trusted(peer_ip):
            return forwarded_for.rsplit(",", 1)[-1].strip()
        return peer_ip

    def _is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> str:
        md = _metadata(context)
        rid = md.get("x-request-id", "")[:128] or uuid.uuid4().hex
        set_request(
            RequestInfo(
                request_id=rid,
                method=method,
                client_ip=self.client_ip(_peer_ip(context.peer()), md.get("x-forwarded-for", "")),
                user_agent=md.get("user-agent", "")[:512],
            )
        )
        return rid

    async def around_unary(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> Any:
        await context.send_initial_metadata((("x-request-id", self._begin(method, context)),))
        return await invoke()

    async def around_stream(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> AsyncIterator[Any]:
        # Headers go out with the first message, not before: a stream that fails before its first message then
        # ends as a trailers-only error, which Envoy turns into the matching HTTP status for JSON clients (headers
        # sent early would commit a 200). Errors carry x-request-id in their trailers (ErrorInterceptor).
        headers = (("x-request-id", self._begin(method, context)),)
        sent = False
        async for item in invoke():
            if not sent:
                await context.send_initial_metadata(headers)
                sent = True
            yield item
        if not sent:
            await context.send_initial_metadata(headers)


def _peer_ip(peer: str | None) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
    if not peer:
        return ""
    _, _, rest = peer.partition(":")
    host, _, _ = rest.rpartition(":")
    return host.strip("[]")


class TelemetryInterceptor(AroundInterceptor):
    """Counts and times every RPC by method and status code and writes one access log line per call."""

    def _finish(self, method: str, context: grpc.aio.ServicerContext, started: float, error: bool) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.OK
        if isinstance(code, int):  # grpc sometimes reports the raw integer
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        seconds = time.perf_counter() - started
        service, name = metrics.split_method(method)
        metrics.RPC_HANDLED.labels(service, name, code.name).inc()
        metrics.RPC_SECONDS.labels(service, name).observe(seconds)
        if not method.startswith(_QUIET_PREFIXES):
            info = current_request()
            log.info(
                "rpc",
                extra={
                    "method": method,
                    "code": code.name,
                    "duration_ms": round(seconds * 1000, 2),
                    "client_ip": info.client_ip if info else "",
                    "user_id": info.caller.user_id if info and info.caller else "",
                },
            )

    async def around_unary(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> Any:
        started = time.perf_counter()
        gauge = metrics.RPC_IN_FLIGHT.labels(metrics.split_method(method)[0])
        gauge.inc()
        error = True
        try:
            result = await invoke()
            error = False
            return result
        finally:
            gauge.dec()
            self._finish(method, context, started, error)

    async def around_stream(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> AsyncIterator[Any]:
        started = time.perf_counter()
        gauge = metrics.RPC_IN_FLIGHT.labels(metrics.split_method(method)[0])
        gauge.inc()
        error = True
        try:
            async for item in invoke():
                yield item
            error = False
        finally:
            gauge.dec()
            self._finish(method, context, started, error)


def rich_status(error: ServiceError, domain: str) -> grpc.Status:
    """A gRPC status carrying google.rpc.ErrorInfo and, when given, BadRequest or RetryInfo."""
    code = grpc.StatusCode[error.status_code_name]
    info = error_details_pb2.ErrorInfo(reason=error.reason.value, domain=domain, metadata=error.metadata)
    details = [info]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason
                    )
                    for v in error.violations
                ]
            )
        )
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_seconds * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class ErrorInterceptor(AroundInterceptor):
    """Maps ServiceError to a rich status; anything unexpected to INTERNAL with the request id only.

    The full exception goes to the server log; the client never sees a stack trace or an internal message.
    """

    def __init__(self, domain_of: Callable[[str], str]) -> None:
        self._domain_of = domain_of

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            error = exc
        else:
            log.exception("unhandled error in %s", method)
            error = ServiceError(
                Reason.INTERNAL,
                f"internal error; request id {request_id()}",
                metadata={"request_id": request_id()},
            )
        status = rich_status(error, self._domain_of(method))
        trailers = (*status.trailing_metadata, ("x-request-id", request_id()))
        await context.abort_with_status(status._replace(trailing_metadata=trailers))

    async def around_unary(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> Any:
        try:
            return await invoke()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(method, context, exc)

    async def around_stream(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> AsyncIterator[Any]:
        try:
            async for item in invoke():
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(method, context, exc)
