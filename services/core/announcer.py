"""Announces this worker to the control plane (`CONTROL_PLANE_ADDR`), which tells Envoy about it.

One announcement stream per hosted service stays open while the process runs: it says SERVING or NOT_SERVING as
the service's health changes, and WITHDRAWN when the process stops, then waits until the control plane confirms
that Envoy no longer sends it calls. A stream the control plane drops (it restarted) is opened again with backoff;
meanwhile Envoy keeps its last endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence

import grpc

from services.core import registry
from services.core.certificates import control_plane_channel, join_token_metadata
from services.core.settings import CoreSettings
from voiceassist.control.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

SERVING = control_pb2.ENDPOINT_STATE_SERVING
NOT_SERVING = control_pb2.ENDPOINT_STATE_NOT_SERVING
WITHDRAWN = control_pb2.ENDPOINT_STATE_WITHDRAWN
RECONNECT_MAX_SECONDS = 1.0  # well below the control plane's warm-up, so a restarted one hears from every worker
WITHDRAW_TIMEOUT_SECONDS = 10.0  # the control plane answers within its own apply timeout; this covers a hung one


def advertised_host(settings: CoreSettings) -> str:
    """The IP address other hosts reach this process at: GRPC_ADVERTISE_HOST, else GRPC_HOST, else (bound to every
    interface) what this host's name resolves to, as in a container or a pod. Names are resolved here: Envoy takes
    addresses only."""
    host = settings.grpc_advertise_host or settings.grpc_host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    if ip.is_unspecified:
        raise ValueError(f"{host} is no address Envoy can reach: set GRPC_ADVERTISE_HOST")
    return str(ip)


class Announcer:
    """Keeps this process's endpoints announced while it runs."""

    def __init__(self, settings: CoreSettings, services: Sequence[registry.ServiceSpec], port: int) -> None:
        self._settings = settings
        self._target = settings.control_plane_addr
        host, instance = advertised_host(settings), f"{socket.gethostname()}-{os.getpid()}"
        self._endpoints = [control_pb2.Endpoint(service=s.name, host=host, port=port, instance=instance)
                           for s in services]  # fmt: skip
        self._state = NOT_SERVING
        self._changed = asyncio.Condition()
        self._confirmed: dict[str, int] = {}  # service -> the state the control plane last confirmed
        self._connected: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    def start(self, serving: bool) -> None:
        """Open the announcement streams."""
        self._state = SERVING if serving else NOT_SERVING
        self._channel = control_plane_channel(
            self._settings,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                # gRPC's own reconnect backoff grows to minutes; a restarted control plane must hear from every
                # worker within its warm-up.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_SECONDS * 1000)),
            ],
        )
        stub = control_pb2_grpc.EndpointRegistryServiceStub(self._channel)
        self._tasks = [asyncio.create_task(self._keep_announced(stub, e)) for e in self._endpoints]

    async def set_serving(self, serving: bool) -> None:
        """Report a health change."""
        await self._set(SERVING if serving else NOT_SERVING)

    async def withdraw(self) -> None:
        """Tell the control plane this process stops, wait until Envoy no longer sends it calls (or the control
        plane is unreachable), then close the streams."""
        await self._set(WITHDRAWN)

        def settled() -> bool:
            return all(self._confirmed.get(e.service) == WITHDRAWN for e in self._endpoints
                       if e.service in self._connected)  # fmt: skip

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(settled), WITHDRAW_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("the control plane did not confirm the withdrawal in time; stopping anyway")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._channel is not None:
            await self._channel.close()

    async def _set(self, state: control_pb2.EndpointState) -> None:
        async with self._changed:
            if self._state != WITHDRAWN:
                self._state = state
            self._changed.notify_all()

    async def _keep_announced(self, stub: control_pb2_grpc.EndpointRegistryServiceStub, endpoint: control_pb2.Endpoint
                              ) -> None:  # fmt: skip
        delay = 0.2
        while True:
            try:
                await self._announce(stub, endpoint)
                delay = 0.2  # it was up: reconnect quickly
            except grpc.aio.AioRpcError as exc:
                log.warning("control plane unreachable", extra={"target": self._target, "code": exc.code().name,
                            "details": exc.details(), "retry_in_seconds": delay})  # fmt: skip
            finally:
                async with self._changed:
                    self._connected.discard(endpoint.service)
                    self._confirmed.pop(endpoint.service, None)
                    self._changed.notify_all()
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX_SECONDS, delay * 2)

    async def _announce(self, stub: control_pb2_grpc.EndpointRegistryServiceStub, endpoint: control_pb2.Endpoint
                        ) -> None:  # fmt: skip
        """One stream, until it ends (the control plane went away) or the task is cancelled."""
        # wait_for_ready: the call waits for the channel's next connection attempt
        call = stub.AnnounceEndpoint(wait_for_ready=True, metadata=join_token_metadata(self._settings))
        replies: asyncio.Queue[control_pb2.AnnounceEndpointResponse | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for reply in call:
                    replies.put_nowait(reply)
            finally:
                replies.put_nowait(None)
                async with self._changed:
                    self._changed.notify_all()

        reader = asyncio.create_task(read())
        try:
            first = True
            sent: list[int] = []  # the state the control plane last confirmed on this stream

            def due() -> bool:
                return reader.done() or not sent or self._state != sent[-1]

            while True:
                async with self._changed:
                    await self._changed.wait_for(due)
                    state = self._state
                if reader.done():
                    await reader  # raises the stream's error, if any
                    return
                request = control_pb2.AnnounceEndpointRequest(state=state)
                if first:
                    request.endpoint.CopyFrom(endpoint)
                await call.write(request)
                reply = await replies.get()
                if reply is None:
                    await reader
                    return
                first = False
                sent[:] = [state]
                async with self._changed:
                    self._connected.add(endpoint.service)
                    self._confirmed[endpoint.service] = reply.state
                    self._changed.notify_all()
                log.info("announced to the control plane", extra={
                    "service": endpoint.service, "state": control_pb2.EndpointState.Name(state),
                    "acknowledged_by": reply.acknowledged, "pending": reply.pending})  # fmt: skip
        finally:
            reader.cancel()
            call.cancel()
