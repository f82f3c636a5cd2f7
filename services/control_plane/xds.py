"""Envoy's configuration over xDS: a cache holding one consistent snapshot, and the aggregated discovery stream
(ADS, state of the world) every Envoy keeps open to the control plane.

The protocol, as Envoy's "xDS REST and gRPC protocol" page and go-control-plane describe it:
- each resource type on a stream has its own version and nonce; a request whose nonce is not the last one sent for
  its type is stale and ignored;
- a request carrying the last nonce acknowledges (ACK) the version it names, or, with `error_detail`, rejects it
  (NACK): the rejection is logged with Envoy's reason, Envoy keeps the last version it accepted, and the rejected
  version is not sent again (a later snapshot with other content is);
- one response per type is outstanding at a time (the next goes out once Envoy answered the last);
- updates go out in the order that never points at something missing: secrets (certificates, with mesh TLS), then
  clusters, then their endpoints, then listeners, then their routes;
- versions are hashes of the content, so a restarted control plane serving the same configuration sends Envoy
  nothing new, and endpoints are held back for a warm-up after a start, until the workers have announced
  themselves again (Envoy keeps serving with what it has meanwhile).

With mesh TLS the stream carries Envoy's private keys (SDS secrets): the server's interceptor refuses a stream
without the mesh's join token before it reaches the cache (registry.CONTROL_PLANE_PREFIXES).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import itertools
import keyword
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import betterproto2
import grpc
from betterproto2.casing import safe_snake_case
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import ControlPlane
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.protobuf import Any as AnyMessage
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

CLUSTERS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENERS = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRETS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Secrets first: clusters and listeners with TLS wait for theirs.
ORDER = (SECRETS, CLUSTERS, ENDPOINTS, LISTENERS, ROUTES)
_MESSAGES: dict[str, type[betterproto2.Message]] = {
    SECRETS: Secret,
    CLUSTERS: Cluster,
    ENDPOINTS: ClusterLoadAssignment,
    LISTENERS: Listener,
    ROUTES: RouteConfiguration,
}
_SHORT = {SECRETS: "SDS", CLUSTERS: "CDS", ENDPOINTS: "EDS", LISTENERS: "LDS", ROUTES: "RDS"}

# The extensions our configuration names in `typed_config`: importing their modules registers their messages,
# so an `@type` in a resource dict can be packed.
_EXTENSIONS = (
    "envoy.extensions.access_loggers.file.v3",
    "envoy.extensions.filters.http.cors.v3",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3",
    "envoy.extensions.filters.http.grpc_web.v3",
    "envoy.extensions.filters.http.header_mutation.v3",
    "envoy.extensions.filters.http.jwt_authn.v3",
    "envoy.extensions.filters.http.lua.v3",
    "envoy.extensions.filters.http.router.v3",
    "envoy.extensions.filters.network.http_connection_manager.v3",
    "envoy.extensions.formatter.req_without_query.v3",
    "envoy.extensions.retry.host.previous_hosts.v3",
    "envoy.extensions.transport_sockets.tls.v3",
    "envoy.extensions.upstreams.http.v3",
)
for _module in _EXTENSIONS:
    importlib.import_module(f"envoy_data_plane.{_module}")


def _field_name(value: str) -> str:
    if value.islower() and value.isidentifier() and not keyword.iskeyword(value):
        return value
    return safe_snake_case(value)


# betterproto2 0.9 turns every key of a dict into a Python field name by re-casing it, which breaks fields with a
# digit before a letter: Envoy's `consecutive_5xx` becomes `consecutive_5_xx`, an unknown field. Our resources are
# written with proto field names already (snake case), so those are taken as they are. betterproto2 looks the
# function up among its package's globals, where it is imported but not exported: hence the ignore.
betterproto2.safe_snake_case = _field_name  # type: ignore[attr-defined]

XDS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

NACKS = Counter("xds_nacks_total", "Configurations Envoy rejected, by resource type.", ["type"])
PUSHES = Counter("xds_responses_total", "Configurations sent to Envoy, by resource type.", ["type"])
STREAMS = Gauge("xds_streams", "Envoy ADS streams connected now.")


def pack(type_url: str, resource: Mapping[str, Any]) -> AnyMessage:
    """A resource in Envoy's v3 JSON shape as a protobuf Any; ValueError names what Envoy's API does not have."""
    try:
        message = _MESSAGES[type_url].from_dict(dict(resource))
    except (TypeError, ValueError, KeyError) as exc:
        name = resource.get("name") or resource.get("cluster_name")
        raise ValueError(f"{_SHORT[type_url]} resource {name}: {exc}") from exc
    return AnyMessage(type_url=type_url, value=bytes(message))


def _version(resources: Mapping[str, AnyMessage]) -> str:
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode() + b"\0" + resources[name].value + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """Every resource type at one version: replaced whole on a change, never mutated."""

    generation: int  # increases with every snapshot the cache takes
    resources: Mapping[str, Mapping[str, AnyMessage]]  # type URL -> resource name -> packed resource
    versions: Mapping[str, str]  # type URL -> content hash

    @classmethod
    def of(cls, generation: int, resources: Mapping[str, Mapping[str, AnyMessage]]) -> Snapshot:
        """A snapshot of packed resources, versioned by content."""
        return cls(generation, resources, {t: _version(resources.get(t, {})) for t in ORDER})

    def pick(self, type_url: str, names: Sequence[str]) -> list[AnyMessage]:
        """The resources a request names (all of them for a wildcard request)."""
        found = self.resources.get(type_url, {})
        return [found[n] for n in sorted(names or found) if n in found]


def check_consistency(clusters: Sequence[Mapping[str, Any]], assignments: Mapping[str, Any],
                      listeners: Sequence[Mapping[str, Any]], routes: Mapping[str, Any]) -> None:  # fmt: skip
    """ValueError when a cluster fed by EDS has no endpoint assignment or a listener names a missing route
    configuration: Envoy would wait for them and keep the cluster or listener warming."""
    for cluster in clusters:
        if cluster.get("type") == "EDS" and cluster["name"] not in assignments:
            raise ValueError(f"cluster {cluster['name']} has no endpoint assignment")
    for item in listeners:
        for chain in item.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                rds = network_filter.get("typed_config", {}).get("rds")
                if rds and rds["route_config_name"] not in routes:
                    raise ValueError(f"listener {item['name']} names missing routes {rds['route_config_name']}")


@dataclass
class _Subscription:
    """One resource type on one stream."""

    names: tuple[str, ...] = ()
    nonce: str = ""  # of the last response sent
    waiting: bool = False  # a response is out and Envoy has not answered it yet
    sent_version: str = ""
    sent_generation: int = -1
    accepted_version: str = ""  # what Envoy runs
    accepted_generation: int = -1
    rejected_version: str = ""
    # The names the last response covered (at the first request: those Envoy says it holds). A request naming
    # others is answered even when the version did not change: SDS names grow as clusters and listeners warm.
    held_names: frozenset[str] = frozenset()


@dataclass(eq=False)  # compared (and hashed) by identity: one per connection
class _Stream:
    """One Envoy's ADS stream."""

    peer: str
    inbox: asyncio.Queue[DiscoveryRequest | None] = field(default_factory=asyncio.Queue)
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    node: str = ""

    def poke(self) -> None:
        """Wake the stream's loop (the snapshot changed, or the warm-up ended)."""
        self.inbox.put_nowait(None)


class SnapshotCache:
    """The current snapshot, the streams that serve it, and what each Envoy has acknowledged."""

    def __init__(self, warm_up_seconds: float = 0.0) -> None:
        self._snapshot: Snapshot | None = None
        self._generations = itertools.count(1)
        self._streams: set[_Stream] = set()
        self._acks = asyncio.Condition()
        self._warm_up_seconds = warm_up_seconds
        self._warm_at: float | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        """The configuration in force."""
        return self._snapshot

    def set(self, resources: Mapping[str, Mapping[str, AnyMessage]]) -> Snapshot:
        """Take a new snapshot of `resources` (consistency-checked by the caller) and push it to every stream."""
        self._snapshot = Snapshot.of(next(self._generations), resources)
        for stream in self._streams:
            stream.poke()
        return self._snapshot

    def begin_warm_up(self) -> None:
        """Start the warm-up clock, at the first call this control plane receives (it is reachable from then on,
        so workers can announce themselves again within their reconnect backoff)."""
        if self._warm_at is None:
            self._warm_at = time.monotonic() + self._warm_up_seconds

    def warm(self) -> bool:
        """False during the warm-up after a start: endpoints are held back until workers announced again."""
        return self._warm_up_seconds == 0 or (self._warm_at is not None and time.monotonic() >= self._warm_at)

    def warm_up_left(self) -> float:
        """Seconds of warm-up left."""
        self.begin_warm_up()
        assert self._warm_at is not None
        return max(0.0, self._warm_at - time.monotonic())

    async def _acknowledged(self) -> None:
        async with self._acks:
            self._acks.notify_all()

    async def applied(self, generation: int, wait_seconds: float) -> tuple[int, int]:
        """Wait until every Envoy that subscribes to endpoints has acknowledged endpoints at least as new as
        snapshot `generation`, or `wait_seconds` passed: (streams that did, streams that did not)."""

        def counts() -> tuple[int, int]:
            subs = [s.subscriptions[ENDPOINTS] for s in self._streams if ENDPOINTS in s.subscriptions]
            done = sum(1 for sub in subs if sub.accepted_generation >= generation)
            return done, len(subs) - done

        async with self._acks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.wait_for(lambda: counts()[1] == 0), wait_seconds)
            return counts()

    async def stream(
        self,
        requests: AsyncIterator[DiscoveryRequest],
        context: grpc.aio.ServicerContext[DiscoveryRequest, DiscoveryResponse],
    ) -> AsyncIterator[DiscoveryResponse]:
        """StreamAggregatedResources: serve one Envoy for as long as it stays connected."""
        stream = _Stream(context.peer())
        self.begin_warm_up()

        async def read() -> None:
            try:
                async for request in requests:
                    stream.inbox.put_nowait(request)
            finally:
                stream.inbox.put_nowait(_CLOSED)

        self._streams.add(stream)
        STREAMS.inc()
        reader = asyncio.create_task(read())
        if not self.warm():
            asyncio.get_running_loop().call_later(self.warm_up_left() + 0.01, stream.poke)
        try:
            while True:
                request = await stream.inbox.get()
                if request is _CLOSED:
                    return
                if request is not None:
                    await self._receive(stream, request)
                for response in self._due(stream):
                    yield response
        finally:
            self._streams.discard(stream)
            STREAMS.dec()
            reader.cancel()
            log.info("envoy disconnected", extra={"peer": stream.peer, "node": stream.node})
            await self._acknowledged()  # waiters stop counting this stream

    async def _receive(self, stream: _Stream, request: DiscoveryRequest) -> None:
        type_url = request.type_url
        if type_url not in _MESSAGES:
            log.warning("envoy asked for an unknown resource type", extra={"type": type_url, "peer": stream.peer})
            return
        if request.node and request.node.id and not stream.node:
            stream.node = request.node.id
            log.info("envoy connected", extra={"peer": stream.peer, "node": stream.node})
        sub = stream.subscriptions.get(type_url)
        if sub is None:
            # A first request names what Envoy already holds at its version_info (after a reconnect).
            sub = stream.subscriptions[type_url] = _Subscription(held_names=frozenset(request.resource_names))
        if request.response_nonce and request.response_nonce != sub.nonce:
            return  # answers a response that a newer one superseded
        sub.names = tuple(request.resource_names)
        if request.response_nonce:
            sub.waiting = False
        if request.error_detail is not None and request.error_detail.code:
            sub.rejected_version = sub.sent_version
            NACKS.labels(_SHORT[type_url]).inc()
            details = {"type": _SHORT[type_url], "rejected_version": sub.sent_version, "peer": stream.peer,
                       "kept_version": request.version_info, "error": request.error_detail.message}  # fmt: skip
            log.error("envoy rejected a configuration; it keeps the last one it accepted", extra=details)
            return
        sub.accepted_version = request.version_info
        if request.response_nonce:
            sub.accepted_generation = sub.sent_generation
            await self._acknowledged()

    def _due(self, stream: _Stream) -> list[DiscoveryResponse]:
        """The responses this stream should get now, in warming order."""
        snapshot = self._snapshot
        if snapshot is None:
            return []
        due = []
        for type_url in ORDER:
            sub = stream.subscriptions.get(type_url)
            if sub is None or sub.waiting or (type_url == ENDPOINTS and not self.warm()):
                continue
            version = snapshot.versions[type_url]
            if version == sub.accepted_version and sub.held_names == frozenset(sub.names):
                if sub.accepted_generation < snapshot.generation:
                    sub.accepted_generation = snapshot.generation  # Envoy already runs this content
                    asyncio.get_running_loop().create_task(self._acknowledged())
                continue
            if version == sub.rejected_version:
                continue
            sub.nonce = f"{snapshot.generation}-{_SHORT[type_url]}-{next(_NONCES)}"
            sub.waiting, sub.sent_version, sub.sent_generation = True, version, snapshot.generation
            sub.held_names = frozenset(sub.names)
            PUSHES.labels(_SHORT[type_url]).inc()
            response = DiscoveryResponse(
                version_info=version, resources=snapshot.pick(type_url, sub.names), type_url=type_url,
                nonce=sub.nonce, control_plane=ControlPlane(identifier="voiceassist-control-plane"),
            )  # fmt: skip
            due.append(response)
        return due


_CLOSED: Any = object()
_NONCES = itertools.count(1)


def add_ads_to_server(cache: SnapshotCache, server: grpc.aio.Server) -> None:
    """Serve the aggregated discovery service from `cache` (messages are the envoy-data-plane dataclasses)."""
    handler = grpc.stream_stream_rpc_method_handler(
        cache.stream, request_deserializer=DiscoveryRequest.parse, response_serializer=bytes
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(XDS_SERVICE, {"StreamAggregatedResources": handler}),)
    )
