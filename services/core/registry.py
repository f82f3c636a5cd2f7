"""The service registry: the one list of services, their gRPC names and default ports.

Everything that needs an address or a service name reads it from here, through the settings built from it
(`services/core/settings.py` makes `<NAME>_PORT`, `<NAME>_METRICS_PORT`, `<NAME>_WORKERS` and `<NAME>_ADDR` for
every entry): the server bootstrap, the clients, the supervisor, the control plane, the Envoy configuration,
compose.yaml and the Kubernetes manifests (the last two are checked against it).

Default ports sit below Linux's ephemeral range (32768-60999), where an outgoing connection could be holding
them, and leave room for workers: worker i of a service listens on its port + i.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the mesh."""

    name: str  # short name: process name, schema name, DNS name in compose/k8s
    grpc_service: str  # fully qualified proto service name
    port: int  # default gRPC port of its first worker
    metrics_port: int  # default Prometheus port of its first worker
    public: bool  # routed through Envoy (JSON and gRPC) for outside callers
    # Settings that must name a shared backend before a second process of the service may start: without them
    # its state (SQLite file, in-process revocations and rate limits, the embedded vector index) is per process.
    shared_state: tuple[str, ...] = ("database_url", "redis_url")

    @property
    def dns_name(self) -> str:
        """Its host name in compose and Kubernetes (no underscores in DNS)."""
        return self.name.replace("_", "-")

    @property
    def route_prefix(self) -> str:
        """The gRPC path prefix Envoy routes on."""
        return f"/{self.grpc_service}/"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", "voiceassist.auth.v1.AuthService", 7110, 9110, public=True),
    ServiceSpec("audit", "voiceassist.audit.v1.AuditService", 7120, 9120, public=True),
    ServiceSpec(
        "search",
        "voiceassist.search.v1.SearchService",
        7130,
        9130,
        public=True,
        shared_state=("database_url", "redis_url", "qdrant_url"),
    ),
    ServiceSpec("rag", "voiceassist.rag.v1.RagService", 7140, 9140, public=True),
    ServiceSpec("voice", "voiceassist.voice.v1.VoiceService", 7150, 9150, public=True, shared_state=("redis_url",)),
)

# Ports of a service are spaced by this much: at most this many workers per service on one host.
MAX_WORKERS = 10
# The longest a unary call may take end to end: Envoy's route timeout for unary methods, and the bound every service
# keeps its own waits under (a wait past it would end as Envoy's 504, whatever the service meant to answer).
UNARY_TIMEOUT_SECONDS = 60

# Embedded mode hosts every service in one process on one port.
EMBEDDED_PORT = 7100
EMBEDDED_METRICS_PORT = 9100

# The control plane: Envoy's xDS server and the registry workers announce themselves to. Not routed by Envoy.
CONTROL_PLANE = ServiceSpec(
    "control_plane", "voiceassist.control.v1.EndpointRegistryService", 7190, 9190, public=False, shared_state=()
)

BY_NAME: dict[str, ServiceSpec] = {s.name: s for s in SERVICES}
SERVICE_NAMES: frozenset[str] = frozenset(BY_NAME)
BY_GRPC_SERVICE: dict[str, ServiceSpec] = {s.grpc_service: s for s in SERVICES}

# Methods that need no access token. Every other method of every service requires one; the auth interceptor and
# Envoy's jwt_authn rules both read this set.
PUBLIC_METHODS: frozenset[str] = frozenset(
    {
        "/voiceassist.auth.v1.AuthService/Register",
        "/voiceassist.auth.v1.AuthService/Login",
        "/voiceassist.auth.v1.AuthService/RefreshToken",
        "/voiceassist.auth.v1.AuthService/CheckPasswordStrength",
        "/voiceassist.auth.v1.AuthService/GetJwks",
    }
)

# Methods for the mesh's own services, never for outside callers: Envoy does not route them, and with mutual TLS
# (MESH_TLS) the caller's certificate must name one of the services listed (PERMISSION_DENIED otherwise).
INTERNAL_METHODS: dict[str, frozenset[str]] = {
    # Every service records audit events; without Redis they reach the ledger through this call.
    "/voiceassist.audit.v1.AuditService/AppendEvent": SERVICE_NAMES,
}

# The control plane's services, for the mesh's processes and Envoy: with mutual TLS every call carries the join
# token (MESH_JOIN_TOKEN) instead of an access token.
CONTROL_PLANE_PREFIXES = (
    f"/{CONTROL_PLANE.grpc_service}/",
    "/voiceassist.control.v1.CertificateAuthorityService/",
    "/envoy.service.discovery.v3.",
)

# Infrastructure services every server hosts; never authenticated. The control plane's own services (xDS for
# Envoy, endpoint announcements from workers) are not user calls either: they stay on the private network, and
# carry no user token.
HEALTH_SERVICE = "grpc.health.v1.Health"
INFRASTRUCTURE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", *CONTROL_PLANE_PREFIXES)


def spec(name: str) -> ServiceSpec:
    """The spec of a service by short name; KeyError names the known services."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(BY_NAME)}") from None


def is_public_method(method: str) -> bool:
    """True when `method` (a full gRPC path) may be called without an access token."""
    return method in PUBLIC_METHODS or method.startswith(INFRASTRUCTURE_PREFIXES)


@dataclass(frozen=True)
class RetryPolicy:
    """How Envoy retries a call on another endpoint."""

    retry_on: tuple[str, ...]  # Envoy's retry conditions (gRPC and HTTP)
    attempts: int  # the first try included


# Retries by method class, as each contract declares it (`option idempotency_level`): a read (NO_SIDE_EFFECTS, or
# IDEMPOTENT such as a checkpoint made on demand) is tried again on another endpoint when its endpoint is down,
# refused it or reset; no other method is retried, since a write may have taken effect before its endpoint failed.
_READ_RETRY = RetryPolicy(("unavailable", "connect-failure", "refused-stream", "reset"), attempts=3)
RETRY_POLICIES: dict[str, RetryPolicy] = {"NO_SIDE_EFFECTS": _READ_RETRY, "IDEMPOTENT": _READ_RETRY}
