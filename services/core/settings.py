"""Settings shared by every server, read from environment variables (and a `.env` file when present).

Each service adds its own settings class next to its code (`services/<name>/settings.py`) on top of
`ServiceSettings`; `.env.example` lists every variable and a test keeps it complete.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core import registry

ROOT = Path(__file__).resolve().parents[2]


class ServiceSettings(BaseSettings):
    """Base class: reads the environment and `.env`, ignores unknown variables, freezes after loading."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)


class _CoreSettings(ServiceSettings):
    """What the server runtime needs, whatever service it hosts (the per-service fields are added below)."""

    environment: Literal["development", "test", "production"] = Field(
        "development", description="Where this runs; production refuses embedded defaults that are unsafe."
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_slow_call_seconds: float = Field(
        1.0,
        ge=0,
        description="A call that succeeds is logged only when it takes longer than this (every failed call is): "
        "Envoy's access log has every call, and a log line per call costs the service a few percent of its CPU.",
    )
    data_dir: Path = Field(ROOT / "data", description="Embedded mode: SQLite files, keys, the local index.")
    log_dir: Path | None = Field(
        None, description="Where `voiceassist up` writes each process's log. Empty: data_dir/logs."
    )

    database_url: str = Field(
        "",
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test. Each service uses its "
        "own schema in it. TLS as libpq spells it in the query: sslmode (disable, require, verify-ca, verify-full), "
        "sslrootcert, sslcert, sslkey (docs/backend-tls.md). Empty: one SQLite file per service under data_dir "
        "(embedded mode).",
    )
    database_schema_prefix: str = Field(
        "", description="Prefix of each service's PostgreSQL schema (tests use it to isolate runs)."
    )
    database_pool_size: int = Field(
        10,
        ge=1,
        description="Connections each service process keeps to its database, and the most it opens: a call that "
        "finds them all busy waits a moment for one (opening and closing extra connections under load cost more).",
    )
    database_idle_ping_seconds: float = Field(
        10.0,
        ge=0,
        description="A pooled connection idle for longer is checked (and replaced when dead) before use; one used "
        "more recently is not: a ping on every checkout costs asyncpg three round trips, more than the query.",
    )
    redis_url: str = Field(
        "",
        description="e.g. redis://127.0.0.1:6379/0; rediss:// for TLS, with ssl_ca_certs, ssl_certfile and "
        "ssl_keyfile in the query (docs/backend-tls.md). Empty: in-process stores and queues (embedded mode).",
    )
    redis_key_prefix: str = Field("va:", description="Prefix of every Redis key and stream this system writes.")
    redis_timeout_seconds: float = Field(
        0.5, description="Redis connect/read timeout; a slow Redis must not stall logins (fail-open paths)."
    )
    jwt_issuer: str = Field("voiceassist-auth", description="`iss` of every token; checked by every verifier.")
    jwt_audience: str = Field("voiceassist", description="`aud` of access tokens; checked by every verifier.")
    jwt_leeway_seconds: int = Field(30, description="Clock skew tolerated when checking exp/iat.")
    token_cache_size: int = Field(
        10_000,
        ge=0,
        description="Access tokens whose signature each process remembers as checked (until they expire); "
        "revocation is checked on every call regardless. 0: check every signature every time.",
    )
    auth_fail_closed: bool = Field(
        False,
        description="When Redis (revocation list, rate limits) is unreachable: false = allow and audit the outage "
        "(fail-open), true = refuse calls with UNAVAILABLE.",
    )
    audit_buffer_max_events: int = Field(
        50_000,
        ge=1,
        description="Audit events each process keeps while the audit transport (Redis, the audit service) is "
        "unreachable, and the size of the in-process audit queue; beyond it events are dropped, logged and counted.",
    )
    qdrant_url: str = Field("", description="Qdrant server URL. Empty: the embedded Qdrant engine under data_dir.")

    grpc_host: str = Field("127.0.0.1", description="Interface the gRPC servers bind to.")
    grpc_max_message_bytes: int = Field(
        8 * 1024 * 1024, description="Largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED."
    )
    grpc_keepalive_seconds: int = Field(30, description="Server keepalive ping interval.")
    grpc_max_connection_age_seconds: int = Field(
        300,
        ge=1,
        description="A client connection is asked to reconnect after this long (calls in flight finish first), so "
        "round-robin clients of a service look its workers up again and spread over the ones added since.",
    )
    grpc_max_concurrent_streams: int = Field(256, description="HTTP/2 streams per connection.")
    shutdown_grace_seconds: float = Field(
        20.0, description="On SIGTERM/SIGINT: how long in-flight calls may take to finish before they are cancelled."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on the service's metrics port.")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds to.")

    trusted_proxies: str = Field(
        "127.0.0.1/32,::1/128",
        description="Comma-separated networks whose x-forwarded-for is believed (Envoy's address). The client IP is "
        "the entry Envoy appended (the last one); from anyone else the peer address is used.",
    )

    grpc_health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="With MESH_TLS: a plaintext port (on grpc_host) that answers gRPC health checks and nothing else, "
        "for probes that cannot present a certificate (Kubernetes' gRPC probes, container health checks). 0: none.",
    )
    grpc_advertise_host: str = Field(
        "",
        description="The address Envoy reaches this process at, announced to the control plane. Empty: grpc_host, or "
        "when that is 0.0.0.0 what this host's name resolves to (a container's or a pod's own address).",
    )
    embedded_port: int = Field(registry.EMBEDDED_PORT, ge=1, le=65535, description="Embedded mode's gRPC port.")
    embedded_metrics_port: int = Field(
        registry.EMBEDDED_METRICS_PORT, ge=1, le=65535, description="Embedded mode's Prometheus port."
    )
    control_plane_port: int = Field(
        registry.CONTROL_PLANE.port, ge=1, le=65535, description="The control plane's gRPC port (xDS for Envoy)."
    )
    control_plane_metrics_port: int = Field(
        registry.CONTROL_PLANE.metrics_port, ge=1, le=65535, description="The control plane's Prometheus port."
    )
    control_plane_addr: str = Field(
        "",
        description="host:port of the control plane that workers announce themselves to when SERVING (and withdraw "
        "from when stopping). Empty: no announcements (embedded mode, static Envoy configurations).",
    )
    mesh_tls: bool = Field(
        False,
        description="Mutual TLS between every process of the mesh (Envoy, the services, the control plane), with "
        "short-lived certificates from the control plane's certificate authority, and HTTPS at Envoy's listener; "
        "the command-line clients then call Envoy over TLS too. `voiceassist up --mesh`, compose.yaml and the "
        "Kubernetes manifests turn it on. false: plaintext, for embedded mode on loopback; production refuses it "
        "for a server bound beyond loopback.",
    )
    mesh_join_token: SecretStr = Field(
        SecretStr(""),
        description="The shared secret a process presents to the control plane to be issued its certificate (and "
        "that Envoy presents on its xDS stream). Required with MESH_TLS; `voiceassist up --mesh` makes one per run.",
    )
    mesh_trust_bundle: Path | None = Field(
        None,
        description="PEM file of the mesh's root certificate, which every process verifies its peers against (public; "
        "the control plane writes it). Empty: data_dir/mesh-ca/root.pem.",
    )
    envoy_host: str = Field("127.0.0.1", description="Interface Envoy's listener binds to.")
    envoy_port: int = Field(8080, ge=1, le=65535, description="Envoy's listener (JSON, gRPC, gRPC-Web).")
    envoy_redirect_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="With MESH_TLS: a plaintext HTTP listener that only redirects to HTTPS on envoy_port (0: none).",
    )
    envoy_admin_port: int = Field(9901, ge=1, le=65535, description="Envoy's admin interface, bound to 127.0.0.1 only.")
    cors_allowed_origins: str = Field(
        "http://localhost:3000,http://127.0.0.1:3000",
        description="Comma-separated browser origins allowed by Envoy's CORS filter.",
    )

    @property
    def envoy_address(self) -> str:
        """host:port where this machine reaches Envoy: what the CLIs call by default."""
        return f"{local_address(self.envoy_host)}:{self.envoy_port}"

    @property
    def trust_bundle_path(self) -> Path:
        """Where the mesh's root certificate is read from."""
        return self.mesh_trust_bundle or self.data_dir / "mesh-ca" / "root.pem"

    @property
    def logs(self) -> Path:
        """Where process logs go."""
        return self.log_dir or self.data_dir / "logs"

    def port_of(self, service: str) -> int:
        """The gRPC port of a service's first worker."""
        return int(getattr(self, f"{registry.spec(service).name}_port"))

    def metrics_port_of(self, service: str) -> int:
        """The Prometheus port of a service's first worker."""
        return int(getattr(self, f"{registry.spec(service).name}_metrics_port"))

    def workers_of(self, service: str) -> int:
        """How many processes `voiceassist up` runs for a service."""
        return int(getattr(self, f"{registry.spec(service).name}_workers"))

    def address_of(self, service: str) -> str:
        """The gRPC target to call a service at: its `<NAME>_ADDR`, else each of its local workers (the channel
        balances calls over them round-robin)."""
        configured = str(getattr(self, f"{registry.spec(service).name}_addr"))
        if configured:
            return configured
        host, port = local_address(self.grpc_host), self.port_of(service)
        return "ipv4:" + ",".join(f"{host}:{port + i}" for i in range(self.workers_of(service)))

    def scale_blockers(self, service: str) -> list[str]:
        """The settings a service lacks to run more than one process (empty: it may)."""
        return [name.upper() for name in registry.spec(service).shared_state if not getattr(self, name)]


def local_address(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard means every interface, loopback too)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _service_fields() -> dict[str, Any]:
    """`<NAME>_PORT`, `<NAME>_METRICS_PORT`, `<NAME>_WORKERS` and `<NAME>_ADDR` for every service of the registry."""
    fields: dict[str, Any] = {}
    for spec in registry.SERVICES:
        name = spec.name
        fields[f"{name}_port"] = (
            int,
            Field(spec.port, ge=1, le=65535, description=f"gRPC port of {name}'s first worker; worker i listens on "
                  "it + i."),
        )  # fmt: skip
        fields[f"{name}_metrics_port"] = (
            int,
            Field(spec.metrics_port, ge=1, le=65535, description=f"Prometheus port of {name}'s first worker; "
                  "worker i serves on it + i."),
        )  # fmt: skip
        fields[f"{name}_workers"] = (
            int,
            Field(1, ge=1, le=registry.MAX_WORKERS, description=f"Processes of {name} that `voiceassist up` runs, each "
                  "its own endpoint. More than one needs " + " and ".join(s.upper() for s in spec.shared_state) + "."),
        )  # fmt: skip
        fields[f"{name}_addr"] = (
            str,
            Field("", description=f"gRPC target of {name} for the other services (host:port, ipv4:a:p,b:q or "
                  "dns:///name:port); empty: its workers on this host."),
        )  # fmt: skip
    return fields


if TYPE_CHECKING:
    CoreSettings = _CoreSettings
else:
    CoreSettings = create_model(
        "CoreSettings", __base__=_CoreSettings, __module__=__name__, __doc__=_CoreSettings.__doc__, **_service_fields()
    )


@lru_cache
def core_settings() -> CoreSettings:
    """The process-wide core settings (read once)."""
    return CoreSettings()
