"""The one server bootstrap every service uses.

`serve()` hosts one or more services in a grpc.aio server with the shared interceptors, the gRPC health service
(status per service name, driven by each service's readiness probe), server reflection, message size limits and
keepalive. SIGTERM or SIGINT: report NOT_SERVING, stop accepting calls, let in-flight calls finish within the
grace period, close the services' resources, return (exit code 0).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.core import interceptors, registry, status
from services.core.announcer import Announcer
from services.core.certificates import CertificateUnavailable, WorkloadCertificates, enrolled
from services.core.errors import Reason, ServiceError
from services.core.logs import configure_logging
from services.core.metrics import serve_metrics
from services.core.runtime import Runtime
from services.core.settings import CoreSettings, local_address
from voiceassist.audit.v1 import audit_pb2
from voiceassist.auth.v1 import auth_pb2
from voiceassist.rag.v1 import rag_pb2
from voiceassist.search.v1 import search_pb2
from voiceassist.voice.v1 import voice_pb2

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_INTERVAL_SECONDS = 5.0
ENROLL_TIMEOUT_SECONDS = 60.0  # a worker started with the control plane waits this long for its certificate

# Importing the generated modules registers every mesh service in the default descriptor pool, which server
# reflection answers from.
_MESH_FILES = (auth_pb2, audit_pb2, search_pb2, rag_pb2, voice_pb2)


@dataclass
class Hosted:
    """A service ready to be added to a server: built by the service's own `build(runtime)`."""

    spec: registry.ServiceSpec
    register: Callable[[grpc.aio.Server], None]
    # Raises (or returns False) while the service cannot serve, e.g. its database is unreachable.
    probe: Callable[[], Awaitable[bool]] | None = None
    close: Callable[[], Awaitable[None]] | None = None


ServiceFactory = Callable[[Runtime], Awaitable[Hosted]]


class MeshHealthServicer(HealthServicer):
    """The library health servicer, plus: a Check for a mesh service hosted elsewhere is asked of its owner.

    Through Envoy every health check lands on one upstream; forwarding makes `Health/Check` with any registry
    service name answer that service's real status.
    """

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self._runtime = runtime

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        owner = registry.BY_GRPC_SERVICE.get(request.service)
        if owner is None or owner.name in self._runtime.hosted:
            return await super().Check(request, context)
        stub = self._runtime.channels.stub(owner.name, health_pb2_grpc.HealthStub)
        try:
            # types-grpcio-health-checking declares HealthStub without its methods (the generated class adds them).
            reply: health_pb2.HealthCheckResponse = await stub.Check(request, timeout=2.0)  # type: ignore[attr-defined]
            return reply
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return health_pb2.HealthCheckResponse(status=NOT_SERVING)
            raise ServiceError(Reason.BACKEND_UNAVAILABLE, f"health of {owner.name}: {exc.code().name}") from None


def server_options(settings: CoreSettings) -> list[tuple[str, int]]:
    """Channel arguments for every server: size limits, keepalive, no silent port sharing."""
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        # Envoy refuses more than 8 KiB of request headers (431); this leaves room for what it adds.
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Envoy pings every upstream connection every 2 s to notice a vanished host (envoy_config.service_cluster):
        # at the 5 s minimum gRPC had, a call with nothing sent for a few seconds (a slow model's answer) was cut
        # with GOAWAY "too many pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_seconds * 1000),
        # grpc.aio sets SO_REUSEPORT by default, so a second server on a taken port would start silently.
        ("grpc.so_reuseport", 0),
    ]


class StartupRefused(RuntimeError):
    """The server cannot start as configured; the message says why, for the operator."""


class PortInUse(StartupRefused):
    """The server's gRPC or metrics port is taken."""


def new_server(runtime: Runtime) -> grpc.aio.Server:
    """A server with the shared interceptors and options, hosting nothing yet."""
    return grpc.aio.server(
        interceptors=[
            interceptors.CallInterceptor(
                runtime.token_verifier,
                trusted_proxies=runtime.settings.trusted_proxies,
                domain_of=status.method_domain,
                slow_call_seconds=runtime.settings.log_slow_call_seconds,
                mutual_tls=runtime.mutual_tls,
                join_token=runtime.settings.mesh_join_token.get_secret_value() if runtime.certificates else "",
            )
        ],
        options=server_options(runtime.settings),
    )


def add_services(server: grpc.aio.Server, runtime: Runtime, hosted: list[Hosted]) -> MeshHealthServicer:
    """Add `hosted`, health and reflection to a server that has not started."""
    for service in hosted:
        service.register(server)
    health = MeshHealthServicer(runtime)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection describes the whole mesh API, as seen through Envoy, and whatever else this process hosts.
    names = dict.fromkeys([*(s.grpc_service for s in registry.SERVICES), *(h.spec.grpc_service for h in hosted)])
    reflection.enable_server_reflection([*names, registry.HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    return health


def build_server(runtime: Runtime, hosted: list[Hosted]) -> tuple[grpc.aio.Server, MeshHealthServicer]:
    """A configured (not started) server hosting `hosted`, with health and reflection."""
    server = new_server(runtime)
    return server, add_services(server, runtime, hosted)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUse(f"cannot listen on {address}: the port is in use (or the address is not this host's)")


IdentitySource = Callable[[CoreSettings], WorkloadCertificates]


async def _workload_certificates(
    settings: CoreSettings, factories: dict[str, ServiceFactory], source: IdentitySource | None
) -> WorkloadCertificates | None:
    """This process's certificates (MESH_TLS), issued by the control plane unless `source` makes them; None for
    plaintext, which production allows on loopback only."""
    if not settings.mesh_tls:
        if settings.environment == "production" and local_address(settings.grpc_host) != "127.0.0.1":
            raise StartupRefused(f"MESH_TLS=false is for loopback only; this server binds {settings.grpc_host}")
        return None
    if source is None:
        if not settings.control_plane_addr:
            raise StartupRefused(
                "MESH_TLS needs CONTROL_PLANE_ADDR (its certificate authority issues this process's certificate); "
                "set MESH_TLS=false for plaintext on loopback (embedded mode)"
            )
        if not settings.mesh_join_token.get_secret_value():
            raise StartupRefused("MESH_TLS needs MESH_JOIN_TOKEN, the secret the control plane issues certificates for")
        source = functools.partial(enrolled, workloads=[name for name in factories if name in registry.BY_NAME])
    certificates = source(settings)
    try:
        await certificates.start(wait_seconds=ENROLL_TIMEOUT_SECONDS)
    except CertificateUnavailable as exc:
        raise StartupRefused(str(exc)) from None
    return certificates


async def _check(health: MeshHealthServicer, hosted: list[Hosted]) -> bool:
    """Run each service's probe once and set its health status; True when all serve."""
    statuses = []
    for service in hosted:
        ok = True
        if service.probe is not None:
            try:
                ok = bool(await service.probe())
            except Exception as exc:
                log.warning("probe failed", extra={"service": service.spec.name, "error": repr(exc)})
                ok = False
        await health.set(service.spec.grpc_service, SERVING if ok else NOT_SERVING)
        statuses.append(ok)
    await health.set("", SERVING if all(statuses) else NOT_SERVING)
    return all(statuses)


async def _check_forever(health: MeshHealthServicer, hosted: list[Hosted], announcer: Announcer | None) -> None:
    """Keep each service's health status (and its announcement to the control plane) in step with its probe."""
    while True:
        await asyncio.sleep(PROBE_INTERVAL_SECONDS)
        serving = await _check(health, hosted)
        if announcer is not None:
            await announcer.set_serving(serving)


async def serve(
    factories: dict[str, ServiceFactory],
    *,
    settings: CoreSettings,
    port: int,
    metrics_port: int | None,
    ready: asyncio.Event | None = None,
    identity_source: IdentitySource | None = None,
) -> None:
    """Host the given services until SIGTERM/SIGINT, then shut down gracefully. StartupRefused when it cannot
    (PortInUse is checked before the services load, so it is reported within a second or two; under MESH_TLS after
    the certificate is issued, which waits for the control plane)."""
    configure_logging(settings.log_level, service="+".join(factories))
    address = f"{settings.grpc_host}:{port}"
    certificates = await _workload_certificates(settings, factories, identity_source)
    runtime = Runtime(settings, factories, address, certificates=certificates)
    server = new_server(runtime)
    _bind(server, address, certificates.server_credentials(runtime.mutual_tls) if certificates else None)
    if runtime.mutual_tls and settings.grpc_health_port:
        _bind(server, f"{settings.grpc_host}:{settings.grpc_health_port}", None)  # health only: the interceptor
    if metrics_port is not None and settings.metrics_enabled:
        try:
            serve_metrics(settings.metrics_host, metrics_port)
        except OSError as exc:
            raise PortInUse(f"cannot serve metrics on {settings.metrics_host}:{metrics_port}: {exc.strerror}") from None
    # Mesh services announce themselves to the control plane (which is not one of them).
    routed = [registry.BY_NAME[name] for name in factories if name in registry.BY_NAME]
    try:
        announcer = Announcer(settings, routed, port) if settings.control_plane_addr and routed else None
    except (ValueError, OSError) as exc:  # no address Envoy could reach this process at
        raise StartupRefused(f"cannot announce {address} to the control plane: {exc}") from None
    hosted = [await factory(runtime) for factory in factories.values()]
    health = add_services(server, runtime, hosted)
    serving = await _check(health, hosted)
    await server.start()
    if announcer is not None:
        announcer.start(serving)
    checker = asyncio.create_task(_check_forever(health, hosted, announcer))
    log.info("serving", extra={"address": address, "services": sorted(factories)})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()

    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    checker.cancel()
    # Out of Envoy's rotation first, so no new call arrives while the server stops.
    if announcer is not None:
        await announcer.withdraw()
    await health.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_seconds)
    # Reverse registry order: the services that call others (and record audit events while closing) stop before
    # the ones they depend on; the audit consumer drains last but for auth.
    for service in reversed(hosted):
        if service.close is not None:
            try:
                await service.close()
            except Exception:
                log.exception("closing %s failed", service.spec.name)
    await runtime.close()
    if certificates is not None:
        await certificates.close()
    log.info("stopped")
