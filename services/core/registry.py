"""The service registry: the one list of services, their gRPC names and default ports.

Everything that needs an address or a service name reads it from here: the server bootstrap, the clients,
the Envoy configuration, compose.yaml and the Kubernetes manifests (the last two are checked against it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import CoreSettings


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the mesh."""

    name: str  # short name: process name, schema name, DNS name in compose/k8s
    grpc_service: str  # fully qualified proto service name
    port: int  # gRPC port in mesh mode
    metrics_port: int  # Prometheus port in mesh mode
    public: bool  # routed through Envoy (JSON and gRPC) for outside callers

    @property
    def route_prefix(self) -> str:
        """The gRPC path prefix Envoy routes on."""
        return f"/{self.grpc_service}/"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", "voiceassist.auth.v1.AuthService", 50051, 9101, public=True),
    ServiceSpec("audit", "voiceassist.audit.v1.AuditService", 50052, 9102, public=True),
    ServiceSpec("search", "voiceassist.search.v1.SearchService", 50053, 9103, public=True),
    ServiceSpec("rag", "voiceassist.rag.v1.RagService", 50054, 9104, public=True),
    ServiceSpec("voice", "voiceassist.voice.v1.VoiceService", 50055, 9105, public=True),
)

# Embedded mode hosts every service in one process on one port.
EMBEDDED_PORT = 50050
EMBEDDED_METRICS_PORT = 9100

BY_NAME: dict[str, ServiceSpec] = {s.name: s for s in SERVICES}
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

# Infrastructure services every server hosts; never authenticated.
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


def spec(name: str) -> ServiceSpec:
    """The spec of a service by short name; KeyError names the known services."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(BY_NAME)}") from None


def address(name: str, settings: CoreSettings) -> str:
    """Where to reach a service: its `<NAME>_ADDR` setting, else the registry's port on localhost."""
    return settings.address_of(name, f"127.0.0.1:{spec(name).port}")


def is_public_method(method: str) -> bool:
    """True when `method` (a full gRPC path) may be called without an access token."""
    return method in PUBLIC_METHODS or method.startswith(("/grpc.health.v1.", "/grpc.reflection."))
