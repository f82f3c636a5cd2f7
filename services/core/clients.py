"""Outgoing calls to other services: one cached channel per service, with the caller's identity forwarded.

Every call made inside a request carries that request's `x-request-id` and, when the caller was authenticated,
their bearer token, so the downstream service authorises the same user and logs the same request id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from services.core.certificates import WorkloadCertificates
from services.core.context import current_request

# Each intercept method is generic over the call's message types (as grpc.aio declares them).
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Stub = TypeVar("_Stub")
# What a streaming call sends: grpc.aio accepts either kind of iterable.
_Requests = AsyncIterable[_Request] | Iterable[_Request]


def forwarded_metadata(metadata: grpc.aio.Metadata | None) -> list[tuple[str, str | bytes]]:
    """`metadata` plus the current request's id and bearer token, unless already present."""
    pairs = list(metadata or ())
    keys = {k for k, _ in pairs}
    info = current_request()
    if info is not None:
        if "x-request-id" not in keys:
            pairs.append(("x-request-id", info.request_id))
        if info.bearer_token and "authorization" not in keys:
            pairs.append(("authorization", f"Bearer {info.bearer_token}"))
    return pairs


def _forwarding(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*forwarded_metadata(details.metadata)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


def reset_as_unavailable(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """`error`, or UNAVAILABLE when it is a stream reset mid-call.

    A peer that dies after the response began (Envoy cannot answer with a status then, it resets the stream with
    RST_STREAM) reaches gRPC as INTERNAL "Stream removed", which reads as a server bug and is never retried. It is
    a lost connection: UNAVAILABLE, which callers treat as retryable.
    """
    text = error.details() or ""
    if error.code() != grpc.StatusCode.INTERNAL or not ("Stream removed" in text or "RST_STREAM" in text):
        return error
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        error.initial_metadata(),
        error.trailing_metadata(),
        f"the connection to the service was lost mid-call ({text})",
        error.debug_error_string(),
    )


async def _response(
    call: grpc.aio.UnaryUnaryCall[_Request, _Response] | grpc.aio.StreamUnaryCall[_Request, _Response],
) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        raise reset_as_unavailable(error) from None


async def _responses(call: AsyncIterable[_Response]) -> AsyncIterator[_Response]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as error:
        raise reset_as_unavailable(error) from None


# grpc.aio files an interceptor under the first call type it implements only, so each type needs its own class.
# Each forwards the caller's identity and reports a stream reset as UNAVAILABLE (reset_as_unavailable).
class _ForwardUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Request], Awaitable[grpc.aio.UnaryUnaryCall[_Request, _Response]]
        ],
        details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> grpc.aio.UnaryUnaryCall[_Request, _Response]:
        call = await continuation(_forwarding(details), request)
        await _response(call)
        return call


class _ForwardUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Request], Awaitable[grpc.aio.UnaryStreamCall[_Request, _Response]]
        ],
        details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> AsyncIterator[_Response]:
        return _responses(await continuation(_forwarding(details), request))


class _ForwardStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Requests[_Request]], Awaitable[grpc.aio.StreamUnaryCall[_Request, _Response]]
        ],
        details: grpc.aio.ClientCallDetails,
        request_iterator: _Requests[_Request],
    ) -> grpc.aio.StreamUnaryCall[_Request, _Response]:
        call = await continuation(_forwarding(details), request_iterator)
        await _response(call)
        return call


class _ForwardStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Requests[_Request]],
            Awaitable[grpc.aio.StreamStreamCall[_Request, _Response]],
        ],
        details: grpc.aio.ClientCallDetails,
        request_iterator: _Requests[_Request],
    ) -> AsyncIterator[_Response]:
        return _responses(await continuation(_forwarding(details), request_iterator))


_FORWARDERS = (_ForwardUnaryUnary(), _ForwardUnaryStream(), _ForwardStreamUnary(), _ForwardStreamStream())


# A channel replaced by a renewed certificate lets its calls (a long voice conversation's answer stream included)
# finish for this long before it closes.
RETIRED_CHANNEL_GRACE_SECONDS = 600.0

CLIENT_OPTIONS: list[tuple[str, int | str]] = [
    # A service with several workers (a list of addresses, or a DNS name with several records): spread the calls.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
) -> grpc.aio.Channel:
    """A channel that forwards the caller's identity: mutual TLS with this process's certificate, checking that the
    server is `server_name` (a workload name its certificate carries), or plaintext without credentials."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS, interceptors=list(_FORWARDERS))
    options = [*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=list(_FORWARDERS))


class ChannelPool:
    """One long-lived channel per service, created on first use; with mutual TLS, reopened with every renewed
    certificate (the old channels close once their calls have finished)."""

    def __init__(self, address_of: Callable[[str], str], certificates: WorkloadCertificates | None = None) -> None:
        self._address_of = address_of
        self._certificates = certificates
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, Callable[[grpc.aio.Channel], Any]], Any] = {}
        self._retired: set[asyncio.Task[None]] = set()
        if certificates is not None:
            certificates.on_renewal(self._reopen)

    def get(self, service: str) -> grpc.aio.Channel:
        """The channel to `service` (a registry name)."""
        channel = self._channels.get(service)
        if channel is None:
            credentials = self._certificates.channel_credentials() if self._certificates else None
            channel = open_channel(self._address_of(service), credentials, service)
            self._channels[service] = channel
        return channel

    def stub(self, service: str, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """A generated stub on the current channel to `service` (ask again per call: the channel can change)."""
        key = (service, stub_class)
        found = self._stubs.get(key)
        if found is None:
            found = self._stubs[key] = stub_class(self.get(service))
        return found

    def _reopen(self) -> None:
        retired = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in retired:
            task = asyncio.get_running_loop().create_task(channel.close(grace=RETIRED_CHANNEL_GRACE_SECONDS))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
