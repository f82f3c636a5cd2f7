"""The control plane (`voiceassist control-plane`): Envoy's xDS server, fed by the service registry and by the
workers that announce themselves.

Clusters, listeners and routes come from the registry and the settings through the same renderer as the static
files (`envoy_config`); endpoints come from the announcements. Every announcement publishes a new snapshot, and
is answered once every connected Envoy has acknowledged it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from services.control_plane import envoy_config
from services.control_plane.endpoints import STATES, Endpoint, EndpointTable
from services.control_plane.settings import ControlPlaneSettings, control_plane_settings
from services.control_plane.xds import (
    CLUSTERS,
    ENDPOINTS,
    LISTENERS,
    ROUTES,
    SnapshotCache,
    add_ads_to_server,
    check_consistency,
    pack,
)
from services.core import registry
from services.core.errors import invalid
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.settings import CoreSettings
from voiceassist.control.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)


class MeshConfiguration:
    """Builds snapshots: the registry's clusters, listener and routes (packed once) plus the live endpoints."""

    def __init__(self, core: CoreSettings, cache: SnapshotCache) -> None:
        target = envoy_config.xds_target(core, ("127.0.0.1", core.control_plane_port))
        self._clusters = envoy_config.clusters(target)
        self._listeners = [envoy_config.listener(target)]
        self._routes = {envoy_config.ROUTE_CONFIG: envoy_config.route_configuration(target)}
        self._static = {
            CLUSTERS: {c["name"]: pack(CLUSTERS, c) for c in self._clusters},
            LISTENERS: {item["name"]: pack(LISTENERS, item) for item in self._listeners},
            ROUTES: {name: pack(ROUTES, r) for name, r in self._routes.items()},
        }
        self._eds = [c["name"] for c in self._clusters if c.get("type") == "EDS"]
        self._cache = cache
        self.table = EndpointTable(self.publish)

    def publish(self) -> int:
        """Take a snapshot of the current endpoints; its generation."""
        assignments = {name: envoy_config.load_assignment(name, self.table.serving(name)) for name in self._eds}
        check_consistency(self._clusters, assignments, self._listeners, self._routes)
        packed = {name: pack(ENDPOINTS, a) for name, a in assignments.items()}
        return self._cache.set({**self._static, ENDPOINTS: packed}).generation


class EndpointRegistryServicer(control_pb2_grpc.EndpointRegistryServiceServicer):
    """AnnounceEndpoint: a worker's announcement lives as long as its stream."""

    def __init__(self, mesh: MeshConfiguration, cache: SnapshotCache, settings: ControlPlaneSettings) -> None:
        self._mesh = mesh
        self._cache = cache
        self._settings = settings

    async def AnnounceEndpoint(
        self, request_iterator: AsyncIterator[control_pb2.AnnounceEndpointRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[control_pb2.AnnounceEndpointResponse]:
        key = object()
        endpoint: Endpoint | None = None
        self._cache.begin_warm_up()
        try:
            async for request in request_iterator:
                if endpoint is None:
                    if not request.HasField("endpoint"):
                        raise invalid("endpoint", "required in the first message")
                    e = request.endpoint
                    endpoint = Endpoint.checked(e.service, e.host, e.port, e.instance or context.peer())
                state = control_pb2.EndpointState.Name(request.state).removeprefix("ENDPOINT_STATE_")
                if state not in STATES:
                    raise invalid("state", "must be SERVING, NOT_SERVING or WITHDRAWN")
                generation = self._mesh.table.put(key, endpoint, state)
                acknowledged, pending = await self._cache.applied(generation, self._settings.apply_timeout_seconds)
                yield control_pb2.AnnounceEndpointResponse(
                    state=request.state, acknowledged=acknowledged, pending=pending
                )
        finally:
            if endpoint is not None:
                self._mesh.table.remove(key)


class ControlPlane:
    """The snapshot cache, the configuration that feeds it, and the two services that serve it."""

    def __init__(self, core: CoreSettings, settings: ControlPlaneSettings) -> None:
        self.cache = SnapshotCache(settings.warm_up_seconds)
        self.mesh = MeshConfiguration(core, self.cache)
        self.mesh.publish()
        self._registry = EndpointRegistryServicer(self.mesh, self.cache, settings)

    def register(self, server: grpc.aio.Server) -> None:
        """Serve xDS (ADS) and endpoint announcements on `server`."""
        add_ads_to_server(self.cache, server)
        control_pb2_grpc.add_EndpointRegistryServiceServicer_to_server(self._registry, server)


async def build(runtime: Runtime) -> Hosted:
    """The control plane, ready to be hosted."""
    settings = control_plane_settings()
    # Packing the listener (with the descriptor set inline) takes a moment: off the event loop.
    plane = await asyncio.to_thread(ControlPlane, runtime.settings, settings)
    log.info("control plane ready", extra={"warm_up_seconds": settings.warm_up_seconds})
    return Hosted(registry.CONTROL_PLANE, plane.register)
