"""The control plane (`voiceassist control-plane`): Envoy's xDS server, fed by the service registry and by the
workers that announce themselves.

Clusters, listeners and routes come from the registry and the settings through the same renderer as the static
files (`envoy_config`); endpoints come from the announcements. Every announcement publishes a new snapshot, and
is answered once every connected Envoy has acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.control_plane import envoy_config
from services.control_plane.authority import Authority
from services.control_plane.certificates import CertificateAuthorityServicer
from services.control_plane.endpoints import STATES, Endpoint, EndpointTable
from services.control_plane.settings import ControlPlaneSettings, control_plane_settings
from services.control_plane.xds import (
    CLUSTERS,
    ENDPOINTS,
    LISTENERS,
    ROUTES,
    SECRETS,
    SnapshotCache,
    add_ads_to_server,
    check_consistency,
    pack,
)
from services.core import identity, registry
from services.core.certificates import RENEW_AT, WorkloadCertificates
from services.core.errors import invalid
from services.core.identity import Credentials
from services.core.runtime import Runtime
from services.core.server import Hosted, StartupRefused
from services.core.settings import CoreSettings
from voiceassist.control.v1 import certificates_pb2_grpc, control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

EDGE_FILES_CHECK_SECONDS = 10.0  # how soon a replaced edge certificate file reaches Envoy


class EnvoyCertificates:
    """Envoy's certificates, as the SDS secrets envoy_config names: its workload certificate towards the services
    and the mesh's root, both from the mesh's authority; the listener's certificate from the authority too, or from
    files (a certificate browsers trust), and what it chains to."""

    def __init__(self, authority: Authority, settings: ControlPlaneSettings) -> None:
        self._authority = authority
        self.hostnames = [name.strip() for name in settings.edge_hostnames.split(",") if name.strip()]
        if not self.hostnames:
            raise StartupRefused("CONTROL_PLANE_EDGE_HOSTNAMES names no host for Envoy's certificate")
        certificate_file, key_file = settings.edge_certificate_file, settings.edge_key_file
        if (certificate_file is None) != (key_file is None):
            raise StartupRefused("CONTROL_PLANE_EDGE_CERTIFICATE_FILE and CONTROL_PLANE_EDGE_KEY_FILE go together")
        self._edge_files = (certificate_file, key_file) if certificate_file and key_file else None
        self._edge_mtimes: tuple[int, int] | None = None
        self._renew_at = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        self.secrets: dict[str, dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Renew the issued certificates when due and re-read the edge files when they changed; whether any
        secret changed. Unusable edge files refuse the start, and later leave the previous certificate."""
        renewed = self._renew_if_due()
        return self._reread_edge_files() or renewed

    def next_check_seconds(self) -> float:
        """Until the next renewal, or the next look at the edge files."""
        until_renewal = (self._renew_at - datetime.datetime.now(datetime.UTC)).total_seconds()
        if self._edge_files is not None:
            until_renewal = min(until_renewal, EDGE_FILES_CHECK_SECONDS)
        return max(1.0, until_renewal)

    def _renew_if_due(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        if now < self._renew_at:
            return False
        workload = self._authority.issue([identity.EDGE])
        self._put_certificate(envoy_config.WORKLOAD_SECRET, workload.chain_pem, workload.key_pem)
        self._put_trust(envoy_config.MESH_ROOTS_SECRET, workload.trust_pem)
        if self._edge_files is None:
            edge = self._authority.issue([identity.EDGE], dns_names=self.hostnames)
            self._put_certificate(envoy_config.EDGE_SECRET, edge.chain_pem, edge.key_pem)
            self._put_trust(envoy_config.EDGE_ROOTS_SECRET, edge.trust_pem)
        # From now, not from the (backdated) start of validity: as every workload renews its own.
        self._renew_at = now + (workload.expires_at - now) * RENEW_AT
        log.info("envoy certificates issued", extra={"expires_at": workload.expires_at.isoformat()})
        return True

    def _reread_edge_files(self) -> bool:
        if self._edge_files is None:
            return False
        certificate_file, key_file = self._edge_files
        try:
            mtimes = (certificate_file.stat().st_mtime_ns, key_file.stat().st_mtime_ns)
            if mtimes == self._edge_mtimes:
                return False
            chain, key = certificate_file.read_bytes(), key_file.read_bytes()
            last = _checked_pair(chain, key)
        except (OSError, ValueError) as exc:
            if envoy_config.EDGE_SECRET not in self.secrets:
                raise StartupRefused(f"Envoy's certificate files {certificate_file}, {key_file}: {exc}") from exc
            # Mid-rotation (one file written, not yet the other) is retried at the next look.
            log.warning("envoy's certificate files cannot be used yet; it keeps the previous certificate",
                        extra={"error": str(exc), "certificate_file": str(certificate_file)})  # fmt: skip
            return False
        self._edge_mtimes = mtimes
        self._put_certificate(envoy_config.EDGE_SECRET, chain, key)
        self._put_trust(envoy_config.EDGE_ROOTS_SECRET, last.public_bytes(serialization.Encoding.PEM))
        log.info("envoy's edge certificate read", extra={"expires_at": last.not_valid_after_utc.isoformat()})
        return True

    def _put_certificate(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        self.secrets[name] = envoy_config.certificate_secret(name, chain_pem, key_pem)

    def _put_trust(self, name: str, roots_pem: bytes) -> None:
        self.secrets[name] = envoy_config.trust_secret(name, roots_pem)


def _checked_pair(chain_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """The last certificate of a PEM chain whose first one is the key's; ValueError otherwise (Envoy would reject
    the pair, and keep its listener down at a start)."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ValueError("the key is not the certificate's")
    return chain[-1]


class MeshConfiguration:
    """Builds snapshots: the registry's clusters, listener and routes (packed once), Envoy's certificates (mesh
    TLS) and the live endpoints."""

    def __init__(self, core: CoreSettings, cache: SnapshotCache, certificates: EnvoyCertificates | None = None) -> None:
        target = envoy_config.xds_target(core, ("127.0.0.1", core.control_plane_port))
        if target.tls != (certificates is not None):
            raise ValueError("mesh TLS needs Envoy's certificates, and plaintext none")
        if certificates is not None:
            target = dataclasses.replace(target, edge_hostname=certificates.hostnames[0])
        self.certificates = certificates
        self._clusters = envoy_config.clusters(target)
        self._listeners = envoy_config.listeners(target)
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
        resources = {**self._static, ENDPOINTS: packed}
        if self.certificates is not None:
            resources[SECRETS] = {name: pack(SECRETS, s) for name, s in self.certificates.secrets.items()}
        return self._cache.set(resources).generation

    async def keep_certificates(self) -> None:
        """Renew Envoy's certificates when due (and re-read changed edge files), publishing each change: Envoy
        swaps certificates with no restart and no dropped connection."""
        assert self.certificates is not None
        while True:
            await asyncio.sleep(self.certificates.next_check_seconds())
            try:
                changed = self.certificates.refresh()
            except Exception:  # the loop must outlive a failure: Envoy's certificates would expire
                log.exception("renewing envoy's certificates failed; retrying")
                continue
            if changed:
                self.publish()


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
    """The snapshot cache, the configuration that feeds it, and the two services that serve it.

    With mesh TLS (`core.mesh_tls`) it needs the mesh's `authority`, for Envoy's certificates: start() keeps them
    renewed, close() stops that. (The xDS stream then carries Envoy's keys: the server's interceptor admits only
    callers with the join token.)
    """

    def __init__(self, core: CoreSettings, settings: ControlPlaneSettings, authority: Authority | None = None) -> None:
        certificates = None
        if core.mesh_tls:
            if authority is None:
                raise ValueError("MESH_TLS needs the mesh's certificate authority for Envoy's certificates")
            certificates = EnvoyCertificates(authority, settings)
        self.cache = SnapshotCache(settings.warm_up_seconds)
        self.mesh = MeshConfiguration(core, self.cache, certificates)
        self.mesh.publish()
        self._registry = EndpointRegistryServicer(self.mesh, self.cache, settings)
        self._issuer = CertificateAuthorityServicer(authority) if certificates is not None and authority else None
        self._renewal: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Keep Envoy's certificates renewed (mesh TLS), from the running event loop."""
        if self.mesh.certificates is not None and self._renewal is None:
            self._renewal = asyncio.create_task(self.mesh.keep_certificates())

    async def close(self) -> None:
        """Stop renewing."""
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal

    def register(self, server: grpc.aio.Server) -> None:
        """Serve xDS (ADS), endpoint announcements and (mesh TLS) the certificate authority on `server`."""
        add_ads_to_server(self.cache, server)
        control_pb2_grpc.add_EndpointRegistryServiceServicer_to_server(self._registry, server)
        if self._issuer is not None:
            certificates_pb2_grpc.add_CertificateAuthorityServiceServicer_to_server(self._issuer, server)


@functools.cache
def open_authority(core: CoreSettings, settings: ControlPlaneSettings) -> Authority:
    """The mesh's certificate authority (one per process: the server's own certificate and the one it issues come
    from the same root). StartupRefused when production lacks a passphrase or the join token is missing."""
    if core.environment == "production" and not settings.ca_passphrase.get_secret_value():
        raise StartupRefused("CONTROL_PLANE_CA_PASSPHRASE is required in production (it encrypts the mesh's root key)")
    if not core.mesh_join_token.get_secret_value():
        raise StartupRefused("MESH_TLS needs MESH_JOIN_TOKEN: the secret processes present to be issued certificates")
    return Authority.configured(settings, settings.ca_dir or core.data_dir / "mesh-ca")


def own_certificates(core: CoreSettings) -> WorkloadCertificates:
    """The control plane's server certificate, issued by its own authority (nobody to enroll with)."""
    authority = open_authority(core, control_plane_settings())

    async def obtain() -> Credentials:
        return authority.issue([identity.CONTROL_PLANE])

    return WorkloadCertificates(obtain, [identity.CONTROL_PLANE])


async def build(runtime: Runtime) -> Hosted:
    """The control plane, ready to be hosted."""
    settings = control_plane_settings()
    authority = open_authority(runtime.settings, settings) if runtime.settings.mesh_tls else None
    # Packing the listener (with the descriptor set inline) takes a moment: off the event loop.
    plane = await asyncio.to_thread(ControlPlane, runtime.settings, settings, authority)
    plane.start()
    log.info("control plane ready", extra={"warm_up_seconds": settings.warm_up_seconds})
    return Hosted(registry.CONTROL_PLANE, plane.register, close=plane.close)
